//! Test helpers, one per concern: a private broker namespace per test, the
//! worker (in-process or as the real binary), outcome capture, and waiting
//! for conditions with deadlines instead of sleeps.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use approval_worker::{broker::Topology, providers::Registry, settings::Settings, worker::Worker};
use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
        QueueBindOptions, QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable},
};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `check` until it returns `Some`, failing the test at the deadline.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

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

/// A private namespace on the real broker: its own prefix, topology and
/// outcome capture; everything is deleted when the test ends, even on panic.
pub struct TestBroker {
    pub prefix: String,
    pub topology: Topology,
    pub conn: Connection,
    pub channel: Channel,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
}

impl TestBroker {
    pub async fn new(name: &str) -> Self {
        let prefix = format!(
            "t-{name}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let conn = Connection::connect(
            AMQP_URL,
            ConnectionProperties::default().with_connection_name(format!("test {prefix}").into()),
        )
        .await
        .expect("RabbitMQ must run on 127.0.0.1:5672 (rabbitmq-server -detached)");
        let channel = conn.create_channel().await.unwrap();
        let topology = Topology::new(&prefix, 20);
        topology.declare(&channel).await.unwrap();

        let capture = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions::exclusive().auto_delete(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                capture.name().clone(),
                topology.outcomes().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut consumer = channel
            .basic_consume(
                capture.name().clone(),
                "capture".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let sink = outcomes.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let p = &d.properties;
                sink.lock().unwrap().push(Outcome {
                    body: serde_json::from_slice(&d.data).expect("outcome events are JSON"),
                    routing_key: d.routing_key.as_str().to_owned(),
                    message_id: p.message_id().as_ref().map(|s| s.as_str().to_owned()),
                    correlation_id: p.correlation_id().as_ref().map(|s| s.as_str().to_owned()),
                    content_type: p.content_type().as_ref().map(|s| s.as_str().to_owned()),
                    delivery_mode: *p.delivery_mode(),
                });
            }
        });
        Self {
            prefix,
            topology,
            conn,
            channel,
            outcomes,
        }
    }

    /// Publishes raw bytes to the decisions exchange, confirmed.
    pub async fn publish_raw(&self, routing_key: &str, body: &[u8]) {
        self.channel
            .basic_publish(
                self.topology.decisions().into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into()),
            )
            .await
            .unwrap();
    }

    pub async fn publish(&self, decision: &Value) {
        let key = format!(
            "{}.{}",
            decision["provider"].as_str().unwrap_or("x"),
            decision["action"].as_str().unwrap_or("x")
        );
        self.publish_raw(&key, decision.to_string().as_bytes())
            .await;
    }

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

    /// Environment pointing a worker at this namespace.
    pub fn worker_env(&self) -> Vec<(String, String)> {
        vec![
            ("APPROVAL_AMQP__URL".into(), AMQP_URL.into()),
            ("APPROVAL_AMQP__PREFIX".into(), self.prefix.clone()),
            ("APPROVAL_AMQP__PREFETCH".into(), "50".into()),
            ("APPROVAL_AMQP__DELIVERY_LIMIT".into(), "20".into()),
            ("APPROVAL_AMQP__RECONNECT_INITIAL_MS".into(), "100".into()),
            ("APPROVAL_AMQP__RECONNECT_MAX_MS".into(), "1000".into()),
            ("APPROVAL_RETRY__INITIAL_BACKOFF_MS".into(), "10".into()),
            ("APPROVAL_RETRY__MAX_BACKOFF_MS".into(), "50".into()),
            ("APPROVAL_WORKER__HTTP_TIMEOUT_MS".into(), "5000".into()),
            ("APPROVAL_WORKER__DRAIN_TIMEOUT_MS".into(), "10000".into()),
            (
                "APPROVAL_ADMIN__BIND".into(),
                format!("127.0.0.1:{}", free_port()),
            ),
        ]
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        // Runs on panic too: a failed test must not leave queues behind.
        let topology = self.topology.clone();
        // Queues a test declares itself under its prefix (e.g. a durable capture).
        let extra = format!("{}.capture", self.prefix);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok(conn) =
                    Connection::connect(AMQP_URL, ConnectionProperties::default()).await
                {
                    if let Ok(ch) = conn.create_channel().await {
                        let _ = topology.delete(&ch).await;
                    }
                    // A failed delete closes the channel, so use a fresh one.
                    if let Ok(ch) = conn.create_channel().await {
                        let _ = ch.queue_delete(extra.into(), Default::default()).await;
                    }
                    let _ = conn.close(200, "test cleanup".into()).await;
                }
            });
        })
        .join();
    }
}

/// A port nobody listens on right now, for a process's admin endpoint.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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

/// A worker running in this test process.
pub struct InProcessWorker {
    pub shutdown: CancellationToken,
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl InProcessWorker {
    pub async fn start(env: Vec<(String, String)>) -> Self {
        let settings = Settings::load_from(None, env).expect("test settings are valid");
        let registry = Registry::from_settings(&settings).expect("providers build");
        let shutdown = CancellationToken::new();
        let worker = Worker::new(settings, registry, shutdown.clone());
        let handle = tokio::spawn(worker.run());
        Self {
            shutdown,
            handle: Some(handle),
        }
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let handle = self.handle.take().expect("started");
        tokio::time::timeout(DEADLINE, handle)
            .await
            .expect("worker stops within the deadline")
            .unwrap();
    }
}

impl Drop for InProcessWorker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The real binary, with its output captured.
pub struct ProcessWorker {
    pub child: tokio::process::Child,
    pub output: Arc<Mutex<String>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl ProcessWorker {
    pub fn spawn(args: &[&str], env: &[(String, String)]) -> Self {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_approval-worker"));
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().cloned())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("the binary starts");
        let output = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let sink = output.clone();
            readers.push(tokio::spawn(async move {
                use tokio::io::AsyncBufReadExt;
                let mut lines = tokio::io::BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut s = sink.lock().unwrap();
                    s.push_str(&line);
                    s.push('\n');
                }
            }));
        }
        Self {
            child,
            output,
            readers,
        }
    }

    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the exit and for the last line of output.
    pub async fn wait(&mut self, deadline: Duration) -> std::process::ExitStatus {
        let status = tokio::time::timeout(deadline, self.child.wait())
            .await
            .expect("process exits within the deadline")
            .unwrap();
        for reader in self.readers.drain(..) {
            let _ = tokio::time::timeout(deadline, reader).await;
        }
        status
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
