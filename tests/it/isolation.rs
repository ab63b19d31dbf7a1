//! Per-provider isolation (issue 15): a provider's pause, circuit breaker
//! and rate limit hold every call to it and no call to another. Providers
//! are wiremock servers that note when each call arrived; the worker is the
//! real binary where `/status` and `/metrics` are read.
//! They print their figures (`cargo test --test it isolation -- --nocapture`).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use wiremock::{
    Mock, MockServer, Request, Respond, ResponseTemplate,
    matchers::{method, path, path_regex},
};

use crate::helpers::{
    app::{App, TestApp, series, spawn_app},
    broker::TestBroker,
    qonto,
    wait::{DEADLINE, wait_for},
};

/// Answers the first calls from a script, then as `then` does, noting
/// when each call arrived.
#[derive(Clone)]
struct Timed {
    times: Arc<Mutex<Vec<Instant>>>,
    first: Arc<Vec<ResponseTemplate>>,
    then: Arc<dyn Respond>,
}

impl Timed {
    fn new(first: Vec<ResponseTemplate>, then: impl Respond + 'static) -> Self {
        Self {
            times: Arc::default(),
            first: Arc::new(first),
            then: Arc::new(then),
        }
    }

    fn times(&self) -> Vec<Instant> {
        self.times.lock().unwrap().clone()
    }
}

impl Respond for Timed {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut times = self.times.lock().unwrap();
        times.push(Instant::now());
        match self.first.get(times.len() - 1) {
            Some(reply) => reply.clone(),
            None => self.then.respond(request),
        }
    }
}

/// FlexPay's envelope for the reference the path names, in `status`.
struct FlexPay(&'static str);

impl Respond for FlexPay {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        // `/v1/transactions/{reference}` or `.../{reference}/accept`
        let reference = request
            .url
            .path()
            .trim_end_matches("/accept")
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        ResponseTemplate::new(200).set_body_json(json!({
            "success": true,
            "message": "ok",
            "errorCode": null,
            "data": {"id": "3fa85f64", "reference": reference, "status": self.0},
            "errors": [],
        }))
    }
}

async fn mount_flexpay_token(server: &MockServer) {
    Mock::given(method("POST"))
        .and(path("/v1/auth/token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"access_token": "fx-token", "token_type": "Bearer", "expires_in": 3600}),
        ))
        .mount(server)
        .await;
}

/// FlexPay's accept and read answering as a healthy provider, noting calls.
async fn mount_flexpay_up(server: &MockServer) -> Timed {
    mount_flexpay_token(server).await;
    let accept = Timed::new(Vec::new(), FlexPay("COMPLETED"));
    Mock::given(method("POST"))
        .and(path_regex(r"^/v1/transactions/[^/]+/accept$"))
        .respond_with(accept.clone())
        .mount(server)
        .await;
    Mock::given(method("GET"))
        .and(path_regex(r"^/v1/transactions/[^/]+$"))
        .respond_with(FlexPay("AWAITING_ACCEPTANCE"))
        .mount(server)
        .await;
    accept
}

fn flexpay_decision(id: &str, n: usize) -> Value {
    json!({
        "decision_id": id,
        "provider": "flexpay",
        "action": "approve",
        "target": {"reference": format!("TXN-16820000-ISO{n:05}")},
    })
}

/// Qonto (API key) and FlexPay on wiremock, the worker left to the test.
async fn two_providers(name: &str, env: &[(&str, &str)]) -> (TestApp, MockServer) {
    let flexpay = MockServer::start().await;
    let mut app = App::qonto(name, qonto::Auth::ApiKey)
        .env("APPROVAL_PROVIDERS__FLEXPAY__BASE_URL", flexpay.uri())
        .env("APPROVAL_PROVIDERS__FLEXPAY__CLIENT_ID", "fx-client")
        .env("APPROVAL_PROVIDERS__FLEXPAY__CLIENT_SECRET", "fx-secret-41")
        .without_worker();
    for (k, v) in env {
        app = app.env(k, v);
    }
    (spawn_app(app).await, flexpay)
}

async fn get_json(url: &str) -> Option<Value> {
    reqwest::get(url).await.ok()?.json().await.ok()
}

async fn applied(
    broker: &TestBroker,
    prefix: &str,
    n: usize,
) -> Vec<crate::helpers::broker::Outcome> {
    broker
        .wait_outcomes(n, |o| {
            o.decision_id().starts_with(prefix) && o.status() == "applied"
        })
        .await
}

/// One 429 with `Retry-After: 2` pauses every call to Qonto for two
/// seconds, not just the decision that met it; FlexPay's decisions are
/// applied meanwhile, and `/status` shows the pause and the limiter's use.
#[tokio::test]
async fn a_single_429_pauses_every_call_to_its_provider_only() {
    let (app, flexpay) = two_providers("iso-pause", &[]).await;
    let (broker, qonto) = (&app.broker, app.qonto());
    let pause = Duration::from_secs(2);
    let calls = Timed::new(
        vec![ResponseTemplate::new(429).insert_header("Retry-After", "2")],
        qonto::answer("declined"),
    );
    Mock::given(method("POST"))
        .respond_with(calls.clone())
        .mount(qonto)
        .await;
    let accepts = mount_flexpay_up(&flexpay).await;
    let mut worker = app.run(&["run"]);
    broker.wait_consumer().await;

    broker.publish(&qonto::decision("q-0", "reject")).await;
    wait_for("the 429", DEADLINE, || async {
        (!calls.times().is_empty()).then_some(())
    })
    .await;
    let t429 = calls.times()[0];
    for i in 1..6 {
        broker
            .publish(&qonto::decision(&format!("q-{i}"), "reject"))
            .await;
    }
    for i in 0..5 {
        broker
            .publish(&flexpay_decision(&format!("f-{i}"), i))
            .await;
    }
    applied(broker, "f-", 5).await;
    let status = get_json(&format!("{}/status", app.admin_url()))
        .await
        .expect("/status answers");
    let metrics = app.metrics().await;
    let seen_at = Instant::now();

    let outcomes = applied(broker, "q-", 6).await;
    let times = calls.times();
    let first_after = times[1] - t429;
    println!(
        "pause: {} Qonto calls, the first after the 429 came {first_after:?} later; FlexPay's 5 applied within {:?}",
        times.len(),
        accepts
            .times()
            .last()
            .map(|t| *t - t429)
            .unwrap_or_default()
    );
    assert!(
        times[1..].iter().all(|&t| t >= t429 + pause),
        "a Qonto call arrived inside the pause: {:?}",
        times.iter().map(|t| *t - t429).collect::<Vec<_>>()
    );
    assert!(
        accepts.times().iter().all(|&t| t < t429 + pause),
        "FlexPay waited for Qonto's pause"
    );
    assert_eq!(times.len(), 7, "one 429, then each decision once");
    assert!(
        outcomes
            .iter()
            .all(|o| o.body["attempts"].as_u64() <= Some(2))
    );

    // Seen during the pause (FlexPay was done within it).
    assert!(seen_at < t429 + pause, "status was read after the pause");
    let q = &status["providers"]["qonto"];
    assert!(q["paused_until"].is_string(), "{status}");
    assert_eq!(
        q["rate_limit"],
        json!([
            {"limit": 1000, "window_ms": 10000, "used": 1},
            {"limit": 10000, "window_ms": 600000, "used": 1},
        ]),
        "{status}"
    );
    assert_eq!(q["breaker"]["state"], "closed", "{status}");
    assert_eq!(q["concurrency"]["floor"], 1, "{status}");
    assert_eq!(q["concurrency"]["ceiling"], 256, "{status}");
    let f = &status["providers"]["flexpay"];
    assert!(f["paused_until"].is_null(), "{status}");
    assert_eq!(f["rate_limit"], json!([]), "{status}");
    assert_eq!(
        series(&metrics, r#"approval_provider_paused{provider="qonto"}"#),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        series(&metrics, r#"approval_provider_paused{provider="flexpay"}"#),
        0.0
    );
    assert!(
        series(
            &metrics,
            r#"approval_deferrals_total{provider="qonto",reason="paused"}"#
        ) >= 1.0,
        "{metrics}"
    );
    worker.signal(libc::SIGTERM);
    assert_eq!(worker.wait(DEADLINE).await.code(), Some(0));
}

/// FlexPay down (503 on every call) for three seconds while FlexPay and
/// Qonto decisions arrive: Qonto's are applied during the outage, FlexPay
/// sees the calls that open its breaker and one probe per cool-down, and
/// every FlexPay decision ends applied after recovery, none exhausted.
#[tokio::test]
async fn an_outage_opens_its_providers_breaker_and_nobody_elses() {
    let (failures, cool_down_ms, outage) = (3, 500, Duration::from_secs(3));
    let (app, flexpay) = two_providers(
        "iso-breaker",
        &[
            ("APPROVAL_ISOLATION__BREAKER_FAILURES", "3"),
            ("APPROVAL_ISOLATION__BREAKER_COOL_DOWN_MS", "500"),
            ("APPROVAL_ISOLATION__BREAKER_MAX_COOL_DOWN_MS", "1000"),
            // One call at a time until the provider proves fast, so the
            // calls before the breaker opens are exactly the threshold.
            ("APPROVAL_ISOLATION__CONCURRENCY_INITIAL", "1"),
        ],
    )
    .await;
    let (broker, qonto) = (&app.broker, app.qonto());
    Mock::given(method("POST"))
        .respond_with(qonto::answer("declined"))
        .mount(qonto)
        .await;
    mount_flexpay_token(&flexpay).await;
    let down = Timed::new(Vec::new(), ResponseTemplate::new(503));
    Mock::given(path_regex(r"^/v1/transactions/"))
        .respond_with(down.clone())
        .mount(&flexpay)
        .await;
    let mut worker = app.run(&["run"]);
    broker.wait_consumer().await;

    let started = Instant::now();
    let n = 10;
    for i in 0..n {
        broker
            .publish(&flexpay_decision(&format!("f-{i}"), i))
            .await;
        broker
            .publish(&qonto::decision(&format!("q-{i}"), "reject"))
            .await;
    }
    applied(broker, "q-", n).await;
    let qonto_done = started.elapsed();
    let status = wait_for("FlexPay's breaker open", DEADLINE, || async {
        let status = get_json(&format!("{}/status", app.admin_url())).await?;
        let state = status["providers"]["flexpay"]["breaker"]["state"].clone();
        (state == "open" || state == "half_open").then_some(status)
    })
    .await;
    assert_eq!(status["providers"]["qonto"]["breaker"]["state"], "closed");
    // The outage's length, not a synchronisation.
    tokio::time::sleep(outage.saturating_sub(started.elapsed())).await;
    let outage_calls = down.times().len();
    flexpay.reset().await;
    let accepts = mount_flexpay_up(&flexpay).await;
    let recovered = Instant::now();

    let outcomes = applied(broker, "f-", n).await;
    let recovery = recovered.elapsed();
    let probes = outage_calls.saturating_sub(failures);
    println!(
        "breaker: Qonto's {n} applied in {qonto_done:?} during FlexPay's outage; FlexPay saw {outage_calls} calls in {outage:?} ({failures} to open, {probes} probes); all {n} applied {recovery:?} after recovery with {} accept calls",
        accepts.times().len()
    );
    assert!(
        qonto_done < outage,
        "Qonto waited for FlexPay: {qonto_done:?}"
    );
    // A probe per cool-down at most (the cool-down only grows), and one
    // more for the moments at the edges.
    let most = failures + (outage.as_millis() / cool_down_ms) as usize + 1;
    assert!(
        (failures..=most).contains(&outage_calls),
        "{outage_calls} FlexPay calls during the outage, expected {failures}..={most}"
    );
    assert!(
        broker.outcomes().iter().all(|o| o.status() != "failed"),
        "a decision failed: {:?}",
        broker
            .outcomes()
            .iter()
            .map(|o| o.body.clone())
            .collect::<Vec<_>>()
    );
    assert!(
        outcomes
            .iter()
            .all(|o| o.body["attempts"].as_u64() <= Some(8))
    );

    let metrics = app.metrics().await;
    let transitions = |to: &str| {
        series(
            &metrics,
            &format!(
                r#"approval_provider_breaker_transitions_total{{provider="flexpay",to="{to}"}}"#
            ),
        )
    };
    assert!(transitions("open") >= 1.0, "{metrics}");
    assert!(transitions("closed") >= 1.0, "{metrics}");
    assert!(
        transitions("half_open") >= transitions("closed"),
        "{metrics}"
    );
    assert_eq!(
        series(
            &metrics,
            r#"approval_provider_breaker_transitions_total{provider="qonto"}"#
        ),
        0.0
    );
    assert!(
        series(
            &metrics,
            r#"approval_deferrals_total{provider="flexpay",reason="breaker_open"}"#
        ) >= 1.0,
        "{metrics}"
    );
    assert_eq!(
        series(
            &metrics,
            r#"approval_provider_breaker_state{provider="flexpay"}"#
        ),
        0.0
    );
    let status = get_json(&format!("{}/status", app.admin_url()))
        .await
        .unwrap();
    assert_eq!(status["providers"]["flexpay"]["breaker"]["state"], "closed");
    worker.signal(libc::SIGTERM);
    assert_eq!(worker.wait(DEADLINE).await.code(), Some(0));
}

/// `5/1s` in the worker: thirty decisions at once are all applied, and no
/// rolling second at the provider holds more than five calls.
#[tokio::test]
async fn a_rate_limit_holds_in_every_rolling_window_at_the_provider() {
    let app = spawn_app(
        App::qonto("iso-limit", qonto::Auth::AccessToken)
            .env("APPROVAL_PROVIDERS__QONTO__RATE_LIMIT", "5/1s"),
    )
    .await;
    let (broker, qonto) = (&app.broker, app.qonto());
    let calls = Timed::new(Vec::new(), qonto::answer("declined"));
    Mock::given(method("POST"))
        .respond_with(calls.clone())
        .mount(qonto)
        .await;
    let n = 30;
    let started = Instant::now();
    for i in 0..n {
        broker
            .publish(&qonto::decision(&format!("r-{i}"), "reject"))
            .await;
    }
    let outcomes = broker
        .wait_outcomes_within(n, Duration::from_secs(30), |o| o.status() == "applied")
        .await;
    let elapsed = started.elapsed();
    let mut times = calls.times();
    times.sort();
    let busiest = (0..times.len())
        .map(|i| {
            times[i..]
                .iter()
                .take_while(|&&t| t - times[i] < Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0);
    println!(
        "rate limit 5/1s: {n} decisions applied in {elapsed:?} with {} calls, at most {busiest} in any rolling second",
        times.len()
    );
    assert_eq!(times.len(), n, "one call per decision, no 429 to retry");
    assert!(busiest <= 5, "{busiest} calls within one rolling second");
    assert!(outcomes.iter().all(|o| o.body["attempts"] == 1));
    app.stop_worker().await;
}
