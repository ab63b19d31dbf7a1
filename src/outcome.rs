//! The outcome event (CONTRACT.md section 5).

use serde::Serialize;
use serde_json::Value;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use uuid::Uuid;

use crate::decision::{Echo, NAMESPACE};

/// Provider answers are echoed for consumers, but bounded so one verbose
/// provider cannot blow up every message on the bus.
pub const MAX_PROVIDER_RESPONSE_BYTES: usize = 8 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Applied,
    AlreadyApplied,
    AwaitingConfirmation,
    Failed,
    Invalid,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Applied => "applied",
            Status::AlreadyApplied => "already_applied",
            Status::AwaitingConfirmation => "awaiting_confirmation",
            Status::Failed => "failed",
            Status::Invalid => "invalid",
        }
    }

    /// Invalid and failed decisions are parked in `P.dead`.
    pub fn is_parked(self) -> bool {
        matches!(self, Status::Failed | Status::Invalid)
    }
}

/// How a status was established.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Resolution {
    /// The provider answered the decision call.
    Call,
    /// Read back from the target's state.
    Reconciled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    Invalid,
    ProviderDisabled,
    RejectedByProvider,
    Conflict,
    Unauthorized,
    Exhausted,
    /// Delivered more often than the delivery limit allows without settling.
    Poison,
    /// A human confirmation step (a strong customer authentication session)
    /// was denied or expired.
    ConfirmationDenied,
    /// A challenge the provider gave to sign was for another action or
    /// request; nothing was signed (CONTRACT.md section 4).
    ChallengeMismatch,
    /// The decision's signature, routing key or publisher did not pass
    /// (CONTRACT v2 section 4.1).
    Unauthenticated,
    /// An authentic signature older than the maximum age.
    Stale,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Invalid => "invalid",
            ErrorKind::ProviderDisabled => "provider_disabled",
            ErrorKind::RejectedByProvider => "rejected_by_provider",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Exhausted => "exhausted",
            ErrorKind::Poison => "poison",
            ErrorKind::ConfirmationDenied => "confirmation_denied",
            ErrorKind::ChallengeMismatch => "challenge_mismatch",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::Stale => "stale",
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OutcomeError {
    pub kind: ErrorKind,
    pub message: String,
    pub http_status: Option<u16>,
    pub provider_code: Option<String>,
}

impl OutcomeError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            http_status: None,
            provider_code: None,
        }
    }
}

/// A pending human step, reported with `awaiting_confirmation`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Confirmation {
    pub kind: String,
    pub expires_at: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OutcomeEvent {
    pub event_id: Uuid,
    pub decision_id: Option<String>,
    pub provider: Option<String>,
    pub action: Option<String>,
    pub target: Option<Value>,
    pub status: Status,
    pub error: Option<OutcomeError>,
    pub provider_state: Option<String>,
    pub provider_response: Option<Value>,
    pub idempotency_key: Option<String>,
    pub attempts: u32,
    pub resolution: Option<Resolution>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confirmation: Option<Confirmation>,
    pub received_at: String,
    pub completed_at: String,
    pub decided_by: Option<String>,
    pub decided_at: Option<String>,
}

impl OutcomeEvent {
    /// `raw_body` identifies messages without a readable `decision_id`, so
    /// even their event ids are stable across redeliveries.
    pub fn new(echo: Echo, status: Status, received_at: OffsetDateTime, raw_body: &[u8]) -> Self {
        Self {
            event_id: event_id(
                echo.decision_id.as_deref(),
                echo.idempotency_key.as_deref(),
                status,
                raw_body,
            ),
            decision_id: echo.decision_id,
            provider: echo.provider,
            action: echo.action,
            target: echo.target,
            status,
            error: None,
            provider_state: None,
            provider_response: None,
            idempotency_key: echo.idempotency_key,
            attempts: 0,
            resolution: None,
            confirmation: None,
            received_at: rfc3339(received_at),
            completed_at: rfc3339(OffsetDateTime::now_utc()),
            decided_by: echo.decided_by,
            decided_at: echo.decided_at,
        }
    }

    /// `<provider>.<status>`, with `unknown` when the provider is unreadable.
    pub fn routing_key(&self) -> String {
        let provider = self
            .provider
            .as_deref()
            .filter(|p| {
                p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            })
            .filter(|p| !p.is_empty() && p.len() <= 64)
            .unwrap_or("unknown");
        format!("{provider}.{}", self.status.as_str())
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Sized for a typical event, so serializing does not regrow the buffer.
        let mut json = Vec::with_capacity(1024);
        serde_json::to_writer(&mut json, self).expect("an outcome event always serializes");
        json
    }
}

/// The event's id (CONTRACT v2 section 5): a UUIDv5 of `decision_id`, the
/// idempotency key (empty when the decision was refused before one was
/// known) and `status`, so a redelivered decision's event repeats its id and
/// a `decision_id` reused for another target does not. Without a readable
/// `decision_id`, the raw body stands in for both.
pub fn event_id(
    decision_id: Option<&str>,
    idempotency_key: Option<&str>,
    status: Status,
    raw_body: &[u8],
) -> Uuid {
    match decision_id {
        Some(id) => {
            let key = idempotency_key.unwrap_or_default();
            let name = format!("{id}\n{key}\n{}", status.as_str());
            Uuid::new_v5(&NAMESPACE, name.as_bytes())
        }
        None => {
            let mut name = raw_body.to_vec();
            name.extend_from_slice(b"\n");
            name.extend_from_slice(status.as_str().as_bytes());
            Uuid::new_v5(&NAMESPACE, &name)
        }
    }
}

pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// Keeps a provider answer whole when small, else a truncated string of it.
pub fn bound_response(v: Value) -> Value {
    if fits(&v) { v } else { truncated(&v) }
}

/// The same bound for an answer that stays with its owner: only what is
/// kept is copied, so a large answer is never duplicated in full.
pub fn bounded_copy(v: &Value) -> Value {
    if fits(v) { v.clone() } else { truncated(v) }
}

/// Whether `v`'s JSON text is within the bound. Most answers are small:
/// measure them without building their text.
fn fits(v: &Value) -> bool {
    serde_json::to_writer(SizeLimit(MAX_PROVIDER_RESPONSE_BYTES), v).is_ok()
}

/// `{"truncated": true, "bytes": <full size>, "prefix": <start of the text>}`,
/// whose own JSON stays within the bound (the prefix is cut so that its
/// escaped form fits), so bounding it again changes nothing.
fn truncated(v: &Value) -> Value {
    let mut head = Head {
        kept: Vec::with_capacity(MAX_PROVIDER_RESPONSE_BYTES),
        total: 0,
    };
    serde_json::to_writer(&mut head, v).expect("writing to memory cannot fail");
    let text = match std::str::from_utf8(&head.kept) {
        Ok(text) => text,
        // Cut inside a character: keep what precedes it.
        Err(e) => std::str::from_utf8(&head.kept[..e.valid_up_to()]).unwrap_or_default(),
    };
    // Room for the wrapper's keys, the size and the quotes.
    let mut room = MAX_PROVIDER_RESPONSE_BYTES - 64;
    let mut cut = 0;
    for (i, c) in text.char_indices() {
        let escaped = match c {
            '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
            c if c < ' ' => 6,
            c => c.len_utf8(),
        };
        let Some(left) = room.checked_sub(escaped) else {
            break;
        };
        room = left;
        cut = i + c.len_utf8();
    }
    serde_json::json!({ "truncated": true, "bytes": head.total, "prefix": &text[..cut] })
}

/// A writer that accepts up to its budget of bytes and fails past it.
struct SizeLimit(usize);

impl std::io::Write for SizeLimit {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 = self
            .0
            .checked_sub(buf.len())
            .ok_or_else(|| std::io::Error::other("over the size limit"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A writer that keeps the first [`MAX_PROVIDER_RESPONSE_BYTES`] and counts
/// the rest.
struct Head {
    kept: Vec<u8>,
    total: usize,
}

impl std::io::Write for Head {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let room = MAX_PROVIDER_RESPONSE_BYTES.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&buf[..buf.len().min(room)]);
        self.total += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_id_is_stable_per_decision_key_and_status() {
        let k = Some("k1");
        let a = event_id(Some("d1"), k, Status::Applied, b"x");
        assert_eq!(a, event_id(Some("d1"), k, Status::Applied, b"other body"));
        assert_ne!(a, event_id(Some("d1"), k, Status::Failed, b"x"));
        assert_ne!(a, event_id(Some("d2"), k, Status::Applied, b"x"));
        assert_ne!(
            a,
            event_id(Some("d1"), Some("k2"), Status::Applied, b"x"),
            "another target (so another key) under a reused decision_id"
        );
        assert_eq!(
            a,
            Uuid::new_v5(&NAMESPACE, b"d1\nk1\napplied"),
            "pinned for consumers"
        );
        assert_eq!(
            event_id(None, None, Status::Invalid, b"b"),
            event_id(None, None, Status::Invalid, b"b")
        );
        let e = OutcomeEvent::new(
            Echo {
                decision_id: Some("d1".into()),
                idempotency_key: Some("k1".into()),
                ..Echo::default()
            },
            Status::Applied,
            OffsetDateTime::now_utc(),
            b"",
        );
        assert_eq!((e.event_id, e.idempotency_key.as_deref()), (a, Some("k1")));
    }

    #[test]
    fn resolution_serialises_to_the_contract_strings() {
        assert_eq!(serde_json::json!(Resolution::Call), "call");
        assert_eq!(serde_json::json!(Resolution::Reconciled), "reconciled");
    }

    #[test]
    fn routing_key_falls_back_to_unknown() {
        let mut e = OutcomeEvent::new(
            Echo::default(),
            Status::Invalid,
            OffsetDateTime::now_utc(),
            b"",
        );
        assert_eq!(e.routing_key(), "unknown.invalid");
        e.provider = Some("acme".into());
        assert_eq!(e.routing_key(), "acme.invalid");
        e.provider = Some("a.#".into());
        assert_eq!(e.routing_key(), "unknown.invalid");
    }

    /// Quotes and control characters grow when escaped: the truncated form
    /// still fits the bound, so bounding it again changes nothing, and a
    /// borrowed answer gets the same bound without being copied whole.
    #[test]
    fn truncation_fits_the_bound_and_is_stable() {
        for filler in ["\"", "\u{1}", "é", "y"] {
            let big = serde_json::json!({ "x": filler.repeat(40_000) });
            let bounded = bounded_copy(&big);
            assert_eq!(bounded["truncated"], true);
            let size = serde_json::to_string(&bounded).unwrap().len();
            assert!(size <= MAX_PROVIDER_RESPONSE_BYTES, "{filler:?}: {size}");
            assert_eq!(bound_response(bounded.clone()), bounded, "{filler:?}");
            assert_eq!(bound_response(big.clone()), bounded, "{filler:?}");
            assert_eq!(bounded["bytes"], big.to_string().len());
        }
        let small = serde_json::json!({ "a": [1, 2] });
        assert_eq!(bounded_copy(&small), small);
    }

    #[test]
    fn large_responses_are_bounded() {
        let big = serde_json::json!({ "x": "y".repeat(50_000) });
        let bounded = bound_response(big);
        assert!(bounded.to_string().len() < MAX_PROVIDER_RESPONSE_BYTES + 200);
        assert_eq!(bounded["truncated"], true);
        let small = serde_json::json!({ "a": 1 });
        assert_eq!(bound_response(small.clone()), small);
        // Exactly at the limit stays whole; one byte more is cut.
        let pad = MAX_PROVIDER_RESPONSE_BYTES - r#"{"x":""}"#.len();
        let at_limit = serde_json::json!({ "x": "y".repeat(pad) });
        assert_eq!(bound_response(at_limit.clone()), at_limit);
        let over = serde_json::json!({ "x": "y".repeat(pad + 1) });
        assert_eq!(bound_response(over)["truncated"], true);
    }
}
