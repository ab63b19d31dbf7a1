use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use super::{client, new_id, parts, sim, sim_with};
use crate::jws::{DEMO_SIGNING_KEY_PEM, load_signing_key, sign_challenge};
use crate::sim::{SimConfig, SimHandle};

async fn token(sim: &SimHandle) -> Value {
    let url = format!("{}/rest/auth/token", sim.base_url("ledger_v2"));
    let body = json!({"workspace": "sim-workspace", "apiKeyId": "sim-key-id", "apiKeySecret": "sim-key-secret"});
    let (status, body) = parts(client().post(url).json(&body).send().await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn access_token(sim: &SimHandle) -> String {
    token(sim).await["accessToken"].as_str().unwrap().to_owned()
}

async fn challenge(sim: &SimHandle, bearer: &str, id: &str) -> String {
    let url = format!("{}/rest/requests/{id}/challenge", sim.base_url("ledger_v2"));
    let (status, body) = parts(client().get(url).bearer_auth(bearer).send().await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    body["challenge"].as_str().unwrap().to_owned()
}

async fn decide(
    sim: &SimHandle,
    bearer: &str,
    id: &str,
    action: &str,
    signature: &str,
) -> (u16, Value) {
    let url = format!("{}/rest/requests/{id}/{action}", sim.base_url("ledger_v2"));
    let body = json!({"data": {"signature": signature, "challengeType": "API"}});
    let request = client()
        .post(url)
        .bearer_auth(bearer)
        .header("Idempotency-Key", format!("{action}-{id}"))
        .json(&body);
    parts(request.send().await.unwrap()).await
}

async fn signed(sim: &SimHandle, bearer: &str, id: &str) -> String {
    let key = load_signing_key(DEMO_SIGNING_KEY_PEM).unwrap();
    sign_challenge(&key, &challenge(sim, bearer, id).await).unwrap()
}

#[tokio::test]
async fn token_challenge_and_signed_decisions() {
    let sim = sim().await;
    let issued = token(&sim).await;
    assert_eq!(issued["expiresInSeconds"], 300);
    assert_eq!(issued["refreshExpiresInSeconds"], 1800);
    let bearer = issued["accessToken"].as_str().unwrap();

    let approved = new_id();
    let signature = signed(&sim, bearer, &approved).await;
    let (status, body) = decide(&sim, bearer, &approved, "approve", &signature).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "APPROVED");
    assert_eq!(body["id"], approved.as_str());
    assert!(body["legacyId"].is_u64() && body["reviewSteps"].is_array());
    assert_eq!(body["reviews"][0]["status"], "APPROVED");

    let rejected = new_id();
    let signature = signed(&sim, bearer, &rejected).await;
    let (status, body) = decide(&sim, bearer, &rejected, "reject", &signature).await;
    assert_eq!((status, body["state"].clone()), (200, json!("REJECTED")));

    let url = format!("{}/rest/requests/{rejected}", sim.base_url("ledger_v2"));
    let (_, body) = parts(client().get(url).bearer_auth(bearer).send().await.unwrap()).await;
    assert_eq!(body["state"], "REJECTED");
    let stats = sim.stats().ledger_v2;
    assert_eq!((stats.state_changes, stats.token_issued), (2, 1));
}

#[tokio::test]
async fn bad_signature_and_reused_challenge_are_refused() {
    let sim = sim().await;
    let bearer = access_token(&sim).await;
    let id = new_id();
    let challenge = challenge(&sim, &bearer, &id).await;

    let other_key = p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).expect("a valid scalar");
    let forged = sign_challenge(&other_key, &challenge).unwrap();
    let (status, body) = decide(&sim, &bearer, &id, "approve", &forged).await;
    assert_eq!(status, 403);
    assert_eq!(body["code"], "INVALID_SIGNATURE");
    assert!(body["issues"].is_array());

    // Signed correctly, but over bytes the sim never issued for this request.
    let key = load_signing_key(DEMO_SIGNING_KEY_PEM).unwrap();
    let foreign = signed(&sim, &bearer, &new_id()).await;
    let (status, body) = decide(&sim, &bearer, &id, "approve", &foreign).await;
    assert_eq!(
        (status, body["code"].clone()),
        (403, json!("INVALID_CHALLENGE"))
    );

    let good = sign_challenge(&key, &challenge).unwrap();
    assert_eq!(decide(&sim, &bearer, &id, "approve", &good).await.0, 200);
    let (status, body) = decide(&sim, &bearer, &id, "approve", &good).await;
    assert_eq!(
        (status, body["code"].clone()),
        (403, json!("INVALID_CHALLENGE"))
    );

    let url = format!("{}/rest/requests/{id}/approve", sim.base_url("ledger_v2"));
    let response = client()
        .post(url)
        .bearer_auth(&bearer)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(sim.stats().ledger_v2.double_state_changes, 0);
}

#[tokio::test]
async fn second_opposite_decision_conflicts() {
    let sim = sim().await;
    let bearer = access_token(&sim).await;
    let id = new_id();
    let signature = signed(&sim, &bearer, &id).await;
    assert_eq!(
        decide(&sim, &bearer, &id, "reject", &signature).await.0,
        200
    );

    let signature = signed(&sim, &bearer, &id).await;
    let (status, body) = decide(&sim, &bearer, &id, "approve", &signature).await;
    assert_eq!(
        (status, body["code"].clone()),
        (400, json!("REQUEST_NOT_PENDING"))
    );
    let stats = sim.stats().ledger_v2;
    assert_eq!((stats.double_state_changes, stats.conflicting_keys), (1, 1));
    assert_eq!(
        sim.target_state("ledger_v2", &id).as_deref(),
        Some("REJECTED")
    );
}

#[tokio::test]
async fn unauthorized_expired_token_and_refresh() {
    let sim = sim_with(SimConfig {
        ledger_v2_access_ttl: Duration::ZERO,
        ..SimConfig::default()
    })
    .await;
    let base = sim.base_url("ledger_v2");
    let url = format!("{base}/rest/auth/token");
    let wrong =
        json!({"workspace": "sim-workspace", "apiKeyId": "sim-key-id", "apiKeySecret": "nope"});
    let (status, body) = parts(client().post(&url).json(&wrong).send().await.unwrap()).await;
    assert_eq!((status, body["code"].clone()), (401, json!("UNAUTHORIZED")));

    let issued = token(&sim).await;
    let expired = issued["accessToken"].as_str().unwrap();
    let read = format!("{base}/rest/requests/{}", new_id());
    let (status, body) = parts(
        client()
            .get(&read)
            .bearer_auth(expired)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(
        body,
        json!({"message": "Authorization not provided or expired", "code": "UNAUTHORIZED", "issues": []})
    );
    assert_eq!(client().get(&read).send().await.unwrap().status(), 401);

    let refresh = json!({"workspace": "sim-workspace", "refreshToken": issued["refreshToken"]});
    let (status, body) = parts(
        client()
            .post(format!("{base}/rest/auth/token/refresh"))
            .json(&refresh)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["accessToken"].is_string() && body["refreshToken"].is_string());
    assert_eq!(sim.stats().ledger_v2.token_issued, 2);
}

#[tokio::test]
async fn benchmarks_may_skip_the_ecdsa_check_but_not_the_challenge_check() {
    let sim = sim_with(SimConfig {
        ledger_v2_verify_signatures: false,
        ..SimConfig::default()
    })
    .await;
    let bearer = access_token(&sim).await;
    let id = new_id();
    let challenge = challenge(&sim, &bearer, &id).await;
    let other_key = p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).expect("a valid scalar");
    let foreign = sign_challenge(&other_key, &URL_SAFE_NO_PAD.encode(b"not issued")).unwrap();
    let (status, _) = decide(&sim, &bearer, &id, "approve", &foreign).await;
    assert_eq!(status, 403);
    let unchecked = sign_challenge(&other_key, &challenge).unwrap();
    assert_eq!(
        decide(&sim, &bearer, &id, "approve", &unchecked).await.0,
        200
    );
}
