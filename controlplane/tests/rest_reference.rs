//! `docs/rest-reference.md` is generated from the OpenAPI document
//! (`controlplane/src/api/openapi.json`) by the renderer below, so the reference cannot drift
//! from the contract the nodes serve. The test fails when the committed file differs from what
//! the document renders to; regenerate it with
//!
//! ```sh
//! STEWARD_BLESS=1 cargo test -p steward-controlplane --test rest_reference
//! ```
//!
//! Output order does not depend on how JSON objects iterate: operations follow the document's
//! tag list, then path and method; fields follow `required`, then name.

use std::fmt::Write;
use std::path::PathBuf;

use serde_json::{Map, Value};

const METHODS: &[&str] = &["get", "post", "put", "patch", "delete", "head", "options", "trace"];

fn document() -> Value {
    serde_json::from_str(steward_controlplane::api::openapi::DOCUMENT).expect("openapi.json is valid JSON")
}

fn reference_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/rest-reference.md")
}

/// Text for a Markdown table cell: one line, pipes escaped.
fn cell(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ").replace('|', "\\|")
}

/// The schema name of a `#/components/schemas/X` reference.
fn ref_name(r: &str) -> &str {
    r.rsplit('/').next().unwrap_or(r)
}

fn anchor(kind: &str, name: &str) -> String {
    let slug: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    let words: Vec<&str> = slug.split('-').filter(|w| !w.is_empty()).collect();
    format!("{kind}-{}", words.join("-"))
}

/// Follows a `$ref` into `components` (parameters, responses, headers, schemas).
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let pointer = r.trim_start_matches('#');
            doc.pointer(pointer).map(|t| resolve(doc, t)).unwrap_or(v)
        }
        None => v,
    }
}

/// A JSON value as inline code.
fn code(v: &Value) -> String {
    format!("`{}`", v.to_string().replace('`', "'"))
}

/// A schema's type in words: a link for references, with its constraints.
fn type_of(schema: &Value) -> String {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = ref_name(r);
        return format!("[{name}](#{})", anchor("schema", name));
    }
    let mut base = if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        all.iter().map(type_of).collect::<Vec<_>>().join(" and ")
    } else if let Some(any) = schema.get("anyOf").or_else(|| schema.get("oneOf")).and_then(Value::as_array) {
        any.iter().map(type_of).collect::<Vec<_>>().join(" or ")
    } else {
        match schema.get("type").and_then(Value::as_str) {
            Some("array") => format!("array of {}", schema.get("items").map(type_of).unwrap_or_else(|| "any".into())),
            Some(t) => t.to_string(),
            None if schema.get("not").is_some() => "anything but the excluded".into(),
            None => "any".into(),
        }
    };
    if let Some(f) = schema.get("format").and_then(Value::as_str) {
        let _ = write!(base, " ({f})");
    }
    if schema.get("nullable").and_then(Value::as_bool) == Some(true) {
        base.push_str(", nullable");
    }
    let mut notes = Vec::new();
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        let listed: Vec<String> = values.iter().filter(|v| !v.is_null()).map(code).collect();
        notes.push(format!("one of {}", listed.join(", ")));
    }
    for (key, word) in [
        ("minLength", "min length"),
        ("maxLength", "max length"),
        ("minimum", "min"),
        ("maximum", "max"),
        ("minItems", "min items"),
        ("maxItems", "max items"),
        ("pattern", "pattern"),
        ("default", "default"),
    ] {
        if let Some(v) = schema.get(key) {
            notes.push(format!("{word} {}", code(v)));
        }
    }
    if schema.get("additionalProperties") == Some(&Value::Bool(false)) {
        notes.push("no other fields".into());
    }
    if notes.is_empty() {
        base
    } else {
        format!("{base}; {}", notes.join("; "))
    }
}

/// Property names: the required ones in their listed order, then the others by name.
fn ordered_properties(schema: &Value) -> Vec<(String, &Value, bool)> {
    let Some(props) = schema.get("properties").and_then(Value::as_object) else { return Vec::new() };
    let required: Vec<&str> =
        schema.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
    let mut out: Vec<(String, &Value, bool)> =
        required.iter().filter_map(|r| props.get(*r).map(|v| (r.to_string(), v, true))).collect();
    let mut rest: Vec<&String> = props.keys().filter(|k| !required.contains(&k.as_str())).collect();
    rest.sort();
    out.extend(rest.into_iter().filter_map(|k| props.get(k).map(|v| (k.clone(), v, false))));
    out
}

/// Rows `field | type | required | description` of an object schema, nested objects as
/// `parent.child`.
fn field_rows(doc: &Value, schema: &Value, prefix: &str, out: &mut String) {
    for (name, prop, required) in ordered_properties(schema) {
        let full = if prefix.is_empty() { name.clone() } else { format!("{prefix}.{name}") };
        let described = prop.get("description").and_then(Value::as_str).or_else(|| {
            prop.get("$ref").map(|_| resolve(doc, prop)).and_then(|s| s.get("description")).and_then(Value::as_str)
        });
        let mut desc = described.unwrap_or_default().to_string();
        if let Some(e) = prop.get("example") {
            let _ = write!(desc, "{}Example: {}.", if desc.is_empty() { "" } else { " " }, code(e));
        }
        let _ = writeln!(
            out,
            "| `{full}` | {} | {} | {} |",
            cell(&type_of(prop)),
            if required { "yes" } else { "no" },
            cell(&desc)
        );
        if prop.get("properties").is_some() {
            field_rows(doc, prop, &full, out);
        }
        if let Some(items) = prop.get("items").filter(|i| i.get("properties").is_some()) {
            field_rows(doc, items, &format!("{full}[]"), out);
        }
    }
}

/// The fields table of a schema (following a reference), or its type when it has no fields.
fn schema_block(doc: &Value, schema: &Value, out: &mut String) {
    let target = resolve(doc, schema);
    if target.get("properties").is_some() {
        let _ = writeln!(out, "| field | type | required | description |\n| --- | --- | --- | --- |");
        field_rows(doc, target, "", out);
    } else {
        let _ = writeln!(out, "Type: {}.", type_of(target));
    }
}

/// The `application/json` schema of a request body or response, if any.
fn json_schema(v: &Value) -> Option<&Value> {
    v.get("content")?.get("application/json")?.get("schema")
}

fn render_operation(doc: &Value, path: &str, method: &str, item: &Value, op: &Value, out: &mut String) {
    let summary = op.get("summary").and_then(Value::as_str).unwrap_or_default();
    let upper = method.to_ascii_uppercase();
    let _ = writeln!(out, "<a id=\"{}\"></a>\n", anchor("op", &format!("{method} {path}")));
    let _ = writeln!(out, "### `{upper} {path}`: {summary}\n");
    let public = op.get("security").and_then(Value::as_array).is_some_and(Vec::is_empty);
    let id = op.get("operationId").and_then(Value::as_str).unwrap_or("-");
    let _ = writeln!(
        out,
        "Operation `{id}`. Authentication: {}.\n",
        if public { "none" } else { "`Authorization: Bearer <token>`" }
    );
    if let Some(d) = op.get("description").and_then(Value::as_str) {
        let _ = writeln!(out, "{}\n", d.trim());
    }
    let params: Vec<&Value> = item
        .get("parameters")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .chain(op.get("parameters").and_then(Value::as_array).into_iter().flatten())
        .map(|p| resolve(doc, p))
        .collect();
    if !params.is_empty() {
        let _ = writeln!(
            out,
            "**Parameters**\n\n| name | in | type | required | description |\n| --- | --- | --- | --- | --- |"
        );
        for p in params {
            let _ = writeln!(
                out,
                "| `{}` | {} | {} | {} | {} |",
                p.get("name").and_then(Value::as_str).unwrap_or_default(),
                p.get("in").and_then(Value::as_str).unwrap_or_default(),
                cell(&p.get("schema").map(type_of).unwrap_or_default()),
                if p.get("required").and_then(Value::as_bool) == Some(true) { "yes" } else { "no" },
                cell(p.get("description").and_then(Value::as_str).unwrap_or_default())
            );
        }
        out.push('\n');
    }
    if let Some(body) = op.get("requestBody").map(|b| resolve(doc, b)) {
        let required = body.get("required").and_then(Value::as_bool) == Some(true);
        let _ =
            write!(out, "**Request body** (`application/json`, {})", if required { "required" } else { "optional" });
        if let Some(schema) = json_schema(body) {
            let named = schema.get("$ref").and_then(Value::as_str).map(ref_name);
            if let Some(n) = named {
                let _ = write!(out, ": [{n}](#{})", anchor("schema", n));
            }
            let _ = writeln!(out, "\n");
            if let Some(d) = body.get("description").and_then(Value::as_str) {
                let _ = writeln!(out, "{}\n", d.trim());
            }
            schema_block(doc, schema, out);
        } else {
            let _ = writeln!(out, "\n");
        }
        out.push('\n');
    }
    let _ = writeln!(out, "**Responses**\n\n| status | description | body |\n| --- | --- | --- |");
    let responses = op.get("responses").and_then(Value::as_object).cloned().unwrap_or_default();
    let mut codes: Vec<&String> = responses.keys().collect();
    codes.sort();
    for status in codes {
        let r = resolve(doc, &responses[status]);
        let mut desc = r.get("description").and_then(Value::as_str).unwrap_or_default().to_string();
        if let Some(h) = r.get("headers").and_then(Value::as_object) {
            let mut names: Vec<&String> = h.keys().collect();
            names.sort();
            let names: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
            let _ = write!(desc, " Headers: {}.", names.join(", "));
        }
        let body = match r.get("content").and_then(Value::as_object) {
            Some(content) => {
                let mut types: Vec<String> = Vec::new();
                let mut media: Vec<&String> = content.keys().collect();
                media.sort();
                for m in media {
                    let t = content[m].get("schema").map(type_of).unwrap_or_default();
                    types.push(if m == "application/json" { t } else { format!("`{m}` {t}") });
                }
                types.join(", ")
            }
            None => "-".into(),
        };
        let _ = writeln!(out, "| {status} | {} | {} |", cell(&desc), cell(&body));
    }
    out.push('\n');
}

/// A tag's name and description, and its operations as (path, method).
type TagGroup = (String, String, Vec<(String, String)>);

/// Operations of the document, grouped by their first tag in the document's tag order.
fn grouped(doc: &Value) -> Vec<TagGroup> {
    let mut tags: Vec<(String, String)> = doc["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            (
                t["name"].as_str().unwrap_or_default().to_string(),
                t["description"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let empty = Map::new();
    let paths = doc["paths"].as_object().unwrap_or(&empty);
    let mut ops: Vec<(String, String, String)> = Vec::new(); // (tag, path, method)
    for (path, item) in paths {
        for method in METHODS {
            if let Some(op) = item.get(*method) {
                let tag = op["tags"][0].as_str().unwrap_or("other").to_string();
                if !tags.iter().any(|(t, _)| *t == tag) {
                    tags.push((tag.clone(), String::new()));
                }
                ops.push((tag, path.clone(), method.to_string()));
            }
        }
    }
    let method_rank = |m: &str| METHODS.iter().position(|x| *x == m).unwrap_or(METHODS.len());
    ops.sort_by(|a, b| (&a.1, method_rank(&a.2)).cmp(&(&b.1, method_rank(&b.2))));
    tags.into_iter()
        .map(|(tag, desc)| {
            let mine = ops.iter().filter(|o| o.0 == tag).map(|o| (o.1.clone(), o.2.clone())).collect();
            (tag, desc, mine)
        })
        .filter(|(_, _, ops)| !Vec::is_empty(ops))
        .collect()
}

/// The whole reference.
fn render(doc: &Value) -> String {
    let mut out = String::new();
    let info = &doc["info"];
    let _ = writeln!(out, "# REST API reference\n");
    let _ = writeln!(
        out,
        "<!-- Generated from controlplane/src/api/openapi.json by controlplane/tests/rest_reference.rs: \
         do not edit by hand. Regenerate with\n     \
         STEWARD_BLESS=1 cargo test -p steward-controlplane --test rest_reference -->\n"
    );
    let _ = writeln!(
        out,
        "{} (OpenAPI {}, API version {}). Every node serves this document at `GET /v1/openapi.json`; \
         [api.md](api.md) explains the API with examples.\n",
        info["title"].as_str().unwrap_or("REST API"),
        doc["openapi"].as_str().unwrap_or("3"),
        info["version"].as_str().unwrap_or("1")
    );
    if let Some(d) = info["description"].as_str() {
        let _ = writeln!(out, "{}\n", d.trim());
    }
    if let Some(schemes) = doc.pointer("/components/securitySchemes").and_then(Value::as_object) {
        let mut names: Vec<&String> = schemes.keys().collect();
        names.sort();
        for n in names {
            let s = &schemes[n];
            let _ = writeln!(
                out,
                "Authentication `{n}`: {} {}. {}\n",
                s["type"].as_str().unwrap_or_default(),
                s["scheme"].as_str().unwrap_or_default(),
                s["description"].as_str().unwrap_or_default()
            );
        }
    }
    let groups = grouped(doc);
    let _ = writeln!(out, "## Contents\n");
    for (tag, desc, ops) in &groups {
        let sep = if desc.is_empty() { "" } else { ": " };
        let _ = writeln!(out, "- [{tag}](#{}){sep}{desc}", anchor("tag", tag));
        for (path, method) in ops {
            let summary = doc["paths"][path][method]["summary"].as_str().unwrap_or_default();
            let _ = writeln!(
                out,
                "  - [`{} {path}`](#{}): {summary}",
                method.to_ascii_uppercase(),
                anchor("op", &format!("{method} {path}"))
            );
        }
    }
    let _ = writeln!(out, "- [Schemas](#schemas)\n");
    for (tag, desc, ops) in &groups {
        let _ = writeln!(out, "<a id=\"{}\"></a>\n\n## {tag}\n", anchor("tag", tag));
        if !desc.is_empty() {
            let _ = writeln!(out, "{desc}\n");
        }
        for (path, method) in ops {
            let item = &doc["paths"][path];
            render_operation(doc, path, method, item, &item[method], &mut out);
        }
    }
    let _ = writeln!(out, "<a id=\"schemas\"></a>\n\n## Schemas\n");
    let empty = Map::new();
    let schemas = doc.pointer("/components/schemas").and_then(Value::as_object).unwrap_or(&empty);
    let mut names: Vec<&String> = schemas.keys().collect();
    names.sort();
    for name in names {
        let s = &schemas[name];
        let _ = writeln!(out, "<a id=\"{}\"></a>\n\n### {name}\n", anchor("schema", name));
        if let Some(d) = s.get("description").and_then(Value::as_str) {
            let _ = writeln!(out, "{}\n", d.trim());
        }
        schema_block(doc, s, &mut out);
        out.push('\n');
    }
    while out.ends_with("\n\n") {
        out.pop();
    }
    out
}

#[test]
fn rest_reference_is_generated_from_the_openapi_document() {
    let doc = document();
    let rendered = render(&doc);
    let path = reference_path();
    if std::env::var_os("STEWARD_BLESS").is_some() {
        std::fs::write(&path, &rendered).expect("writing docs/rest-reference.md");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == rendered,
        "docs/rest-reference.md is stale (openapi.json changed): regenerate it with \
         `STEWARD_BLESS=1 cargo test -p steward-controlplane --test rest_reference` and commit it"
    );
}

#[test]
fn every_operation_parameter_and_schema_is_in_the_reference() {
    let doc = document();
    let text = render(&doc);
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            let Some(op) = item.get(*method) else { continue };
            let heading = format!("### `{} {path}`", method.to_ascii_uppercase());
            assert!(text.contains(&heading), "{heading} missing");
            let section = text.split(&heading).nth(1).and_then(|s| s.split("\n### ").next()).unwrap_or_default();
            if let Some(s) = op["summary"].as_str() {
                assert!(section.contains(s), "{heading}: summary missing");
            }
            if let Some(d) = op["description"].as_str() {
                assert!(section.contains(d.trim()), "{heading}: description missing");
            }
            for p in item["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .chain(op["parameters"].as_array().into_iter().flatten())
            {
                let name = resolve(&doc, p)["name"].as_str().expect("parameter name");
                assert!(section.contains(&format!("| `{name}` |")), "{heading}: parameter {name} missing");
            }
            if let Some(schema) = op.get("requestBody").and_then(|b| json_schema(resolve(&doc, b))) {
                for (field, _, _) in ordered_properties(resolve(&doc, schema)) {
                    assert!(section.contains(&format!("| `{field}` |")), "{heading}: body field {field} missing");
                }
            }
            for status in op["responses"].as_object().expect("responses").keys() {
                assert!(section.contains(&format!("| {status} |")), "{heading}: response {status} missing");
            }
        }
    }
    for name in doc.pointer("/components/schemas").and_then(Value::as_object).expect("schemas").keys() {
        assert!(text.contains(&format!("### {name}\n")), "schema {name} missing");
    }
}

#[test]
fn types_read_as_words() {
    let s: Value = serde_json::json!({"type": "string", "nullable": true, "enum": ["a", "b", null], "default": "a"});
    assert_eq!(type_of(&s), "string, nullable; one of `\"a\"`, `\"b\"`; default `\"a\"`");
    let s: Value = serde_json::json!({"type": "array", "items": {"$ref": "#/components/schemas/Token"}});
    assert_eq!(type_of(&s), "array of [Token](#schema-token)");
    assert_eq!(cell("a |\n b"), "a \\| b");
}
