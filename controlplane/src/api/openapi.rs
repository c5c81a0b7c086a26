//! `GET /v1/openapi.json`: the REST API's contract as an OpenAPI 3.0.3 document, served without
//! a token so client generators and API fuzzers can read it. The document is written by hand in
//! `openapi.json` beside this file; the tests below check that it names exactly the routes that
//! `api::router` serves (plus [`NOT_YET_SERVED`]), so it cannot silently drift from the code.

use axum::http::header;
use axum::response::IntoResponse;

/// The OpenAPI document, compiled into the binary so every node serves the one that matches its
/// code.
pub const DOCUMENT: &str = include_str!("openapi.json");

/// Operations (method, path) the document describes although `api::router` does not serve them
/// yet, because they are being added alongside. Remove an entry when its route lands; the test
/// fails until then so this list stays true.
pub const NOT_YET_SERVED: &[(&str, &str)] = &[];

/// Serves [`DOCUMENT`] as `application/json`.
pub async fn get() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;

    use super::*;

    const METHODS: &[&str] = &["get", "put", "post", "delete", "patch", "head", "options", "trace"];

    fn document() -> Value {
        serde_json::from_str(DOCUMENT).expect("openapi.json is valid JSON")
    }

    /// (method, path) of every operation in the document.
    fn documented(doc: &Value) -> BTreeSet<(String, String)> {
        let mut ops = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths is an object") {
            for (key, _) in item.as_object().expect("path item is an object") {
                if METHODS.contains(&key.as_str()) {
                    ops.insert((key.clone(), path.clone()));
                }
            }
        }
        ops
    }

    /// (method, path) of every `.route("...", ...)` in `api::router`'s source, with axum's
    /// `:param` written as OpenAPI's `{param}`.
    fn routed(source: &str) -> BTreeSet<(String, String)> {
        let mut ops = BTreeSet::new();
        let mut rest = source;
        while let Some(at) = rest.find(".route(\"") {
            rest = &rest[at + ".route(\"".len()..];
            let end = rest.find('"').expect("route path literal ends");
            let path = rest[..end]
                .split('/')
                .map(|seg| match seg.strip_prefix(':') {
                    Some(name) => format!("{{{name}}}"),
                    None => seg.to_string(),
                })
                .collect::<Vec<_>>()
                .join("/");
            // The method router: everything up to the `)` that closes `.route(`.
            let mut depth = 1;
            let mut close = rest.len();
            for (i, c) in rest.char_indices().skip(end + 1) {
                match c {
                    '(' => depth += 1,
                    ')' => {
                        depth -= 1;
                        if depth == 0 {
                            close = i;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let handlers = &rest[end + 1..close];
            for method in METHODS {
                let call = format!("{method}(");
                let mut from = 0;
                while let Some(i) = handlers[from..].find(&call) {
                    let start = from + i;
                    let before = handlers[..start].chars().next_back();
                    // `get(`, `.get(` or `routing::get(`, not `databases::get` or `forget(`.
                    if !before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                        ops.insert((method.to_string(), path.clone()));
                    }
                    from = start + call.len();
                }
            }
            rest = &rest[close..];
        }
        ops
    }

    #[test]
    fn is_openapi_3_0_3_with_bearer_auth() {
        let doc = document();
        assert_eq!(doc["openapi"], "3.0.3");
        assert_eq!(doc["components"]["securitySchemes"]["bearer"]["type"], "http");
        assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
        assert_eq!(doc["security"][0]["bearer"], serde_json::json!([]));
    }

    #[test]
    fn router_source_parses() {
        let ops = routed(
            r#"Router::new().route("/a/:id", get(x::get).delete(y::delete)).route("/b", routing::post(z))
               .route("/c", get(forget))"#,
        );
        let want: BTreeSet<_> = [("get", "/a/{id}"), ("delete", "/a/{id}"), ("post", "/b"), ("get", "/c")]
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        assert_eq!(ops, want);
    }

    #[test]
    fn documents_exactly_the_routes_the_router_serves() {
        let doc = document();
        let documented = documented(&doc);
        let routed = routed(include_str!("mod.rs"));
        assert!(routed.len() >= 10, "found too few routes in api/mod.rs: {routed:?}");
        let pending: BTreeSet<(String, String)> =
            NOT_YET_SERVED.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
        let undocumented: Vec<_> = routed.difference(&documented).collect();
        assert!(undocumented.is_empty(), "routes missing from openapi.json: {undocumented:?}");
        let unserved: Vec<_> = documented.difference(&routed).filter(|op| !pending.contains(op)).collect();
        assert!(unserved.is_empty(), "openapi.json documents routes the router does not serve: {unserved:?}");
        let landed: Vec<_> = pending.intersection(&routed).collect();
        assert!(landed.is_empty(), "these routes are served now: remove them from NOT_YET_SERVED: {landed:?}");
        let stray: Vec<_> = pending.difference(&documented).collect();
        assert!(stray.is_empty(), "NOT_YET_SERVED lists routes openapi.json lacks: {stray:?}");
    }

    /// Every `$ref` in `v`, as its JSON pointer into the document.
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                for (k, child) in map {
                    match (k.as_str(), child) {
                        ("$ref", Value::String(r)) => out.push(r.clone()),
                        _ => refs(child, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|i| refs(i, out)),
            _ => {}
        }
    }

    #[test]
    fn every_reference_resolves() {
        let doc = document();
        let mut all = Vec::new();
        refs(&doc, &mut all);
        assert!(!all.is_empty());
        for r in all {
            let pointer = r.strip_prefix('#').unwrap_or_else(|| panic!("{r} is not a local reference"));
            assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
        }
    }

    /// Resolves a local `$ref` once (the document's parameters and responses are one level deep).
    fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
        match v["$ref"].as_str().and_then(|r| r.strip_prefix('#')) {
            Some(pointer) => doc.pointer(pointer).unwrap_or(v),
            None => v,
        }
    }

    #[test]
    fn operations_declare_their_path_parameters_and_common_errors() {
        let doc = document();
        for (method, path) in documented(&doc) {
            let item = &doc["paths"][&path];
            let op = &item[&method];
            let params: Vec<&Value> = item["parameters"]
                .as_array()
                .into_iter()
                .chain(op["parameters"].as_array())
                .flatten()
                .map(|p| resolve(&doc, p))
                .collect();
            for segment in path.split('/').filter_map(|s| s.strip_prefix('{')?.strip_suffix('}')) {
                assert!(
                    params.iter().any(|p| p["in"] == "path" && p["name"] == segment && p["required"] == true),
                    "{method} {path}: path parameter {segment} is not declared"
                );
            }
            let responses = op["responses"].as_object().unwrap_or_else(|| panic!("{method} {path}: no responses"));
            if path.contains('{') {
                // An undecodable segment answers 400 (`api::extract::Path`).
                assert!(responses.contains_key("400"), "{method} {path}: 400 is not documented");
            }
            let public = op["security"] == serde_json::json!([]);
            if !public {
                for status in ["401", "413", "429", "503"] {
                    assert!(responses.contains_key(status), "{method} {path}: {status} is not documented");
                }
                let retry_after = &resolve(&doc, &responses["429"])["headers"]["Retry-After"];
                assert!(retry_after.is_object(), "{method} {path}: 429 lacks Retry-After");
            }
            for (status, response) in responses {
                if status.starts_with('4') || status.starts_with('5') {
                    let schema = &resolve(&doc, response)["content"]["application/json"]["schema"]["$ref"];
                    assert_eq!(schema, "#/components/schemas/Error", "{method} {path}: {status} is not an Error");
                }
            }
        }
    }
}
