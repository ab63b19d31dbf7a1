//! A private namespace on the real broker per test: its own prefix and
//! topology, publishing, outcome capture, the parking lot and queue counts.
//! Everything it declares is deleted when the test ends, even on panic.

use std::{
    collections::BTreeMap,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use approval_worker::{broker::Topology, tools::capture};
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties,
    message::Delivery,
    options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{
    signing,
    wait::{DEADLINE, wait_for},
};

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The delivery limit the tests' topology and workers use.
pub const DELIVERY_LIMIT: u32 = 20;

/// A received outcome event with the AMQP properties it came with.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub body: Value,
    pub routing_key: String,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub content_type: Option<String>,
    pub delivery_mode: Option<u8>,
}

impl From<Delivery> for Outcome {
    fn from(d: Delivery) -> Self {
        let p = &d.properties;
        Self {
            body: serde_json::from_slice(&d.data).expect("outcome events are JSON"),
            routing_key: d.routing_key.as_str().to_owned(),
            message_id: p.message_id().as_ref().map(|s| s.as_str().to_owned()),
            correlation_id: p.correlation_id().as_ref().map(|s| s.as_str().to_owned()),
            content_type: p.content_type().as_ref().map(|s| s.as_str().to_owned()),
            delivery_mode: *p.delivery_mode(),
        }
    }
}

impl Outcome {
    pub fn status(&self) -> &str {
        self.body["status"].as_str().unwrap_or_default()
    }
    pub fn decision_id(&self) -> &str {
        self.body["decision_id"].as_str().unwrap_or_default()
    }
}

/// A parked message as read back from `P.dead`.
#[derive(Debug, Clone)]
pub struct Parked {
    pub body: Vec<u8>,
    pub headers: BTreeMap<String, String>,
}

pub struct TestBroker {
    pub prefix: String,
    pub topology: Topology,
    channel: Channel,
    /// `P.capture`: the library's durable outcome capture, so that no event
    /// is lost even when the broker restarts under the test.
    capture: String,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    stop_capture: CancellationToken,
}

impl TestBroker {
    pub async fn new(name: &str) -> Self {
        let prefix = format!(
            "t-{name}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let conn = connect(&format!("test {prefix}"))
            .await
            .expect("RabbitMQ must run on 127.0.0.1:5672 (rabbitmq-server -detached)");
        let channel = conn.create_channel().await.unwrap();
        let topology = Topology::new(&prefix, DELIVERY_LIMIT);
        topology.declare(&channel).await.unwrap();

        let capture = format!("{prefix}.capture");
        let stop_capture = CancellationToken::new();
        let mut events =
            capture::durable(&AMQP_URL.into(), &topology, &capture, stop_capture.clone())
                .await
                .unwrap();
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let sink = outcomes.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                sink.lock().unwrap().push(Outcome::from(event));
            }
        });
        Self {
            prefix,
            topology,
            channel,
            capture,
            outcomes,
            stop_capture,
        }
    }

    /// Publishes raw bytes to the decisions exchange, persistent, with
    /// `headers`, signed with the test Ed25519 key as upstream would.
    pub async fn publish_with_headers(&self, routing_key: &str, body: &[u8], headers: FieldTable) {
        let mut headers = headers;
        signing::sign_into(&mut headers, signing::ED25519_SEED, body);
        self.publish_unsigned(routing_key, body, headers).await;
    }

    /// Publishes to the decisions exchange exactly as given: no signature
    /// unless `headers` carry one.
    pub async fn publish_unsigned(&self, routing_key: &str, body: &[u8], headers: FieldTable) {
        self.channel
            .basic_publish(
                self.topology.decisions().into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into())
                    .with_headers(headers),
            )
            .await
            .unwrap();
    }

    /// Publishes raw bytes to the decisions exchange, persistent.
    pub async fn publish_raw(&self, routing_key: &str, body: &[u8]) {
        self.publish_with_headers(routing_key, body, FieldTable::default())
            .await;
    }

    /// Publishes a decision under `provider.action`, as an upstream would.
    pub async fn publish(&self, decision: &Value) {
        let key = format!(
            "{}.{}",
            decision["provider"].as_str().unwrap_or("x"),
            decision["action"].as_str().unwrap_or("x")
        );
        self.publish_raw(&key, decision.to_string().as_bytes())
            .await;
    }

    /// Every outcome event received so far. After a broker restart, events
    /// unacknowledged at the restart may appear twice.
    pub fn outcomes(&self) -> Vec<Outcome> {
        self.outcomes.lock().unwrap().clone()
    }

    /// Waits for `n` outcome events matching `filter`.
    pub async fn wait_outcomes(&self, n: usize, filter: impl Fn(&Outcome) -> bool) -> Vec<Outcome> {
        self.wait_outcomes_within(n, DEADLINE, filter).await
    }

    pub async fn wait_outcomes_within(
        &self,
        n: usize,
        deadline: Duration,
        filter: impl Fn(&Outcome) -> bool,
    ) -> Vec<Outcome> {
        wait_for(&format!("{n} outcome events"), deadline, || {
            let got: Vec<_> = self.outcomes().into_iter().filter(|o| filter(o)).collect();
            async move { (got.len() >= n).then_some(got) }
        })
        .await
    }

    /// The one outcome for `decision_id` with `status`.
    pub async fn outcome(&self, decision_id: &str, status: &str) -> Outcome {
        self.wait_outcomes(1, |o| {
            o.decision_id() == decision_id && o.status() == status
        })
        .await
        .remove(0)
    }

    /// Deletes the outcomes exchange under the worker, as a careless
    /// operator would: its next outcome publish closes its channel.
    pub async fn delete_outcomes_exchange(&self) {
        self.channel
            .exchange_delete(self.topology.outcomes().into(), Default::default())
            .await
            .unwrap();
    }

    /// Binds the capture queue to the outcomes exchange again, once the
    /// worker declared it anew.
    pub async fn rebind_capture(&self) {
        self.channel
            .queue_bind(
                self.capture.as_str().into(),
                self.topology.outcomes().into(),
                "#".into(),
                Default::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }

    /// Whether the exchange `name` exists (on a channel of its own: a
    /// passive declare of a missing exchange closes the channel).
    pub async fn exchange_exists(&self, name: &str) -> bool {
        let conn = connect("test exchange probe").await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        let passive = lapin::options::ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let found = ch
            .exchange_declare(
                name.into(),
                lapin::ExchangeKind::Topic,
                passive,
                FieldTable::default(),
            )
            .await
            .is_ok();
        let _ = conn.close(200, "probe done".into()).await;
        found
    }

    /// Publishes straight into `queue` through the default exchange, as
    /// anyone with write permission there could.
    pub async fn publish_to_queue(&self, queue: &str, body: &[u8], headers: FieldTable) {
        self.channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_headers(headers),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Publishes to the decisions exchange with `properties` as given.
    pub async fn publish_with_properties(
        &self,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) {
        self.channel
            .basic_publish(
                self.topology.decisions().into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .unwrap();
    }

    /// Hands the decisions queue's head message back `times` times, as a
    /// consumer that never settles it would: the broker then counts those
    /// deliveries itself (`x-delivery-count`, the redelivered flag), which
    /// is the only count the worker trusts. Call before a worker consumes.
    pub async fn redeliver(&self, times: u32) {
        let queue = self.topology.decisions();
        for _ in 0..times {
            let got = wait_for("a message to hand back", DEADLINE, || async {
                self.channel
                    .basic_get(queue.as_str().into(), BasicGetOptions::default())
                    .await
                    .unwrap()
            })
            .await;
            let requeue = lapin::options::BasicNackOptions {
                requeue: true,
                ..Default::default()
            };
            got.delivery.nack(requeue).await.unwrap();
        }
    }

    /// Ready messages and consumers of a queue.
    pub async fn queue_counts(&self, queue: &str) -> (u32, u32) {
        let q = self
            .channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        (q.message_count(), q.consumer_count())
    }

    /// Waits until `queue` holds exactly `n` ready messages. Requeues (a
    /// nack, a closed channel) reach a quorum queue asynchronously, so a
    /// count read straight after them can lag.
    pub async fn wait_ready(&self, queue: &str, n: u32) {
        wait_for(
            &format!("{n} ready messages in {queue}"),
            DEADLINE,
            || async move { (self.queue_counts(queue).await.0 == n).then_some(()) },
        )
        .await;
    }

    /// Takes every parked message out of `P.dead`.
    pub async fn drain_parked(&self) -> Vec<Parked> {
        let mut out = Vec::new();
        while let Some(msg) = self
            .channel
            .basic_get(self.topology.dead().into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            let mut headers = BTreeMap::new();
            if let Some(h) = msg.delivery.properties.headers() {
                for (k, v) in h.inner() {
                    headers.insert(k.as_str().to_owned(), amqp_to_string(v));
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

    /// Waits until `n` messages are parked, then takes them.
    pub async fn wait_parked(&self, n: usize) -> Vec<Parked> {
        let dead = self.topology.dead();
        wait_for(&format!("{n} parked messages"), DEADLINE, || {
            let dead = dead.clone();
            async move { (self.queue_counts(&dead).await.0 as usize >= n).then_some(()) }
        })
        .await;
        self.drain_parked().await
    }

    /// Waits until the worker consumes the decisions queue.
    pub async fn wait_consumer(&self) {
        let q = self.topology.decisions();
        wait_for("the worker to consume", DEADLINE, || {
            let q = q.clone();
            async move { (self.queue_counts(&q).await.1 >= 1).then_some(()) }
        })
        .await;
    }

    /// Waits until nobody consumes the decisions queue any more, then gives
    /// its ready messages: the broker notices a closed connection a moment
    /// after the process is gone, and only then requeues what it had not
    /// acknowledged.
    pub async fn wait_consumer_gone(&self) -> u32 {
        let q = self.topology.decisions();
        wait_for("the consumer to go", Duration::from_secs(10), || {
            let q = q.clone();
            async move {
                let (ready, consumers) = self.queue_counts(&q).await;
                (consumers == 0).then_some(ready)
            }
        })
        .await
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.stop_capture.cancel();
        // Runs on panic too: a failed test must not leave queues behind.
        let topology = self.topology.clone();
        let capture = self.capture.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok(conn) = connect("test cleanup").await {
                    if let Ok(ch) = conn.create_channel().await {
                        let _ = topology.delete(&ch).await;
                    }
                    // A failed delete closes the channel, so use a fresh one.
                    if let Ok(ch) = conn.create_channel().await {
                        let _ = ch.queue_delete(capture.into(), Default::default()).await;
                    }
                    let _ = conn.close(200, "test cleanup".into()).await;
                }
            });
        })
        .join();
    }
}

async fn connect(name: &str) -> Result<Connection, lapin::Error> {
    Connection::connect(
        AMQP_URL,
        ConnectionProperties::default().with_connection_name(name.into()),
    )
    .await
}

fn amqp_to_string(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        other => format!("{other:?}"),
    }
}

/// Closes this broker's connections whose name contains `needle`, the way
/// an operator or a network fault would, leaving other tests' alone.
pub fn close_connections_named(needle: &str) -> usize {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "pid",
            "client_properties",
            "-q",
            "--no-table-headers",
        ])
        .output()
        .expect("rabbitmqctl is installed");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut closed = 0;
    for line in text.lines().filter(|l| l.contains(needle)) {
        let Some(pid) = line.split_whitespace().next() else {
            continue;
        };
        let ok = std::process::Command::new("rabbitmqctl")
            .args(["close_connection", pid, "test closes the connection"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            closed += 1;
        }
    }
    closed
}
