//! The review decision message (CONTRACT.md section 4): parsing, the checks
//! every provider shares, and the idempotency key.
//!
//! Parsing never panics and stops at the first problem, naming it, so an
//! upstream team can fix its publisher from the `invalid` outcome alone.

use serde_json::{Map, Value};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use uuid::Uuid;

pub(crate) const MAX_BODY_BYTES: usize = 64 * 1024;

/// Namespace of every UUIDv5 this service derives (idempotency keys, event ids).
pub(crate) const NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_2b0e_7a4d_4c59_9a51_3e0f_a7d2_c4b1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Approve,
    Reject,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Approve => "approve",
            Action::Reject => "reject",
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Decision {
    pub(crate) decision_id: String,
    pub(crate) provider: String,
    pub(crate) action: Action,
    pub(crate) target: Map<String, Value>,
    pub(crate) reason: Option<String>,
    /// The given key, or one derived at parse time (see [`derived_key`]).
    pub(crate) idempotency_key: String,
    pub(crate) decided_by: Option<String>,
    pub(crate) decided_at: Option<String>,
}

/// What could be read of a message that failed validation, echoed in its
/// `invalid` outcome so consumers can still correlate it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Echo {
    pub(crate) decision_id: Option<String>,
    pub(crate) provider: Option<String>,
    pub(crate) action: Option<String>,
    pub(crate) target: Option<Value>,
    pub(crate) decided_by: Option<String>,
    pub(crate) decided_at: Option<String>,
    /// The key of a decision the worker read and trusts: part of its
    /// outcome's event id, so two decisions with one `decision_id` and
    /// different targets never share an event id.
    pub(crate) idempotency_key: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct Invalid {
    pub(crate) problem: String,
    pub(crate) echo: Box<Echo>,
}

impl Decision {
    pub(crate) fn echo(&self) -> Echo {
        Echo {
            decision_id: Some(self.decision_id.clone()),
            provider: Some(self.provider.clone()),
            action: Some(self.action.as_str().to_owned()),
            target: Some(Value::Object(self.target.clone())),
            decided_by: self.decided_by.clone(),
            decided_at: self.decided_at.clone(),
            idempotency_key: Some(self.idempotency_key.clone()),
        }
    }

    pub(crate) fn target_str(&self, field: &str) -> Option<&str> {
        self.target.get(field).and_then(Value::as_str)
    }
}

/// The idempotency key of a decision that names none (CONTRACT v2 section
/// 4): a UUIDv5 of `decision_id`, `provider`, `action` and the target's
/// canonical JSON (keys sorted, no whitespace), so a redelivery reuses the
/// key while a `decision_id` reused for another target gets another.
pub fn derived_key(
    decision_id: &str,
    provider: &str,
    action: Action,
    target: &Map<String, Value>,
) -> String {
    // serde_json's map keeps keys sorted (no `preserve_order`), and its
    // compact writer adds no whitespace: that is the canonical form.
    let target = serde_json::to_string(target).unwrap_or_default();
    let name = format!("{decision_id}\n{provider}\n{}\n{target}", action.as_str());
    Uuid::new_v5(&NAMESPACE, name.as_bytes()).to_string()
}

/// A JSON value read with every object's keys checked for repeats: a body
/// with `"action":"reject", ..., "action":"approve"` means one thing to one
/// reader and another to the next, so it is refused, not read as the last
/// key wins.
struct Unique(Value);

impl<'de> serde::Deserialize<'de> for Unique {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueVisitor).map(Unique)
    }
}

struct UniqueVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Unique(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut obj = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let Unique(value) = map.next_value()?;
            if obj.contains_key(&key) {
                let shown: String = key.chars().filter(|c| !c.is_control()).take(40).collect();
                return Err(serde::de::Error::custom(format!("duplicate key {shown:?}")));
            }
            obj.insert(key, value);
        }
        Ok(Value::Object(obj))
    }
}

/// Parses and checks the provider-independent shape of a decision.
pub(crate) fn parse(body: &[u8]) -> Result<Decision, Invalid> {
    let mut echo = Echo::default();
    let fail = |echo: &Echo, problem: String| Invalid {
        problem,
        echo: Box::new(echo.clone()),
    };
    if body.len() > MAX_BODY_BYTES {
        return Err(fail(
            &echo,
            format!(
                "body is {} bytes; the limit is {MAX_BODY_BYTES}",
                body.len()
            ),
        ));
    }
    let text =
        std::str::from_utf8(body).map_err(|e| fail(&echo, format!("body is not UTF-8: {e}")))?;
    let Unique(value) = serde_json::from_str(text)
        .map_err(|e| fail(&echo, format!("body is not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(fail(&echo, "body must be a JSON object".to_owned()));
    };

    // Fill the echo first so an invalid outcome carries whatever is readable.
    let s = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_owned);
    echo.decision_id = s("decision_id").filter(|id| is_decision_id(id));
    echo.provider = s("provider");
    echo.action = s("action");
    echo.target = obj.get("target").cloned();
    echo.decided_by = s("decided_by");
    echo.decided_at = s("decided_at");

    let decision_id = required_str(&obj, "decision_id").map_err(|p| fail(&echo, p))?;
    if !is_decision_id(decision_id) {
        return Err(fail(
            &echo,
            "decision_id must be 1..128 characters of [A-Za-z0-9._:-]".to_owned(),
        ));
    }
    let provider = required_str(&obj, "provider").map_err(|p| fail(&echo, p))?;
    if provider.is_empty() {
        return Err(fail(&echo, "provider must not be empty".to_owned()));
    }
    let action = match required_str(&obj, "action").map_err(|p| fail(&echo, p))? {
        "approve" => Action::Approve,
        "reject" => Action::Reject,
        other => {
            return Err(fail(
                &echo,
                format!(
                    "action must be \"approve\" or \"reject\", got {:?}",
                    truncate(other, 40)
                ),
            ));
        }
    };
    let target = match obj.get("target") {
        Some(Value::Object(t)) => t.clone(),
        Some(_) => return Err(fail(&echo, "target must be a JSON object".to_owned())),
        None => return Err(fail(&echo, "missing required field target".to_owned())),
    };
    let reason = optional_str(&obj, "reason").map_err(|p| fail(&echo, p))?;
    let idempotency_key = optional_str(&obj, "idempotency_key").map_err(|p| fail(&echo, p))?;
    if let Some(k) = &idempotency_key
        && (k.is_empty() || k.len() > 255 || k.chars().any(char::is_control))
    {
        return Err(fail(
            &echo,
            "idempotency_key must be 1..255 characters without control characters".to_owned(),
        ));
    }
    let decided_by = optional_str(&obj, "decided_by").map_err(|p| fail(&echo, p))?;
    let decided_at = optional_str(&obj, "decided_at").map_err(|p| fail(&echo, p))?;
    if let Some(at) = &decided_at
        && OffsetDateTime::parse(at, &Rfc3339).is_err()
    {
        return Err(fail(
            &echo,
            "decided_at must be an RFC 3339 time".to_owned(),
        ));
    }
    // Derived once here: every redelivery and retry reuses the same key.
    let idempotency_key =
        idempotency_key.unwrap_or_else(|| derived_key(decision_id, provider, action, &target));
    Ok(Decision {
        decision_id: decision_id.to_owned(),
        provider: provider.to_owned(),
        action,
        target,
        reason,
        idempotency_key,
        decided_by,
        decided_at,
    })
}

fn is_decision_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

fn required_str<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a str, String> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(format!("{key} must be a string")),
        None => Err(format!("missing required field {key}")),
    }
}

fn optional_str(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("{key} must be a string")),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Checks a value that will become one URL path segment: no separators,
/// no dot segments, no control characters (it is percent-encoded later).
pub(crate) fn check_segment(field: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("target.{field} must not be empty"));
    }
    if value.len() > 256 {
        return Err(format!("target.{field} is longer than 256 characters"));
    }
    if value.contains(['/', '\\']) {
        return Err(format!("target.{field} must not contain a path separator"));
    }
    if value.chars().all(|c| c == '.') {
        return Err(format!("target.{field} must not be a dot segment"));
    }
    if value.chars().any(char::is_control) {
        return Err(format!(
            "target.{field} must not contain control characters"
        ));
    }
    Ok(())
}

/// A required string field of `target`, checked as a path segment.
pub(crate) fn target_segment<'a>(d: &'a Decision, field: &str) -> Result<&'a str, String> {
    match d.target.get(field) {
        Some(Value::String(s)) => {
            check_segment(field, s)?;
            Ok(s)
        }
        Some(_) => Err(format!("target.{field} must be a string")),
        None => Err(format!("missing required field target.{field}")),
    }
}

/// The decision's `reason`, required by some providers for a reject.
pub(crate) fn required_reason(d: &Decision, max_chars: Option<usize>) -> Result<&str, String> {
    let reason = d
        .reason
        .as_deref()
        .filter(|r| !r.trim().is_empty())
        .ok_or_else(|| {
            format!(
                "reason is required to {} on {}",
                d.action.as_str(),
                d.provider
            )
        })?;
    if let Some(max) = max_chars {
        let n = reason.chars().count();
        if n > max {
            return Err(format!(
                "reason is {n} characters; {} accepts at most {max}",
                d.provider
            ));
        }
    }
    Ok(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(json: &str) -> Decision {
        parse(json.as_bytes()).expect("valid")
    }
    fn problem(json: &[u8]) -> String {
        parse(json).expect_err("invalid").problem
    }

    const GOOD: &str = r#"{"decision_id":"d-1","provider":"acme","action":"reject",
        "target":{"request_type":"transfers","request_id":"7b6f4c1e-3c55-4a56-9f5e-0d6a1c1f2a3b"},
        "reason":"no","decided_at":"2026-11-21T10:00:00Z"}"#;

    #[test]
    fn parses_a_valid_decision() {
        let d = ok(GOOD);
        assert_eq!(d.decision_id, "d-1");
        assert_eq!(d.action, Action::Reject);
        assert_eq!(d.reason.as_deref(), Some("no"));
    }

    #[test]
    fn derived_key_is_stable_and_distinct_per_action_and_target() {
        let d = ok(GOOD);
        let target = d.target.clone();
        assert_eq!(
            d.idempotency_key,
            derived_key("d-1", "acme", Action::Reject, &target)
        );
        assert_ne!(
            d.idempotency_key,
            derived_key("d-1", "acme", Action::Approve, &target)
        );
        // The same decision_id reused for another request gets another key.
        let other = ok(&GOOD.replace("7b6f4c1e", "8c7f5d2f"));
        assert_ne!(other.idempotency_key, d.idempotency_key);
        // Key order and whitespace in the target do not matter.
        let reordered = ok(&GOOD.replace(
            r#""target":{"request_type":"transfers","request_id":"7b6f4c1e-3c55-4a56-9f5e-0d6a1c1f2a3b"}"#,
            r#""target":{ "request_id" : "7b6f4c1e-3c55-4a56-9f5e-0d6a1c1f2a3b", "request_type":"transfers" }"#,
        ));
        assert_eq!(reordered.idempotency_key, d.idempotency_key);
        // Pinned: outcome consumers and operators may compute it themselves.
        let pinned = derived_key(
            "d-1",
            "qonto",
            Action::Reject,
            serde_json::json!({"request_id": "r-1", "request_type": "transfers"})
                .as_object()
                .unwrap(),
        );
        let name = "d-1\nqonto\nreject\n{\"request_id\":\"r-1\",\"request_type\":\"transfers\"}";
        assert_eq!(
            pinned,
            Uuid::new_v5(&NAMESPACE, name.as_bytes()).to_string()
        );
        let given = ok(&GOOD.replace("\"reason\"", "\"idempotency_key\":\"k-9\",\"reason\""));
        assert_eq!(given.idempotency_key, "k-9");
    }

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        let twice = GOOD.replace(
            r#""action":"reject","#,
            r#""action":"reject","reason":"x","action":"approve","#,
        );
        let p = problem(twice.as_bytes());
        assert!(p.contains("duplicate key \"action\""), "{p}");
        let nested = GOOD.replace(
            r#""request_type":"transfers","#,
            r#""request_type":"transfers","request_type":"cards","#,
        );
        assert!(problem(nested.as_bytes()).contains("duplicate key"));
        // Equal keys in different objects are fine.
        ok(&GOOD.replace(r#""reason":"no""#, r#""reason":"no","x":{"reason":1}"#));
    }

    #[test]
    fn names_the_first_problem() {
        assert!(problem(b"\xff\xfe").contains("UTF-8"));
        assert!(problem(b"{nope").contains("not valid JSON"));
        assert!(problem(b"[1]").contains("JSON object"));
        assert!(problem(br#"{"provider":"acme"}"#).contains("decision_id"));
        assert!(problem(br#"{"decision_id":"a b","provider":"q"}"#).contains("decision_id"));
        assert!(
            problem(br#"{"decision_id":"a","provider":"q","action":"maybe","target":{}}"#)
                .contains("action")
        );
        assert!(
            problem(br#"{"decision_id":"a","provider":"q","action":"approve","target":3}"#)
                .contains("target")
        );
        assert!(
            problem(GOOD.replace("2026-11-21T10:00:00Z", "yesterday").as_bytes())
                .contains("decided_at")
        );
        let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(MAX_BODY_BYTES));
        assert!(problem(big.as_bytes()).contains("limit is 65536"));
    }

    #[test]
    fn echo_keeps_what_was_readable() {
        let err = parse(br#"{"decision_id":"d-7","provider":"acme","action":"nope","target":{}}"#)
            .unwrap_err();
        assert_eq!(err.echo.decision_id.as_deref(), Some("d-7"));
        assert_eq!(err.echo.provider.as_deref(), Some("acme"));
    }

    #[test]
    fn path_segments_reject_traversal_and_controls() {
        assert!(check_segment("id", "abc-123").is_ok());
        for bad in ["", "..", ".", "a/b", "a\\b", "a\u{0}b", "a\nb"] {
            assert!(check_segment("id", bad).is_err(), "{bad:?}");
        }
    }
}
