//! Sample decisions that the simulator accepts, for the demo, the benchmark
//! and tests: fresh random targets, so every decision meets a pending one.

use serde_json::{Value, json};

/// A valid decision for `provider` and `action` ("approve" or "reject"),
/// on a new target.
pub fn decision(provider: &str, action: &str, decision_id: &str) -> Value {
    let uuid = || uuid::Uuid::new_v4().to_string();
    let short = || uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let target = match provider {
        "qonto" => json!({"request_type": "transfers", "request_id": uuid()}),
        "ledger_v1" => {
            // 52 random bits: unique across a benchmark run, and exact in JSON
            // consumers that read numbers as doubles.
            let id = (uuid::Uuid::new_v4().as_u128() >> 76) as u64 + 1;
            if action == "approve" {
                json!({"transaction_id": id, "account_name": "treasury-btc", "recipient": "tb1q2tvjts80vthcywq9au2yynpezca57mvv0j7lzm",
                    "amount": "1432199", "max_fees": "2100", "coin_fields": null})
            } else {
                json!({"transaction_id": id})
            }
        }
        "ledger_v2" => json!({"request_id": uuid()}),
        "moneypipe" => {
            json!({"operation_id": format!("op-{}", short()), "tx_ids": [format!("tx-{}", short())]})
        }
        "flexpay" => json!({"reference": format!("TXN-{}", short().to_uppercase())}),
        other => json!({"unknown_provider": other}),
    };
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
    let t = &decision["target"];
    for field in ["request_id", "reference", "transaction_id"] {
        match &t[field] {
            Value::String(s) => return s.clone(),
            Value::Number(n) => return n.to_string(),
            _ => {}
        }
    }
    t["tx_ids"][0].as_str().unwrap_or_default().to_owned()
}
