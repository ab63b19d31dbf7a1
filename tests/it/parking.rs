//! The parking-lot tools (`dead-letters list` and `replay`) on the real
//! broker: they must not erode what they guard. Reading the parking lot
//! leaves it exactly as it was (same messages, same order, no delivery
//! counted), and a replay handles only what was parked when it started.
//!
//! Messages are parked by publishing straight to `P.dead` with the
//! worker's headers, so no worker runs: nothing but the tool under test
//! touches the queues.

use std::collections::BTreeMap;

use approval_worker::broker::Topology;
use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
        ConfirmSelectOptions,
    },
    types::{AMQPValue, FieldTable, LongString},
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::helpers::{
    app::{App, TestApp, spawn_app},
    broker::{AMQP_URL, Parked},
    wait::{DEADLINE, wait_for},
};

const DELIVERY_COUNT: &str = "x-delivery-count";

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// A parked message as the worker writes one (`Delivery::park`), plus a
/// trace header and properties the copy must keep.
struct ToPark {
    id: String,
    provider: &'static str,
    kind: &'static str,
    reason: String,
}

impl ToPark {
    fn new(id: &str, provider: &'static str, kind: &'static str) -> Self {
        Self {
            id: id.to_owned(),
            provider,
            kind,
            reason: format!("{kind}: parked by the test"),
        }
    }

    fn body(&self) -> Vec<u8> {
        json!({
            "decision_id": self.id,
            "provider": self.provider,
            "action": "reject",
            "target": {"reference": format!("ref-{}", self.id)},
            "reason": "test",
        })
        .to_string()
        .into_bytes()
    }

    fn headers(&self) -> FieldTable {
        let mut h = FieldTable::default();
        h.insert("x-approval-error-kind".into(), long_string(self.kind));
        h.insert("x-approval-error".into(), long_string(&self.reason));
        h.insert("x-approval-attempts".into(), AMQPValue::LongLongInt(3));
        h.insert(
            "x-approval-first-received-at".into(),
            long_string("2026-01-02T03:04:05Z"),
        );
        h.insert(
            "traceparent".into(),
            long_string("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        h
    }
}

/// The test's own connection to its namespace: parks messages and reads
/// queues back.
struct Lot {
    conn: Connection,
    channel: Channel,
    topology: Topology,
}

impl Lot {
    async fn open(app: &TestApp) -> Self {
        let conn = Connection::connect(
            AMQP_URL,
            ConnectionProperties::default()
                .with_connection_name(format!("test {} parking", app.broker.prefix).into()),
        )
        .await
        .expect("RabbitMQ must run on 127.0.0.1:5672");
        let channel = conn.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        Self {
            conn,
            channel,
            topology: app.broker.topology.clone(),
        }
    }

    /// Publishes to `P.dead` and waits for the confirm.
    async fn park_raw(&self, body: &[u8], headers: FieldTable) {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id("m-1".into())
            .with_headers(headers);
        self.channel
            .basic_publish(
                "".into(),
                self.topology.dead().as_str().into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    async fn park(&self, messages: &[ToPark]) {
        for m in messages {
            self.park_raw(&m.body(), m.headers()).await;
        }
    }

    /// Takes every message out of `queue`, in order.
    async fn drain(&self, queue: &str) -> Vec<Parked> {
        let mut out = Vec::new();
        while let Some(msg) = self
            .channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            let mut headers = BTreeMap::new();
            if let Some(h) = msg.delivery.properties.headers() {
                for (k, v) in h.inner() {
                    let v = match v {
                        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into(),
                        other => format!("{other:?}"),
                    };
                    headers.insert(k.as_str().to_owned(), v);
                }
            }
            out.push(Parked {
                body: msg.delivery.data.clone(),
                headers,
            });
            msg.delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
        out
    }

    async fn close(self) {
        let _ = self.conn.close(200, "test done".into()).await;
    }
}

/// The decision ids of `parked`, in order.
fn ids(parked: &[Parked]) -> Vec<String> {
    parked
        .iter()
        .map(|p| {
            serde_json::from_slice::<serde_json::Value>(&p.body).unwrap()["decision_id"]
                .as_str()
                .unwrap_or("?")
                .to_owned()
        })
        .collect()
}

/// Fails when a message in `parked` was ever delivered and handed back:
/// quorum queues then carry the count in `x-delivery-count`.
fn assert_never_redelivered(parked: &[Parked]) {
    let counted: Vec<_> = parked
        .iter()
        .zip(ids(parked))
        .filter_map(|(p, id)| Some((id, p.headers.get(DELIVERY_COUNT)?.clone())))
        .filter(|(_, count)| count != "LongLongInt(0)" && count != "0")
        .collect();
    assert!(
        counted.is_empty(),
        "messages carry a delivery count (id, x-delivery-count): {counted:?}"
    );
}

/// Waits until `queue` holds exactly `n` ready messages (settling reaches
/// a quorum queue asynchronously); at the deadline, fails naming the count
/// it last saw.
async fn wait_settled(app: &TestApp, queue: &str, n: u32) {
    let until = std::time::Instant::now() + DEADLINE;
    loop {
        let (ready, consumers) = app.broker.queue_counts(queue).await;
        if ready == n {
            return;
        }
        assert!(
            std::time::Instant::now() < until,
            "{queue}: {ready} ready (want {n}), {consumers} consumer(s)"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Runs the binary's `dead-letters` with `args`, expecting success.
async fn dead_letters(app: &TestApp, args: &[&str]) -> String {
    let mut all = vec!["dead-letters"];
    all.extend_from_slice(args);
    let mut p = app.run(&all);
    let status = p.wait(DEADLINE).await;
    let output = p.output();
    assert_eq!(status.code(), Some(0), "{all:?}: {output}");
    output
}

#[tokio::test]
async fn listing_25_times_leaves_the_parking_lot_exactly_as_it_was() {
    let app = spawn_app(App::without_providers("pk-list").without_worker()).await;
    let lot = Lot::open(&app).await;
    let parked = [
        ToPark::new("l-1", "qonto", "exhausted"),
        ToPark::new("l-2", "flexpay", "invalid"),
        ToPark::new("l-3", "qonto", "confirmation_denied"),
        ToPark::new("l-4", "moneypipe", "provider_disabled"),
    ];
    lot.park(&parked).await;
    let dead = lot.topology.dead();

    for _ in 0..25 {
        let out = dead_letters(&app, &["list"]).await;
        assert!(
            out.contains("l-1") && out.contains("kind=exhausted") && out.contains("attempts=3"),
            "{out}"
        );
    }
    wait_settled(&app, &dead, 4).await;
    let after = lot.drain(&dead).await;
    assert_never_redelivered(&after);
    assert_eq!(ids(&after), ["l-1", "l-2", "l-3", "l-4"], "same order");
    for (p, want) in after.iter().zip(&parked) {
        assert_eq!(p.body, want.body(), "same body");
        assert_eq!(p.headers["x-approval-error"], want.reason);
        assert_eq!(p.headers["x-approval-error-kind"], want.kind);
        assert!(p.headers.contains_key("traceparent"), "{:?}", p.headers);
    }
    lot.close().await;
}

#[tokio::test]
async fn list_filters_limits_and_escapes_control_characters() {
    let app = spawn_app(App::without_providers("pk-escape").without_worker()).await;
    let lot = Lot::open(&app).await;
    // A body and a header that would move the cursor, recolour and retitle
    // the operator's terminal, and forge a line of output.
    let hostile_id = "e-1\u{1b}[2J\u{1b}]0;pwned\u{7}";
    let body = json!({"decision_id": hostile_id, "provider": "qonto", "action": "reject"});
    let mut headers = ToPark::new("e-1", "qonto", "invalid").headers();
    headers.insert(
        "x-approval-error".into(),
        long_string("bad\r\nforged-1\tqonto\treject\tkind=exhausted\u{9b}31m"),
    );
    lot.park_raw(body.to_string().as_bytes(), headers).await;
    lot.park(&[
        ToPark::new("e-2", "flexpay", "invalid"),
        ToPark::new("e-3", "qonto", "invalid"),
        ToPark::new("e-4", "qonto", "invalid"),
    ])
    .await;

    let out = dead_letters(&app, &["list"]).await;
    for raw in ['\u{1b}', '\r', '\u{7}', '\u{9b}'] {
        assert!(!out.contains(raw), "{raw:?} reached the terminal: {out:?}");
    }
    assert!(out.contains(r"e-1\u{1b}[2J\u{1b}]0;pwned\u{7}"), "{out}");
    assert!(out.contains(r"bad\r\nforged-1\tqonto"), "{out}");
    let lines: Vec<_> = out.lines().filter(|l| l.contains("kind=")).collect();
    assert_eq!(lines.len(), 4, "one line per parked message: {out}");

    let out = dead_letters(&app, &["list", "--provider", "qonto", "--limit", "2"]).await;
    let listed: Vec<_> = out
        .lines()
        .filter(|l| l.contains("kind="))
        .filter_map(|l| l.split('\t').next())
        .collect();
    assert_eq!(listed, [r"e-1\u{1b}[2J\u{1b}]0;pwned\u{7}", "e-3"], "{out}");

    let dead = lot.topology.dead();
    wait_settled(&app, &dead, 4).await;
    let after = lot.drain(&dead).await;
    assert_never_redelivered(&after);
    assert_eq!(ids(&after), [hostile_id, "e-2", "e-3", "e-4"]);
    lot.close().await;
}

/// Moves everything arriving in `P.decisions` straight back into `P.dead`,
/// as a worker that parks every replayed decision at once would.
fn repark_everything(app: &TestApp, stop: CancellationToken) -> tokio::task::JoinHandle<usize> {
    let topology = app.broker.topology.clone();
    let name = format!("test {} reparker", app.broker.prefix);
    tokio::spawn(async move {
        let conn = Connection::connect(
            AMQP_URL,
            ConnectionProperties::default().with_connection_name(name.into()),
        )
        .await
        .unwrap();
        let channel = conn.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let mut consumer = channel
            .basic_consume(
                topology.decisions().as_str().into(),
                "reparker".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut moved = 0;
        loop {
            let delivery = tokio::select! {
                () = stop.cancelled() => break,
                d = consumer.next() => match d {
                    Some(Ok(d)) => d,
                    _ => break,
                },
            };
            channel
                .basic_publish(
                    "".into(),
                    topology.dead().as_str().into(),
                    BasicPublishOptions::default(),
                    &delivery.data,
                    delivery.properties.clone(),
                )
                .await
                .unwrap()
                .await
                .unwrap();
            delivery.ack(BasicAckOptions::default()).await.unwrap();
            moved += 1;
        }
        let _ = conn.close(200, "test done".into()).await;
        moved
    })
}

#[tokio::test]
async fn replay_ends_when_what_it_replays_is_parked_again_at_once() {
    let app = spawn_app(App::without_providers("pk-loop").without_worker()).await;
    let lot = Lot::open(&app).await;
    let parked: Vec<_> = (1..=5)
        .map(|i| ToPark::new(&format!("r-{i}"), "qonto", "exhausted"))
        .collect();
    lot.park(&parked).await;
    let stop = CancellationToken::new();
    let reparker = repark_everything(&app, stop.clone());
    app.broker.wait_consumer().await;

    // Today's replay walks until the queue is empty, which it never is
    // here: the wait below fails at the deadline.
    let out = dead_letters(&app, &["replay"]).await;
    assert!(out.contains("5 decision(s) replayed"), "{out}");

    let dead = lot.topology.dead();
    wait_settled(&app, &dead, 5).await;
    stop.cancel();
    assert_eq!(reparker.await.unwrap(), 5, "each replayed exactly once");
    let after = lot.drain(&dead).await;
    assert_eq!(ids(&after), ["r-1", "r-2", "r-3", "r-4", "r-5"]);
    lot.close().await;
}

#[tokio::test]
async fn replay_skips_confirmation_denied_unless_asked_for_it() {
    let app = spawn_app(App::without_providers("pk-denied").without_worker()).await;
    let lot = Lot::open(&app).await;
    lot.park(&[
        ToPark::new("d-1", "qonto", "exhausted"),
        ToPark::new("d-2", "qonto", "confirmation_denied"),
        ToPark::new("d-3", "flexpay", "exhausted"),
        ToPark::new("d-4", "qonto", "confirmation_denied"),
    ])
    .await;
    let (dead, decisions) = (lot.topology.dead(), lot.topology.decisions());

    let out = dead_letters(&app, &["replay"]).await;
    assert!(out.contains("2 decision(s) replayed"), "{out}");
    assert!(out.contains("--kind confirmation_denied"), "{out}");
    wait_settled(&app, &decisions, 2).await;
    wait_settled(&app, &dead, 2).await;
    let replayed = lot.drain(&decisions).await;
    assert_eq!(ids(&replayed), ["d-1", "d-3"]);
    for r in &replayed {
        assert!(
            !r.headers.contains_key("x-approval-attempts"),
            "fresh attempt counter: {:?}",
            r.headers
        );
    }

    let out = dead_letters(&app, &["replay", "--kind", "confirmation_denied"]).await;
    assert!(out.contains("2 decision(s) replayed"), "{out}");
    wait_settled(&app, &dead, 0).await;
    wait_settled(&app, &decisions, 2).await;
    assert_eq!(ids(&lot.drain(&decisions).await), ["d-2", "d-4"]);
    lot.close().await;
}

#[tokio::test]
async fn replay_dry_run_changes_nothing() {
    let app = spawn_app(App::without_providers("pk-dry").without_worker()).await;
    let lot = Lot::open(&app).await;
    lot.park(&[
        ToPark::new("y-1", "qonto", "exhausted"),
        ToPark::new("y-2", "qonto", "confirmation_denied"),
        ToPark::new("y-3", "flexpay", "invalid"),
    ])
    .await;
    let (dead, decisions) = (lot.topology.dead(), lot.topology.decisions());

    let out = dead_letters(&app, &["replay", "--dry-run"]).await;
    assert!(out.contains("y-1") && out.contains("y-3"), "{out}");
    assert!(out.contains("2 decision(s) would be replayed"), "{out}");
    assert_eq!(app.broker.queue_counts(&decisions).await.0, 0);
    wait_settled(&app, &dead, 3).await;
    let after = lot.drain(&dead).await;
    assert_never_redelivered(&after);
    assert_eq!(ids(&after), ["y-1", "y-2", "y-3"]);
    lot.close().await;
}

#[tokio::test]
async fn replay_honours_limit_and_filters_and_the_rest_keeps_its_place() {
    let app = spawn_app(App::without_providers("pk-limit").without_worker()).await;
    let lot = Lot::open(&app).await;
    lot.park(&[
        ToPark::new("n-1", "qonto", "exhausted"),
        ToPark::new("n-2", "flexpay", "exhausted"),
        ToPark::new("n-3", "qonto", "exhausted"),
        ToPark::new("n-4", "qonto", "exhausted"),
        ToPark::new("n-5", "flexpay", "exhausted"),
    ])
    .await;
    let (dead, decisions) = (lot.topology.dead(), lot.topology.decisions());

    let out = dead_letters(&app, &["replay", "--provider", "qonto", "--limit", "2"]).await;
    assert!(out.contains("2 decision(s) replayed"), "{out}");
    wait_settled(&app, &decisions, 2).await;
    assert_eq!(ids(&lot.drain(&decisions).await), ["n-1", "n-3"]);
    wait_settled(&app, &dead, 3).await;
    let after = lot.drain(&dead).await;
    assert_never_redelivered(&after);
    assert_eq!(ids(&after), ["n-2", "n-4", "n-5"]);
    lot.close().await;
}

#[tokio::test]
async fn an_interrupted_list_stops_between_messages_and_loses_nothing() {
    let app = spawn_app(App::without_providers("pk-sigint").without_worker()).await;
    let lot = Lot::open(&app).await;
    let total = 300;
    let parked: Vec<_> = (0..total)
        .map(|i| ToPark::new(&format!("s-{i:03}"), "qonto", "exhausted"))
        .collect();
    lot.park(&parked).await;

    let mut list = app.run(&["dead-letters", "list"]);
    wait_for("the first listed line", DEADLINE, || async {
        list.output().contains("s-000").then_some(())
    })
    .await;
    list.signal(libc::SIGINT);
    let status = list.wait(DEADLINE).await;
    let out = list.output();
    assert_eq!(status.code(), Some(0), "{out}");
    assert!(out.contains(&format!("of {total}")), "{out}");

    // Nothing was in hand when it stopped, so nothing was handed back
    // (counted) or copied twice; the kept ones moved behind the rest.
    let dead = lot.topology.dead();
    wait_settled(&app, &dead, total as u32).await;
    let after = lot.drain(&dead).await;
    assert_never_redelivered(&after);
    let mut seen = ids(&after);
    seen.sort();
    let want: Vec<_> = (0..total).map(|i| format!("s-{i:03}")).collect();
    assert_eq!(seen, want, "each message exactly once");
    lot.close().await;
}

/// A broker user for one test, deleted when dropped (even on panic).
struct TempUser {
    name: String,
    password: String,
}

impl TempUser {
    fn create(prefix: &str) -> Self {
        let user = Self {
            name: format!("{prefix}-user"),
            password: uuid::Uuid::new_v4().simple().to_string(),
        };
        let ctl = |args: &[&str]| {
            let out = std::process::Command::new("rabbitmqctl")
                .args(args)
                .output()
                .expect("rabbitmqctl is installed");
            assert!(out.status.success(), "rabbitmqctl {args:?}: {out:?}");
        };
        ctl(&["add_user", &user.name, &user.password]);
        ctl(&["set_permissions", "-p", "/", &user.name, ".*", ".*", ".*"]);
        user
    }

    fn url(&self) -> String {
        format!("amqp://{}:{}@127.0.0.1:5672/%2f", self.name, self.password)
    }
}

impl Drop for TempUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_user", &self.name])
            .output();
    }
}

/// A message the broker dead-lettered itself keeps its publisher's
/// `user_id`; copying that property verbatim makes the broker refuse the
/// copy (the tool runs as another user) and close the channel.
#[tokio::test]
async fn a_message_the_broker_dead_lettered_is_kept_whole() {
    let app = spawn_app(App::without_providers("pk-dlx").without_worker()).await;
    let lot = Lot::open(&app).await;
    let (dead, decisions) = (lot.topology.dead(), lot.topology.decisions());
    let upstream = TempUser::create(&app.broker.prefix);
    let conn = Connection::connect(&upstream.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut h = FieldTable::default();
    h.insert("x-custom".into(), long_string("kept"));
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_user_id(upstream.name.as_str().into())
        .with_headers(h);
    let body = ToPark::new("x-1", "qonto", "exhausted").body();
    channel
        .basic_publish(
            "".into(),
            decisions.as_str().into(),
            BasicPublishOptions::default(),
            &body,
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let _ = conn.close(200, "test done".into()).await;
    let msg = lot
        .channel
        .basic_get(decisions.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap()
        .expect("the decision is queued");
    let reject = lapin::options::BasicRejectOptions { requeue: false };
    msg.delivery.reject(reject).await.unwrap();
    wait_settled(&app, &dead, 1).await;

    for _ in 0..2 {
        let out = dead_letters(&app, &["list"]).await;
        assert!(
            out.contains("x-1") && out.contains("kind=rejected"),
            "{out}"
        );
    }
    wait_settled(&app, &dead, 1).await;
    let after = lot.drain(&dead).await;
    assert_never_redelivered(&after);
    assert_eq!(after[0].body, body);
    let h = &after[0].headers;
    assert_eq!(h["x-custom"], "kept");
    assert_eq!(h["x-first-death-reason"], "rejected");
    assert!(h.contains_key("x-death"), "{h:?}");
    lot.close().await;
}
