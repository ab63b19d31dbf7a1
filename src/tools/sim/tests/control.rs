use serde_json::{Value, json};

use crate::tools::sim::testkit::{client, new_id, parts, sim};
use crate::tools::sim::{ProviderStats, SimStats, providers};

/// Each provider's `tests.rs` checks its own credentials; here, that every
/// variable belongs to a unit and every unit gets its base URL.
#[tokio::test]
async fn worker_env_points_every_unit_at_the_sim() {
    let sim = sim().await;
    let env: std::collections::HashMap<String, String> = sim.worker_env().into_iter().collect();
    for provider in providers() {
        let key = format!("APPROVAL_PROVIDERS__{}__BASE_URL", provider.to_uppercase());
        assert_eq!(env[&key], sim.base_url(provider));
        assert!(sim.base_url(provider).starts_with(&sim.root_url()));
    }
    for key in env.keys() {
        let unit = key
            .strip_prefix("APPROVAL_PROVIDERS__")
            .and_then(|rest| rest.split_once("__"))
            .map(|(unit, _)| unit.to_lowercase());
        assert!(
            unit.is_some_and(|unit| providers().contains(&unit.as_str())),
            "{key}"
        );
    }
}

#[tokio::test]
async fn control_endpoints_drive_faults_sca_targets_and_reset() {
    let sim = sim().await;
    let root = sim.root_url();
    let id = new_id();
    let decline = || {
        client()
            .post(format!("{root}/qonto/v2/requests/transfers/{id}/decline"))
            .header("Authorization", "sim-qonto:sim-qonto-secret")
            .header("X-Qonto-Idempotency-Key", "k")
            .json(&json!({"declined_note": "no"}))
    };

    let faults_url = format!("{root}/_sim/faults/qonto");
    let response = client()
        .put(&faults_url)
        .json(&json!({"down": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(decline().send().await.unwrap().status(), 503);
    let (_, current) = parts(client().get(&faults_url).send().await.unwrap()).await;
    assert_eq!(current["down"], true);
    let typo = client()
        .put(&faults_url)
        .json(&json!({"dwon": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(typo.status(), 400);
    let bad_ratio = client()
        .put(&faults_url)
        .json(&json!({"error_rate": 2.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_ratio.status(), 400);
    assert_eq!(
        client()
            .put(&faults_url)
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(decline().send().await.unwrap().status(), 200);

    let (status, target) = parts(
        client()
            .get(format!("{root}/_sim/targets/qonto/{id}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(target["state"], "declined");
    assert_eq!(target["keys"], json!(["k"]));
    let unknown = client()
        .get(format!("{root}/_sim/targets/qonto/{}", new_id()))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    let (status, stats) = parts(
        client()
            .get(format!("{root}/_sim/stats"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    let stats: SimStats = serde_json::from_value(stats).unwrap();
    assert_eq!(stats, sim.stats());
    assert_eq!(
        stats.provider("qonto").unwrap().calls,
        2,
        "control calls are not counted"
    );
    assert_eq!(stats.total().state_changes, 1);

    let sca_id = new_id();
    let sca = json!({"request_id": sca_id, "auto": "allow", "after_ms": 0});
    let response = client()
        .post(format!("{root}/_sim/qonto/sca"))
        .json(&sca)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let approve = client()
        .post(format!(
            "{root}/qonto/v2/requests/transfers/{sca_id}/approve"
        ))
        .header("Authorization", "sim-qonto:sim-qonto-secret")
        .header("X-Qonto-Idempotency-Key", "sca");
    let (status, body) = parts(approve.send().await.unwrap()).await;
    assert_eq!(status, 428);
    assert!(body["sca_session_token"].is_string());

    let response = client()
        .post(format!("{root}/_sim/reset"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(sim.target_state("qonto", &id), None);
    let stats = sim.stats();
    assert_eq!(stats.0.len(), providers().len());
    assert!(stats.0.values().all(|p| *p == ProviderStats::default()));
    // The idempotency cache was cleared too: the key is processed afresh.
    let (status, body): (u16, Value) = parts(decline().send().await.unwrap()).await;
    assert_eq!(
        (status, body["request_transfer"]["status"].clone()),
        (200, json!("declined"))
    );
}
