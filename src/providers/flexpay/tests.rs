use serde_json::{Value, json};

use super::{client, new_id, parts, sim, sim_with};
use crate::sim::{SimConfig, SimHandle};

async fn token(sim: &SimHandle) -> String {
    let url = format!("{}/v1/auth/token", sim.base_url("flexpay"));
    let body = json!({"client_id": "sim-flexpay-client", "client_secret": "sim-flexpay-secret"});
    let (status, body) = parts(client().post(url).json(&body).send().await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["success"], true);
    assert_eq!(body["data"]["tokenType"], "Bearer");
    assert_eq!(body["data"]["expiresIn"], 3600);
    body["data"]["accessToken"].as_str().unwrap().to_owned()
}

async fn decide(
    sim: &SimHandle,
    bearer: &str,
    reference: &str,
    action: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let url = format!(
        "{}/v1/transactions/{reference}/{action}",
        sim.base_url("flexpay")
    );
    let mut request = client()
        .post(url)
        .bearer_auth(bearer)
        .header("Idempotency-Key", new_id());
    if let Some(body) = body {
        request = request.json(&body);
    }
    parts(request.send().await.unwrap()).await
}

fn reference() -> String {
    format!("TXN-{}", &new_id()[..8].to_uppercase())
}

#[tokio::test]
async fn accept_and_reject_succeed_in_the_envelope() {
    let sim = sim().await;
    let bearer = token(&sim).await;
    let (accepted, rejected) = (reference(), reference());

    let (status, body) = decide(&sim, &bearer, &accepted, "accept", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["success"].clone(), body["errorCode"].clone()),
        (json!(true), Value::Null)
    );
    assert_eq!(body["data"]["status"], "COMPLETED");
    assert!(body["data"]["acceptedAt"].is_string());

    let (status, body) = decide(
        &sim,
        &bearer,
        &rejected,
        "reject",
        Some(json!({"reason": "wrong amount"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["status"], "REJECTED");
    assert_eq!(body["data"]["rejectionReason"], "wrong amount");

    let url = format!("{}/v1/transactions/{rejected}", sim.base_url("flexpay"));
    let (_, body) = parts(client().get(url).bearer_auth(&bearer).send().await.unwrap()).await;
    assert_eq!(body["data"]["status"], "REJECTED");
    assert_eq!(sim.stats().flexpay.state_changes, 2);
    assert_eq!(sim.stats().flexpay.token_issued, 1);
}

#[tokio::test]
async fn bad_credentials_long_reason_and_conflict() {
    let sim = sim().await;
    let url = format!("{}/v1/auth/token", sim.base_url("flexpay"));
    let wrong = json!({"client_id": "sim-flexpay-client", "client_secret": "nope"});
    let (status, body) = parts(client().post(&url).json(&wrong).send().await.unwrap()).await;
    assert_eq!((status, body["success"].clone()), (401, json!(false)));
    let (status, _) = decide(&sim, "not-a-token", &reference(), "accept", None).await;
    assert_eq!(status, 401);

    let bearer = token(&sim).await;
    let r = reference();
    let long = json!({"reason": "x".repeat(501)});
    let (status, body) = decide(&sim, &bearer, &r, "reject", Some(long)).await;
    assert_eq!((status, body["success"].clone()), (400, json!(false)));
    assert_eq!(
        sim.target_state("flexpay", &r),
        None,
        "refused before reaching the target"
    );

    assert_eq!(decide(&sim, &bearer, &r, "accept", None).await.0, 200);
    let (status, body) = decide(&sim, &bearer, &r, "reject", Some(json!({"reason": "late"}))).await;
    assert_eq!(status, 400);
    assert_eq!(body["errorCode"], "TRANSACTION_NOT_PENDING");
    assert_eq!(body["message"], "Transaction is not awaiting acceptance");
    assert!(body["data"].is_null() && body["timestamp"].is_string());
    let stats = sim.stats().flexpay;
    assert_eq!((stats.double_state_changes, stats.conflicting_keys), (1, 1));
}

#[tokio::test]
async fn oauth_token_shape_and_form_body() {
    let sim = sim_with(SimConfig {
        flexpay_oauth_token_shape: true,
        ..SimConfig::default()
    })
    .await;
    let url = format!("{}/v1/auth/token", sim.base_url("flexpay"));
    let form = [
        ("client_id", "sim-flexpay-client"),
        ("client_secret", "sim-flexpay-secret"),
    ];
    let (status, body) = parts(client().post(url).form(&form).send().await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["token_type"].clone(), body["expires_in"].clone()),
        (json!("Bearer"), json!(3600))
    );
    let bearer = body["access_token"].as_str().unwrap();
    assert_eq!(
        decide(&sim, bearer, &reference(), "accept", None).await.0,
        200
    );
}

#[tokio::test]
async fn pending_list_is_a_spring_page() {
    let sim = sim().await;
    let bearer = token(&sim).await;
    let (pending, decided) = (reference(), reference());
    let base = sim.base_url("flexpay");
    // A read creates the target pending.
    let read = client()
        .get(format!("{base}/v1/transactions/{pending}"))
        .bearer_auth(&bearer);
    assert_eq!(read.send().await.unwrap().status(), 200);
    assert_eq!(decide(&sim, &bearer, &decided, "accept", None).await.0, 200);

    let url = format!("{base}/v1/transactions/pending?page=0&size=10");
    let (status, body) = parts(client().get(url).bearer_auth(&bearer).send().await.unwrap()).await;
    assert_eq!(status, 200);
    let page = &body["data"];
    assert_eq!(page["totalElements"], 1);
    assert_eq!(page["content"][0]["reference"], pending.as_str());
    assert_eq!(page["content"][0]["status"], "AWAITING_ACCEPTANCE");
}
