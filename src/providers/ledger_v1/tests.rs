use serde_json::{Value, json};

use super::{client, parts, sim};
use crate::sim::SimHandle;

const KEY: &str = "sim-ledger-v1-key";

fn tx_id() -> u64 {
    rand::random::<u32>().into()
}

async fn post(sim: &SimHandle, path: &str, api_key: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = client()
        .post(format!("{}{path}", sim.base_url("ledger_v1")))
        .header("X-Ledger-API-Key", api_key)
        .header("Idempotency-Key", path);
    if let Some(body) = body {
        request = request.json(&body);
    }
    parts(request.send().await.unwrap()).await
}

fn approve_body() -> Value {
    json!({"account_name": "vault-1", "recipient": "bc1qxyz", "amount": "1500", "max_fees": null, "coin_fields": null})
}

#[tokio::test]
async fn reject_and_approve_succeed() {
    let sim = sim().await;
    let (rejected, approved) = (tx_id(), tx_id() + 1);

    let (status, body) = post(&sim, &format!("/transactions/{rejected}/reject"), KEY, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "REJECTED");
    assert_eq!(body["id"], rejected);

    let path = format!("/transactions/{approved}/approve");
    let (status, body) = post(&sim, &path, KEY, Some(approve_body())).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "APPROVED");
    assert_eq!(body["account_name"], "vault-1");
    assert_eq!(body["amount"], "1500");

    let url = format!("{}/transactions/{approved}", sim.base_url("ledger_v1"));
    let (status, body) = parts(
        client()
            .get(url)
            .header("X-Ledger-API-Key", KEY)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, body["status"].clone()), (200, json!("APPROVED")));
    assert_eq!(
        sim.target_state("ledger_v1", &rejected.to_string())
            .as_deref(),
        Some("REJECTED")
    );
    let target = sim.target("ledger_v1", &approved.to_string()).unwrap();
    assert_eq!(target.keys, [path]);
    assert_eq!(sim.stats().ledger_v1.state_changes, 2);
}

#[tokio::test]
async fn wrong_key_missing_fields_and_bad_ids_are_refused() {
    let sim = sim().await;
    let id = tx_id();
    let (status, body) = post(&sim, &format!("/transactions/{id}/reject"), "wrong", None).await;
    assert_eq!(status, 401);
    assert_eq!(body["status_code"], 401);
    assert!(body["message"].is_string() && body["name"].is_string());

    let (status, body) = post(
        &sim,
        &format!("/transactions/{id}/approve"),
        KEY,
        Some(json!({"account_name": "vault-1"})),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["status_code"], 400);

    let (status, _) = post(&sim, "/transactions/abc/reject", KEY, None).await;
    assert_eq!(status, 404);
    assert_eq!(sim.target_state("ledger_v1", &id.to_string()), None);
    assert_eq!(sim.stats().ledger_v1.state_changes, 0);
}

#[tokio::test]
async fn second_opposite_decision_conflicts() {
    let sim = sim().await;
    let id = tx_id();
    assert_eq!(
        post(&sim, &format!("/transactions/{id}/reject"), KEY, None)
            .await
            .0,
        200
    );

    let path = format!("/transactions/{id}/approve");
    let (status, body) = post(&sim, &path, KEY, Some(approve_body())).await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        json!({"message": "Transaction is not pending approval", "name": "InvalidTransactionStatus", "status_code": 400})
    );
    let stats = sim.stats().ledger_v1;
    assert_eq!(stats.double_state_changes, 1);
    assert_eq!(
        stats.conflicting_keys, 1,
        "the helper sends the path as key"
    );
    assert_eq!(
        sim.target_state("ledger_v1", &id.to_string()).as_deref(),
        Some("REJECTED")
    );
}
