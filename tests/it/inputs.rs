//! What operators and providers hand the worker: credentials as deployed
//! (a secret file's trailing newline, a template's placeholder, a value no
//! header can carry) and provider answers far larger than needed.

use std::time::Duration;

use serde_json::json;
use wiremock::{
    Mock, ResponseTemplate,
    matchers::{header, method},
};

use crate::helpers::{
    app::{App, spawn_app},
    mock,
    qonto::{self, LOGIN, SECRET_KEY},
};

const SECRET_KEY_VAR: &str = "APPROVAL_PROVIDERS__QONTO__SECRET_KEY";

/// A secret made with `kubectl create secret --from-file` ends in a
/// newline: the worker trims it and the call goes through (it used to fail
/// to be built, every time, until the retry horizon).
#[tokio::test]
async fn a_credential_with_a_trailing_newline_is_trimmed() {
    let app = spawn_app(
        App::qonto("in-newline", qonto::Auth::ApiKey)
            .env(SECRET_KEY_VAR, format!("{SECRET_KEY}\n")),
    )
    .await;
    let (broker, provider) = (&app.broker, app.qonto());
    Mock::given(method("POST"))
        .and(header("authorization", format!("{LOGIN}:{SECRET_KEY}")))
        .respond_with(qonto::answer("declined"))
        .mount(provider)
        .await;
    broker.publish(&qonto::decision("nl-1", "reject")).await;
    let o = broker.outcome("nl-1", "applied").await;
    assert_eq!(o.body["attempts"], 1);
}

/// A value no HTTP header can carry (a line break inside) is a
/// configuration error: the decision fails at once as `unauthorized`,
/// nothing is sent, and the value is not echoed.
#[tokio::test]
async fn an_unsendable_credential_fails_at_once_without_a_call() {
    let app = spawn_app(
        App::qonto("in-unsendable", qonto::Auth::ApiKey)
            .env(SECRET_KEY_VAR, "key-S3CRET-first\nkey-S3CRET-second"),
    )
    .await;
    let (broker, provider) = (&app.broker, app.qonto());
    Mock::given(method("POST"))
        .respond_with(qonto::answer("declined"))
        .mount(provider)
        .await;
    broker.publish(&qonto::decision("bad-1", "reject")).await;
    let o = broker.outcome("bad-1", "failed").await;
    assert_eq!(o.body["error"]["kind"], "unauthorized", "{}", o.body);
    assert_eq!(o.body["attempts"], 1, "{}", o.body);
    assert!(!o.body.to_string().contains("S3CRET"), "{}", o.body);
    assert!(mock::requests(provider).await.is_empty());
    assert_eq!(broker.wait_parked(1).await.len(), 1);
}

/// The manifest's `REPLACE_ME` left in place stops `check` and `run` at
/// start-up with exit code 2, naming the key and not the value.
#[tokio::test]
async fn a_placeholder_credential_stops_check_and_run_naming_the_key() {
    let app = spawn_app(App::qonto("in-placeholder", qonto::Auth::ApiKey).without_worker()).await;
    for command in ["check", "run"] {
        let mut process = app.run_with(&[command], &[(SECRET_KEY_VAR, "REPLACE_ME")]);
        let status = process.wait(Duration::from_secs(20)).await;
        let out = process.output();
        assert_eq!(status.code(), Some(2), "{command}: {out}");
        assert!(
            out.contains(&format!("{SECRET_KEY_VAR}: looks like a placeholder")),
            "{command}: {out}"
        );
    }
}

/// Peak resident memory of a process, from `/proc/<pid>/status`.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

/// The pod's memory limit, from the shipped Deployment.
fn k8s_memory_limit_kib() -> u64 {
    let manifest = include_str!("../../deploy/k8s/deployment.yaml");
    let limits = &manifest[manifest.find("limits:").expect("resources.limits")..];
    let mib = limits
        .lines()
        .find_map(|l| l.trim().strip_prefix("memory:"))
        .and_then(|v| v.trim().strip_suffix("Mi"))
        .and_then(|v| v.parse::<u64>().ok())
        .expect("a memory limit in Mi");
    mib * 1024
}

/// 200 decisions in flight, each answered twice with a 900 KiB error body
/// (and `Retry-After: 1`, so each first error is held through a one-second
/// in-process wait while the others arrive): the real worker's peak RSS
/// stays well under the pod's memory limit, with room for everything else
/// a pod holds. Held whole, the answers (parsed, and copied into errors)
/// would pass the limit several times over; cut but all read at once, they
/// and the HTTP client's read buffers would come close to it.
#[tokio::test]
async fn huge_error_answers_do_not_grow_memory_past_the_pod_limit() {
    const DECISIONS: usize = 200;
    let app = spawn_app(
        App::qonto("in-memory", qonto::Auth::ApiKey)
            .env("APPROVAL_AMQP__PREFETCH", DECISIONS)
            .env("APPROVAL_RETRY__MAX_ATTEMPTS", 2)
            // Answers are read a few at a time: on a loaded machine the last
            // must not be cut short by the call timeout.
            .env("APPROVAL_WORKER__HTTP_TIMEOUT_MS", 30_000)
            .env("APPROVAL_LOG__LEVEL", "error")
            // Every call must reach the provider at once, as before the
            // breaker and adaptive concurrency (isolation.rs) held them.
            .env("APPROVAL_ISOLATION__BREAKER_FAILURES", 1_000_000)
            .env("APPROVAL_ISOLATION__CONCURRENCY_ADAPTIVE", false)
            .without_worker(),
    )
    .await;
    let (broker, provider) = (&app.broker, app.qonto());
    let body = json!({
        "errors": [{"code": "internal_error", "detail": "x".repeat(900 * 1024)}]
    });
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(500)
                .insert_header("retry-after", "1")
                .set_body_json(&body)
                .set_delay(Duration::from_millis(500)),
        )
        .mount(provider)
        .await;
    let mut worker = app.run(&["run"]);
    broker.wait_consumer().await;
    for i in 0..DECISIONS {
        broker
            .publish(&qonto::decision(&format!("mem-{i}"), "reject"))
            .await;
    }
    let outcomes = broker
        .wait_outcomes_within(DECISIONS, Duration::from_secs(60), |o| {
            o.status() == "failed"
        })
        .await;
    let peak = peak_rss_kib(worker.pid());
    let limit = k8s_memory_limit_kib();
    eprintln!("worker peak RSS {peak} KiB, pod limit {limit} KiB");
    for o in &outcomes {
        assert_eq!(o.body["error"]["kind"], "exhausted", "{}", o.body["error"]);
        assert_eq!(o.body["provider_response"]["truncated"], true, "{}", o.body);
    }
    assert_eq!(
        mock::posts(provider).await.len(),
        2 * DECISIONS,
        "every decision called twice"
    );
    worker.signal(libc::SIGTERM);
    worker.wait(Duration::from_secs(30)).await;
    assert!(
        peak < limit / 4 * 3,
        "peak RSS {peak} KiB is not well under the pod's {limit} KiB"
    );
}
