//! Several broker nodes in `APPROVAL_AMQP__URL` (CONTRACT.md section 2): the
//! worker connects to the first that answers, moves on to the next when its
//! session is lost, and `check` reaches every one. Only one RabbitMQ runs
//! here, so a closed port stands for a dead node, a listener that never
//! speaks for a hung one, and the live node is named twice (once with a
//! query parameter) where two live nodes are needed.

use std::{net::TcpListener, time::Duration};

use wiremock::{Mock, matchers::method};

use crate::helpers::{
    app::{App, TestApp, spawn_app},
    broker::{AMQP_URL, close_connections_named},
    qonto,
    wait::{DEADLINE, wait_for},
};

/// Nothing listens on port 1; its password must never be printed.
const DEAD: &str = "amqp://guest:pw-DEAD-S3CRET@127.0.0.1:1/%2f";
const DEAD_REDACTED: &str = "amqp://guest:***@127.0.0.1:1/%2f";
const LIVE_REDACTED: &str = "amqp://guest:***@127.0.0.1:5672/%2f";
/// The same live node under a second address, told apart by a query.
const LIVE_TOO: &str = "amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=30";
const LIVE_TOO_REDACTED: &str = "amqp://guest:***@127.0.0.1:5672/%2f?heartbeat=30";

async fn app_on(name: &str, nodes: &str) -> TestApp {
    let app =
        spawn_app(App::qonto(name, qonto::Auth::ApiKey).env("APPROVAL_AMQP__URL", nodes)).await;
    Mock::given(method("POST"))
        .respond_with(qonto::answer("declined"))
        .mount(app.qonto())
        .await;
    app
}

async fn wait_node(app: &TestApp, node: &str) {
    wait_for(
        &format!("the worker to consume from {node}"),
        DEADLINE,
        || async { (app.broker_node().as_deref() == Some(node)).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn the_worker_skips_a_dead_node_and_applies_decisions_on_the_next() {
    let app = app_on("n-skip", &format!("{DEAD},{AMQP_URL}")).await;
    wait_node(&app, LIVE_REDACTED).await;
    app.broker
        .publish(&qonto::decision("nodes-1", "reject"))
        .await;
    app.broker.outcome("nodes-1", "applied").await;
    app.stop_worker().await;
}

/// A node that accepts the TCP connection and then says nothing costs one
/// connect timeout, not the whole start-up.
#[tokio::test]
async fn a_node_that_never_answers_is_given_up_after_the_connect_timeout() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let nodes = format!("amqp://guest:guest@127.0.0.1:{port}/%2f,{AMQP_URL}");
    let app = spawn_app(
        App::qonto("n-silent", qonto::Auth::ApiKey)
            .env("APPROVAL_AMQP__URL", nodes)
            .env("APPROVAL_WORKER__CONNECT_TIMEOUT_MS", "1000"),
    )
    .await;
    wait_node(&app, LIVE_REDACTED).await;
    app.stop_worker().await;
    drop(silent);
}

/// After losing its session the worker starts with the node after the one
/// it used, so a node that just failed is not the first one retried.
#[tokio::test]
async fn a_lost_session_moves_on_to_the_next_node() {
    let app = app_on("n-rotate", &format!("{AMQP_URL},{LIVE_TOO}")).await;
    let name = format!("approval-worker {}", app.broker.prefix);
    for (i, (from, to)) in [
        (LIVE_REDACTED, LIVE_TOO_REDACTED),
        (LIVE_TOO_REDACTED, LIVE_REDACTED),
    ]
    .into_iter()
    .enumerate()
    {
        wait_node(&app, from).await;
        assert_eq!(close_connections_named(&name), 1, "the worker's connection");
        wait_node(&app, to).await;
        let id = format!("rotate-{i}");
        app.broker.publish(&qonto::decision(&id, "reject")).await;
        app.broker.outcome(&id, "applied").await;
    }
    app.stop_worker().await;
}

/// The real binary names the node it consumes from, and the one it
/// skipped, with passwords masked.
#[tokio::test]
async fn run_logs_the_node_in_use_and_the_skipped_one_without_passwords() {
    let app = spawn_app(
        App::qonto("n-log", qonto::Auth::ApiKey)
            .env("APPROVAL_LOG__FORMAT", "json")
            .without_worker(),
    )
    .await;
    let nodes = format!("{DEAD},{AMQP_URL}");
    let mut worker = app.run_with(&["run"], &[("APPROVAL_AMQP__URL", nodes.as_str())]);
    app.broker.wait_consumer().await;
    let consuming = wait_for("the consuming line", DEADLINE, || async {
        let logs = worker.output();
        let line = logs
            .lines()
            .find(|l| l.contains("consuming decisions"))?
            .to_owned();
        Some((logs, line))
    })
    .await;
    worker.signal(libc::SIGTERM);
    assert_eq!(
        worker.wait(DEADLINE).await.code(),
        Some(0),
        "{}",
        worker.output()
    );
    let (logs, line) = consuming;
    assert!(
        line.contains(&format!(r#""broker":"{LIVE_REDACTED}""#)),
        "{line}"
    );
    assert!(
        logs.lines()
            .any(|l| l.contains("broker node not reachable") && l.contains(DEAD_REDACTED)),
        "{logs}"
    );
    let logs = worker.output();
    assert!(!logs.contains("pw-DEAD-S3CRET"), "{logs}");
    assert!(!logs.contains("guest:guest"), "{logs}");
}

/// `check` reaches every node: one dead among live ones fails it, named
/// with its password masked; every node live passes, each listed.
#[tokio::test]
async fn check_reaches_every_node_and_names_a_dead_one() {
    let app = spawn_app(App::qonto("n-check", qonto::Auth::ApiKey).without_worker()).await;

    let nodes = format!("{AMQP_URL},{DEAD}");
    let mut one_dead = app.run_with(&["check"], &[("APPROVAL_AMQP__URL", nodes.as_str())]);
    let status = one_dead.wait(Duration::from_secs(30)).await;
    let out = one_dead.output();
    assert_ne!(status.code(), Some(0), "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("check failed:")
            && l.contains(&format!("broker {DEAD_REDACTED} is not reachable"))),
        "{out}"
    );
    assert!(
        out.contains(&format!("broker {LIVE_REDACTED}: ok")),
        "{out}"
    );
    assert!(!out.contains("pw-DEAD-S3CRET"), "{out}");

    let nodes = format!("{AMQP_URL},{LIVE_TOO}");
    let mut all_live = app.run_with(&["check"], &[("APPROVAL_AMQP__URL", nodes.as_str())]);
    let status = all_live.wait(Duration::from_secs(30)).await;
    let out = all_live.output();
    assert_eq!(status.code(), Some(0), "{out}");
    for node in [LIVE_REDACTED, LIVE_TOO_REDACTED] {
        assert!(out.contains(&format!("broker {node}: ok")), "{out}");
    }
    assert!(!out.contains("guest:guest"), "{out}");
}
