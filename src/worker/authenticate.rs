//! Who may decide (CONTRACT v2 section 4.1): the signature, checked before
//! the body is read, and the routing key and publisher, once it is.
//!
//! A refusal in `enforce` mode settles the decision as `invalid` without a
//! provider call; `monitor` logs and counts it and goes on; `off` checks
//! nothing.

use tracing::warn;

use crate::{
    authn::{self, Batcher, FailureKind, SignatureHeaders},
    broker::{History, Origin},
    decision::{self, Decision, Echo},
    outcome::ErrorKind,
    settings::{AuthMode, AuthSettings},
};

/// Why a decision may not move money.
pub(super) struct Refusal {
    pub(super) kind: ErrorKind,
    pub(super) problem: String,
}

impl Refusal {
    fn unauthenticated(problem: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Unauthenticated,
            problem: problem.into(),
        }
    }
}

/// The signature over the body as received. Its age is measured from the
/// first receipt our hop MAC vouches for (now, for anything else), so a
/// retry copy of a decision that was in time stays in time.
pub(super) async fn signature(
    auth: &AuthSettings,
    batcher: &Batcher,
    signature: SignatureHeaders<'_>,
    origin: &Origin<'_>,
    body: &[u8],
    history: &History,
) -> Result<(), Refusal> {
    if auth.keys.is_empty() {
        return Err(Refusal::unauthenticated(
            "no trusted signing key is configured (APPROVAL_AUTH__KEYS)",
        ));
    }
    let verified = authn::verify_batched(
        batcher,
        &auth.keys,
        signature,
        body,
        history.first_received_at,
        auth.max_age,
    )
    .await
    .map_err(|e| Refusal {
        kind: match e.kind() {
            FailureKind::Stale => ErrorKind::Stale,
            FailureKind::Unauthenticated => ErrorKind::Unauthenticated,
        },
        problem: e.message().to_owned(),
    })?;
    // Which key vouched: operators remove an old key once this stops
    // counting for it (README, rotating a key).
    metrics::counter!("approval_verified_total", "key" => key_label(verified.key)).increment(1);
    // Only upstream's own publish is stamped at its signing time; the
    // worker's copies are stamped when the worker republished them.
    if origin.via_decisions_exchange
        && let Some(stamp) = origin.ingress
    {
        verified
            .check_ingress(stamp)
            .map_err(|e| Refusal::unauthenticated(e.message().to_owned()))?;
    }
    Ok(())
}

/// A key's 1-based position in `APPROVAL_AUTH__KEYS` as a metric label,
/// without an allocation per decision.
fn key_label(position: usize) -> &'static str {
    const LABELS: [&str; authn::keys::MAX_KEYS] = [
        "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    position
        .checked_sub(1)
        .and_then(|i| LABELS.get(i))
        .copied()
        .unwrap_or("other")
}

/// What only the read body can tell: on a delivery through the decisions
/// exchange the routing key is `<provider>.<action>` of the body, so the
/// broker's topic permissions decide who may publish what; and, when a
/// list is configured, the broker-validated `user_id` is on it.
pub(super) fn publisher(
    auth: &AuthSettings,
    origin: &Origin<'_>,
    decision: &Decision,
) -> Result<(), Refusal> {
    if !origin.via_decisions_exchange {
        return Ok(());
    }
    // Compared in place, without a string per decision.
    let (provider, action) = (decision.provider.as_str(), decision.action.as_str());
    let matches = origin
        .routing_key
        .split_once('.')
        .is_some_and(|(p, a)| p == provider && a == action);
    if !matches {
        let expected = format!("{provider}.{action}");
        let shown: String = origin
            .routing_key
            .chars()
            .filter(|c| !c.is_control())
            .take(80)
            .collect();
        return Err(Refusal::unauthenticated(format!(
            "routing key {shown:?} does not match the decision ({expected})"
        )));
    }
    if auth.allowed_user_ids.is_empty() {
        return Ok(());
    }
    match origin.user_id {
        Some(user) if auth.allowed_user_ids.iter().any(|u| u == user) => Ok(()),
        Some(_) => Err(Refusal::unauthenticated(
            "the publishing user (user_id) may not decide",
        )),
        None => Err(Refusal::unauthenticated(
            "no user_id property: the publishing user cannot be checked",
        )),
    }
}

/// Applies the mode to a check's result: `Err` only when the decision must
/// not be applied.
pub(super) fn judged(mode: AuthMode, checked: Result<(), Refusal>) -> Result<(), Refusal> {
    let Err(refusal) = checked else {
        return Ok(());
    };
    metrics::counter!("approval_unauthenticated_total", "kind" => refusal.kind.as_str(), "mode" => mode.as_str())
        .increment(1);
    match mode {
        AuthMode::Enforce => Err(refusal),
        AuthMode::Monitor | AuthMode::Off => {
            warn!(
                error_kind = refusal.kind.as_str(),
                problem = %refusal.problem,
                "decision not authenticated; applied anyway (APPROVAL_AUTH__MODE=monitor)"
            );
            Ok(())
        }
    }
}

/// What an outcome can echo of a body refused before it was read. Not its
/// key: an unauthenticated body's outcome then never shares an event id
/// with the outcome of a decision the worker trusted, so a forged copy
/// cannot make consumers drop the genuine event as a duplicate.
pub(super) fn echo(body: &[u8]) -> Echo {
    let echo = match decision::parse(body) {
        Ok(d) => d.echo(),
        Err(e) => *e.echo,
    };
    Echo {
        idempotency_key: None,
        ..echo
    }
}

#[cfg(test)]
mod tests {
    use time::OffsetDateTime;

    use crate::outcome::{OutcomeEvent, Status};
    use crate::tools::sim::samples;

    /// A forged, unsigned copy of a decision and the decision itself,
    /// refused after it was read (its provider disabled, say), announce
    /// different events: consumers dropping duplicates by event id keep
    /// both.
    #[test]
    fn each_key_position_has_its_label() {
        assert_eq!(super::key_label(1), "1");
        assert_eq!(super::key_label(16), "16");
        assert_eq!(super::key_label(0), "other");
        assert_eq!(super::key_label(17), "other");
    }

    #[test]
    fn an_unauthenticated_body_never_shares_an_event_id_with_a_trusted_one() {
        let body = serde_json::to_vec(&samples::decision("qonto", "approve", "d-1")).unwrap();
        let trusted = crate::decision::parse(&body).unwrap().echo();
        let forged = super::echo(&body);
        assert_eq!(forged.decision_id.as_deref(), Some("d-1"));
        assert_eq!(forged.idempotency_key, None);
        let now = OffsetDateTime::now_utc();
        let a = OutcomeEvent::new(trusted, Status::Invalid, now, &body);
        let b = OutcomeEvent::new(forged, Status::Invalid, now, &body);
        assert_ne!(a.event_id, b.event_id);
    }
}
