//! Sample decisions that the simulator accepts, for the demo, the benchmark
//! and tests: fresh random targets, so every decision meets a pending one.
//! Each target comes from its registry unit's simulator half.

use serde_json::{Value, json};

/// A valid decision for `provider` and `action` ("approve" or "reject"),
/// on a new target.
pub fn decision(provider: &str, action: &str, decision_id: &str) -> Value {
    let target = match super::unit(provider) {
        Some(unit) => unit.sim.sample_target(action),
        None => json!({"unknown_provider": provider}),
    };
    with_target(provider, action, decision_id, target)
}

/// A decision whose target the worker must refuse before any call, from the
/// first provider whose target shape allows one.
pub fn malformed(decision_id: &str) -> Option<Value> {
    crate::providers::REGISTRY.iter().find_map(|unit| {
        let (action, target) = unit.sim.malformed_target()?;
        Some(with_target(unit.name, action, decision_id, target))
    })
}

fn with_target(provider: &str, action: &str, decision_id: &str, target: Value) -> Value {
    json!({
        "decision_id": decision_id,
        "provider": provider,
        "action": action,
        "target": target,
        "reason": "Outside the approved budget",
        "decided_by": "demo@approval-worker.invalid",
        "decided_at": "2026-11-21T09:00:00Z",
    })
}

/// The key the simulator files a decision's target under.
pub fn target_key(decision: &Value) -> String {
    decision["provider"]
        .as_str()
        .and_then(super::unit)
        .and_then(|unit| unit.sim.sample_key(&decision["target"]))
        .unwrap_or_default()
}

/// The state the simulator reports for a `provider` target once a decision
/// with `action` was applied.
pub fn decided_state(provider: &str, action: &str) -> Option<&'static str> {
    super::unit(provider).map(|unit| unit.sim.decided_state(action))
}

/// Whether the worker needs an access token from `provider`'s fake.
pub fn issues_tokens(provider: &str) -> bool {
    super::unit(provider).is_some_and(|unit| unit.sim.issues_tokens())
}
