//! Pure validation of product requests, so every rule has a unit test and a message that says
//! what to send instead.

use serde::Deserialize;

use super::error::ApiError;

/// Body of `POST /v1/teams`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTeam {
    pub name: String,
    #[serde(default)]
    pub contact: String,
}

/// Body of `POST /v1/databases`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewDatabase {
    pub name: String,
    /// Defaults to the caller's team for team tokens; required with the admin token.
    pub owner: Option<String>,
    #[serde(default)]
    pub purpose: String,
    pub plan: Option<String>,
    pub availability: Option<String>,
    pub backup_retention_days: Option<i64>,
}

/// A database request that passed validation, with defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidDatabase {
    pub name: String,
    pub purpose: String,
    pub plan: String,
    pub availability: String,
    pub backup_retention_days: i64,
}

/// Plans a database can be created with.
pub const PLANS: &[&str] = &["small", "medium", "large"];
const RESERVED: &[&str] = &["postgres", "template0", "template1", "public"];

/// Checks a PostgreSQL-safe lowercase identifier: it becomes a database and role name.
pub fn identifier(kind: &str, s: &str) -> Result<(), ApiError> {
    let ok_start = s.chars().next().is_some_and(|c| c.is_ascii_lowercase());
    let ok_chars = s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if s.is_empty() || s.len() > 48 || !ok_start || !ok_chars {
        return Err(ApiError::Unprocessable(format!(
            "{kind} '{s}' is not valid: use 1-48 characters, lowercase letters, digits and '_', starting with a letter"
        )));
    }
    if RESERVED.contains(&s) || s.starts_with("pg_") || s.starts_with("steward") {
        return Err(ApiError::Unprocessable(format!(
            "{kind} '{s}' is reserved: names 'postgres', 'template0', 'template1', 'public' and prefixes 'pg_', 'steward' are taken by the platform"
        )));
    }
    Ok(())
}

/// Validates a team name: lowercase letters, digits, '-' and '_'.
pub fn team_name(s: &str) -> Result<(), ApiError> {
    let ok_start = s.chars().next().is_some_and(|c| c.is_ascii_lowercase());
    let ok_chars = s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if s.is_empty() || s.len() > 63 || !ok_start || !ok_chars {
        return Err(ApiError::Unprocessable(format!(
            "team name '{s}' is not valid: use 1-63 characters, lowercase letters, digits, '-' and '_', starting with a letter"
        )));
    }
    Ok(())
}

/// Validates a database request and fills in defaults.
pub fn database(req: &NewDatabase) -> Result<ValidDatabase, ApiError> {
    identifier("database name", &req.name)?;
    let purpose = req.purpose.trim();
    if purpose.is_empty() {
        return Err(ApiError::Unprocessable(
            "purpose must not be empty: say in a sentence what this database is for, e.g. \"orders of the web shop\""
                .into(),
        ));
    }
    // Characters, not bytes, as the message (and the OpenAPI document's maxLength) says.
    if purpose.chars().count() > 1000 {
        return Err(ApiError::Unprocessable("purpose is longer than 1000 characters".into()));
    }
    let plan = req.plan.clone().unwrap_or_else(|| "small".into());
    if !PLANS.contains(&plan.as_str()) {
        return Err(ApiError::Unprocessable(format!("plan '{plan}' is unknown: choose one of {}", PLANS.join(", "))));
    }
    let availability = req.availability.clone().unwrap_or_else(|| "single".into());
    match availability.as_str() {
        "single" | "ha" => {}
        other => {
            return Err(ApiError::Unprocessable(format!("availability '{other}' is unknown: choose 'single' or 'ha'")))
        }
    }
    let days = req.backup_retention_days.unwrap_or(7);
    if !(1..=3650).contains(&days) {
        return Err(ApiError::Unprocessable(format!("backup_retention_days {days} is out of range 1..=3650")));
    }
    Ok(ValidDatabase {
        name: req.name.clone(),
        purpose: purpose.to_string(),
        plan,
        availability,
        backup_retention_days: days,
    })
}

/// Body of `POST /v1/databases/{id}/restore`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// RFC 3339; absent: the latest point the archive holds.
    pub target_time: Option<String>,
    /// Name of the new database; default `<source name>_<UTC timestamp of the target>`.
    pub name: Option<String>,
}

/// A restore request that passed validation: the target (None: latest) and the new name.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRestore {
    pub target_time: Option<chrono::DateTime<chrono::Utc>>,
    pub name: String,
}

/// Validates a point-in-time copy of a database created at `created_at` whose cluster's first
/// successful backup finished at `first_backup` (RFC 3339), at `now`.
pub fn restore(
    req: &RestoreRequest,
    source_name: &str,
    created_at: &str,
    first_backup: Option<&str>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<ValidRestore, ApiError> {
    let parse = |t: &str| chrono::DateTime::parse_from_rfc3339(t).map(|t| t.with_timezone(&chrono::Utc));
    let target_time = match req.target_time.as_deref() {
        None => None,
        Some(t) => Some(parse(t).map_err(|e| {
            ApiError::Unprocessable(format!(
                "target_time '{t}' is not an RFC 3339 time such as 2026-11-25T10:15:00Z: {e}"
            ))
        })?),
    };
    if let Some(t) = target_time {
        if t > now {
            return Err(ApiError::Unprocessable(format!(
                "target_time {t} is in the future; leave it out for the latest state"
            )));
        }
        if parse(created_at).is_ok_and(|c| t < c) {
            return Err(ApiError::Unprocessable(format!(
                "target_time {t} is before the database was created ({created_at})"
            )));
        }
    }
    let Some(first) = first_backup else {
        return Err(ApiError::Conflict(
            "this database has no backup yet, so it cannot be restored: backups run on the control plane's schedule \
             (an operator can start one now with `stewardctl cluster backup <cluster>`)"
                .into(),
        ));
    };
    if let (Some(t), Ok(f)) = (target_time, parse(first)) {
        if t < f {
            return Err(ApiError::Conflict(format!(
                "the earliest point this database can be restored to is {first}, when its first backup finished"
            )));
        }
    }
    let name = match &req.name {
        Some(n) => n.clone(),
        None => {
            let stamp = target_time.unwrap_or(now).format("%Y%m%d%H%M%S").to_string();
            let keep = 48 - stamp.len() - 1;
            format!("{}_{stamp}", &source_name[..source_name.len().min(keep)])
        }
    };
    identifier("database name", &name)?;
    Ok(ValidRestore { target_time, name })
}

/// Body of `POST /v1/databases/{id}/deprecate`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeprecateRequest {
    pub reason: String,
    /// RFC 3339: when the database is planned to go away.
    pub sunset_at: String,
}

/// Checks a deprecation: a reason, and a sunset time that is not in the past. Returns the
/// normalized sunset time.
pub fn deprecation(req: &DeprecateRequest, now: chrono::DateTime<chrono::Utc>) -> Result<String, ApiError> {
    let reason = req.reason.trim();
    if reason.is_empty() || reason.chars().count() > 1000 {
        return Err(ApiError::Unprocessable(
            "reason must be 1-1000 characters: say why the database goes away and what replaces it".into(),
        ));
    }
    let sunset = chrono::DateTime::parse_from_rfc3339(&req.sunset_at).map_err(|e| {
        ApiError::Unprocessable(format!(
            "sunset_at '{}' is not an RFC 3339 time such as 2027-03-31T00:00:00Z: {e}",
            req.sunset_at
        ))
    })?;
    if sunset.with_timezone(&chrono::Utc) < now {
        return Err(ApiError::Unprocessable(format!("sunset_at {} is in the past", req.sunset_at)));
    }
    Ok(sunset.with_timezone(&chrono::Utc).to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

/// Body of `POST /v1/databases/{id}/transfer`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferRequest {
    pub owner: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deprecations() {
        let now: chrono::DateTime<chrono::Utc> = "2026-11-25T12:00:00Z".parse().unwrap();
        let d = |reason: &str, sunset: &str| DeprecateRequest { reason: reason.into(), sunset_at: sunset.into() };
        assert_eq!(
            deprecation(&d("moved to orders_v2", "2027-01-01T01:00:00+01:00"), now).unwrap(),
            "2027-01-01T00:00:00Z"
        );
        assert!(deprecation(&d(" ", "2027-01-01T00:00:00Z"), now).unwrap_err().to_string().contains("reason"));
        assert!(deprecation(&d("x", "next year"), now).unwrap_err().to_string().contains("RFC 3339"));
        assert!(deprecation(&d("x", "2026-01-01T00:00:00Z"), now).unwrap_err().to_string().contains("past"));
    }

    #[test]
    fn restore_requests() {
        let now: chrono::DateTime<chrono::Utc> = "2026-11-25T12:00:00Z".parse().unwrap();
        let created = "2026-11-20T00:00:00.000Z";
        let first = Some("2026-11-21T00:00:00.000Z");
        let r = |t: Option<&str>, n: Option<&str>| RestoreRequest {
            target_time: t.map(Into::into),
            name: n.map(Into::into),
        };
        let ok = restore(&r(Some("2026-11-24T10:15:00+01:00"), None), "orders", created, first, now).unwrap();
        assert_eq!(ok.name, "orders_20261124091500");
        assert_eq!(ok.target_time.unwrap().to_rfc3339(), "2026-11-24T09:15:00+00:00");
        let latest = restore(&r(None, Some("orders_copy")), "orders", created, first, now).unwrap();
        assert_eq!((latest.target_time, latest.name.as_str()), (None, "orders_copy"));
        let long = restore(&r(None, None), &"x".repeat(48), created, first, now).unwrap();
        assert_eq!(long.name.len(), 48);
        let err = |t: Option<&str>, n: Option<&str>, first: Option<&str>| {
            restore(&r(t, n), "orders", created, first, now).unwrap_err().to_string()
        };
        assert!(err(Some("yesterday"), None, first).contains("RFC 3339"));
        assert!(err(Some("2026-11-26T00:00:00Z"), None, first).contains("future"));
        assert!(err(Some("2026-11-19T00:00:00Z"), None, first).contains("before the database was created"));
        assert!(err(Some("2026-11-20T12:00:00Z"), None, first).contains("earliest point"));
        assert!(err(None, None, None).contains("no backup yet"));
        assert!(err(None, Some("Bad-Name"), first).contains("not valid"));
    }

    fn req(name: &str, purpose: &str) -> NewDatabase {
        NewDatabase {
            name: name.into(),
            owner: None,
            purpose: purpose.into(),
            plan: None,
            availability: None,
            backup_retention_days: None,
        }
    }

    #[test]
    fn defaults_are_filled_in() {
        let v = database(&req("orders", "web shop orders")).unwrap();
        assert_eq!(v.plan, "small");
        assert_eq!(v.availability, "single");
        assert_eq!(v.backup_retention_days, 7);
    }

    #[test]
    fn rejects_bad_names_and_empty_purpose() {
        for bad in ["", "Orders", "1abc", "a-b", "postgres", "pg_x", "steward_x", &"a".repeat(49)] {
            assert!(matches!(database(&req(bad, "p")), Err(ApiError::Unprocessable(_))), "{bad}");
        }
        let e = database(&req("ok", "   ")).unwrap_err();
        assert!(e.to_string().contains("purpose must not be empty"));
        // 1000 characters is the limit, however many bytes they take.
        assert!(database(&req("ok", &"é".repeat(1000))).is_ok());
        assert!(database(&req("ok", &"é".repeat(1001))).is_err());
    }

    #[test]
    fn rejects_unknown_plan_availability_and_retention() {
        let mut r = req("ok", "p");
        r.plan = Some("huge".into());
        assert!(database(&r).is_err());
        let mut r = req("ok", "p");
        r.availability = Some("multi".into());
        assert!(database(&r).is_err());
        let mut r = req("ok", "p");
        r.backup_retention_days = Some(0);
        assert!(database(&r).is_err());
    }

    #[test]
    fn team_names() {
        assert!(team_name("payments-eu").is_ok());
        assert!(team_name("Payments").is_err());
        assert!(team_name("").is_err());
    }
}
