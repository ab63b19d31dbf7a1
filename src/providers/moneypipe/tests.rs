use serde_json::{Value, json};

use super::{client, new_id, parts, sim};
use crate::sim::SimHandle;

const TOKEN: &str = "sim-moneypipe-token";

async fn put(sim: &SimHandle, op: &str, action: &str, token: &str, body: Value) -> (u16, Value) {
    let url = format!("{}/operations/{op}/{action}", sim.base_url("moneypipe"));
    let request = client()
        .put(url)
        .bearer_auth(token)
        .header("Idempotency-Key", format!("{action}-{op}"))
        .json(&body);
    parts(request.send().await.unwrap()).await
}

#[tokio::test]
async fn link_and_reject_succeed() {
    let sim = sim().await;
    let (op, linked, rejected) = (new_id(), new_id(), new_id());

    let (status, body) = put(
        &sim,
        &op,
        "link-transactions",
        TOKEN,
        json!({"tx_id": [linked]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let tx = &body["data"]["transactions"][0];
    assert_eq!(
        (tx["status"].clone(), tx["linked"].clone()),
        (json!("confirmed"), json!(true))
    );
    assert_eq!(body["data"]["id"], op.as_str());

    let body = json!({"tx_id": [rejected], "reason": "fraud"});
    let (status, body) = put(&sim, &op, "reject-transactions", TOKEN, body).await;
    assert_eq!(status, 200, "{body}");
    let txs = body["data"]["transactions"].as_array().unwrap();
    assert_eq!(txs.len(), 2, "the operation lists all its transactions");
    let tx = txs.iter().find(|t| t["id"] == rejected.as_str()).unwrap();
    assert_eq!(
        (tx["status"].clone(), tx["reject_reason"].clone()),
        (json!("rejected"), json!("fraud"))
    );
    assert_eq!(tx["linked"], false);

    let url = format!("{}/transactions/{rejected}", sim.base_url("moneypipe"));
    let (status, body) = parts(client().get(url).bearer_auth(TOKEN).send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(body["data"]["status"], "rejected");
    assert_eq!(body["data"]["operation_id"], op.as_str());
    assert_eq!(body["data"]["tx_id"].as_str().unwrap().len(), 64);

    let url = format!("{}/operations/{op}", sim.base_url("moneypipe"));
    let (_, body) = parts(client().get(url).bearer_auth(TOKEN).send().await.unwrap()).await;
    assert_eq!(body["data"]["transactions"].as_array().unwrap().len(), 2);
    assert_eq!(sim.stats().moneypipe.state_changes, 2);
}

#[tokio::test]
async fn auth_content_type_and_validation_errors() {
    let sim = sim().await;
    let op = new_id();
    let tx = new_id();
    let (status, body) = put(
        &sim,
        &op,
        "link-transactions",
        "wrong",
        json!({"tx_id": [tx]}),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(body["code"], 2);

    let url = format!(
        "{}/operations/{op}/link-transactions",
        sim.base_url("moneypipe")
    );
    let response = client()
        .put(url)
        .bearer_auth(TOKEN)
        .header("Content-Type", "text/plain")
        .body(format!(r#"{{"tx_id":["{tx}"]}}"#))
        .send()
        .await
        .unwrap();
    let (status, body) = parts(response).await;
    assert_eq!((status, body["code"].clone()), (415, json!(10)));

    let (status, body) = put(
        &sim,
        &op,
        "reject-transactions",
        TOKEN,
        json!({"tx_id": [tx]}),
    )
    .await;
    assert_eq!(status, 422);
    assert_eq!(body["code"], 9);
    assert!(body["errors"]["reason"].is_array());
    let (status, _) = put(&sim, &op, "link-transactions", TOKEN, json!({"tx_id": []})).await;
    assert_eq!(status, 422);

    // A transaction belongs to the operation that first named it.
    assert_eq!(
        put(
            &sim,
            &op,
            "link-transactions",
            TOKEN,
            json!({"tx_id": [tx]})
        )
        .await
        .0,
        200
    );
    let (status, body) = put(
        &sim,
        &new_id(),
        "link-transactions",
        TOKEN,
        json!({"tx_id": [tx]}),
    )
    .await;
    assert_eq!((status, body["code"].clone()), (404, json!(6)));
}

#[tokio::test]
async fn already_decided_transaction_conflicts() {
    let sim = sim().await;
    let (op, tx) = (new_id(), new_id());
    assert_eq!(
        put(
            &sim,
            &op,
            "link-transactions",
            TOKEN,
            json!({"tx_id": [tx]})
        )
        .await
        .0,
        200
    );

    let body = json!({"tx_id": [tx], "reason": "late"});
    let (status, body) = put(&sim, &op, "reject-transactions", TOKEN, body).await;
    assert_eq!(status, 422);
    assert_eq!(
        body,
        json!({"code": 9, "message": "Validation errors", "errors": {"tx_id": [format!("transaction {tx} is not pending")]}})
    );
    let stats = sim.stats().moneypipe;
    assert_eq!((stats.double_state_changes, stats.conflicting_keys), (1, 1));
    assert_eq!(
        sim.target_state("moneypipe", &tx).as_deref(),
        Some("confirmed")
    );
}
