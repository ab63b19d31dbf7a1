use std::time::{Duration, Instant};

use serde_json::json;

use crate::tools::sim::testkit::{client, new_id, parts, sim, sim_with};
use crate::tools::sim::{Faults, SimConfig, SimHandle};

const QONTO_AUTH: &str = "sim-qonto:sim-qonto-secret";

fn decline(sim: &SimHandle, id: &str, key: &str) -> reqwest::RequestBuilder {
    client()
        .post(format!(
            "{}/v2/requests/transfers/{id}/decline",
            sim.base_url("qonto")
        ))
        .header("Authorization", QONTO_AUTH)
        .header("X-Qonto-Idempotency-Key", key)
        .json(&json!({"declined_note": "no"}))
}

fn moneypipe_read(sim: &SimHandle) -> reqwest::RequestBuilder {
    client()
        .get(format!(
            "{}/transactions/{}",
            sim.base_url("moneypipe"),
            new_id()
        ))
        .bearer_auth("sim-moneypipe-token")
}

#[tokio::test]
async fn error_rate_one_answers_before_any_state_change() {
    let sim = sim().await;
    sim.set_faults(
        "qonto",
        Faults {
            error_rate: 1.0,
            ..Faults::default()
        },
    );
    let id = new_id();
    let (status, body) = parts(decline(&sim, &id, "k").send().await.unwrap()).await;
    assert_eq!(status, 503);
    assert_eq!(body["errors"][0]["code"], "service_unavailable");
    assert_eq!(sim.target_state("qonto", &id), None);

    sim.set_faults(
        "qonto",
        Faults {
            error_rate: 1.0,
            error_status: 500,
            ..Faults::default()
        },
    );
    assert_eq!(decline(&sim, &id, "k").send().await.unwrap().status(), 500);

    sim.set_faults("qonto", Faults::default());
    assert_eq!(decline(&sim, &id, "k").send().await.unwrap().status(), 200);
    let stats = sim.stats().provider("qonto").unwrap().clone();
    assert_eq!((stats.state_changing_calls, stats.state_changes), (3, 1));
    assert_eq!(stats.by_status.get(&503), Some(&1));
}

#[tokio::test]
async fn down_fails_reads_and_decisions_but_not_auth_unless_asked() {
    let mut faults = SimConfig::default();
    let down = Faults {
        down: true,
        ..Faults::default()
    };
    faults.faults.insert("moneypipe".into(), down);
    faults.faults.insert("flexpay".into(), down);
    let sim = sim_with(faults).await;

    let (status, body) = parts(moneypipe_read(&sim).send().await.unwrap()).await;
    assert_eq!((status, body["code"].clone()), (503, json!(0)));

    let token_url = format!("{}/v1/auth/token", sim.base_url("flexpay"));
    let credentials =
        json!({"client_id": "sim-flexpay-client", "client_secret": "sim-flexpay-secret"});
    let (status, body) = parts(
        client()
            .post(&token_url)
            .json(&credentials)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    let bearer = body["data"]["accessToken"].as_str().unwrap();
    let accept = format!("{}/v1/transactions/TXN-1/accept", sim.base_url("flexpay"));
    let (status, body) = parts(
        client()
            .post(&accept)
            .bearer_auth(bearer)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, body["success"].clone()), (503, json!(false)));

    sim.set_faults(
        "flexpay",
        Faults {
            include_auth: true,
            ..down
        },
    );
    let response = client()
        .post(&token_url)
        .json(&credentials)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
}

#[tokio::test]
async fn latency_is_added_to_each_call() {
    let sim = sim().await;
    sim.set_faults(
        "moneypipe",
        Faults {
            latency_ms: 150,
            ..Faults::default()
        },
    );
    let started = Instant::now();
    assert_eq!(moneypipe_read(&sim).send().await.unwrap().status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(150));

    sim.set_faults(
        "moneypipe",
        Faults {
            tail_latency_ms: 150,
            tail_ratio: 1.0,
            ..Faults::default()
        },
    );
    let started = Instant::now();
    assert_eq!(moneypipe_read(&sim).send().await.unwrap().status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn rate_limits_use_429_or_ledger_v1_420() {
    let sim = sim().await;
    let limited = Faults {
        rate_limit_ratio: 1.0,
        retry_after_secs: 7,
        ..Faults::default()
    };
    sim.set_faults("qonto", limited);
    sim.set_faults("ledger_v1", limited);

    let response = decline(&sim, &new_id(), "k").send().await.unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "7");

    let url = format!("{}/transactions/1/reject", sim.base_url("ledger_v1"));
    let response = client()
        .post(url)
        .header("X-Ledger-API-Key", "sim-ledger-v1-key")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 420);
    assert_eq!(response.headers()["retry-after"], "7");
    let reset: u64 = response.headers()["x-ratelimit-reset"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(reset > 1_700_000_000);
    assert_eq!(sim.target_state("ledger_v1", "1"), None);
}

#[tokio::test]
async fn reset_drops_the_connection_without_an_answer() {
    let sim = sim().await;
    sim.set_faults(
        "qonto",
        Faults {
            reset_ratio: 1.0,
            ..Faults::default()
        },
    );
    let id = new_id();
    let err = decline(&sim, &id, "k").send().await.unwrap_err();
    assert!(err.status().is_none(), "{err:?}");
    assert_eq!(sim.target_state("qonto", &id), None);
    let stats = sim.stats().provider("qonto").unwrap().clone();
    assert_eq!((stats.dropped_connections, stats.state_changes), (1, 0));
    assert!(stats.by_status.is_empty());
}

#[tokio::test]
async fn timeout_holds_the_call_without_answering() {
    let sim = sim().await;
    sim.set_faults(
        "moneypipe",
        Faults {
            timeout_ratio: 1.0,
            ..Faults::default()
        },
    );
    let err = moneypipe_read(&sim)
        .timeout(Duration::from_millis(200))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");

    // With a short hold the connection is dropped once the hold ends.
    sim.set_faults(
        "moneypipe",
        Faults {
            timeout_ratio: 1.0,
            timeout_hold_ms: 50,
            ..Faults::default()
        },
    );
    let err = moneypipe_read(&sim).send().await.unwrap_err();
    assert!(!err.is_timeout() && err.status().is_none(), "{err:?}");
}

#[tokio::test]
async fn apply_then_fail_changes_state_then_fails_and_qonto_replays() {
    let sim = sim().await;
    sim.set_faults(
        "qonto",
        Faults {
            apply_then_fail_ratio: 1.0,
            ..Faults::default()
        },
    );
    let id = new_id();
    match decline(&sim, &id, "k").send().await {
        Ok(response) => assert_eq!(response.status(), 503),
        Err(err) => assert!(err.status().is_none(), "{err:?}"),
    }
    assert_eq!(sim.target_state("qonto", &id).as_deref(), Some("declined"));

    // The worker's retry with the same key gets the success Qonto cached.
    sim.set_faults("qonto", Faults::default());
    let (status, body) = parts(decline(&sim, &id, "k").send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(body["request_transfer"]["status"], "declined");
    let stats = sim.stats().provider("qonto").unwrap().clone();
    assert_eq!((stats.state_changes, stats.double_state_changes), (1, 0));
}
