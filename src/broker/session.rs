//! The broker session: connect, declare the topology, set the prefetch,
//! consume, and hand each delivery to its own task; reconnect with backoff
//! when the session is lost; one drain when the process stops.

use std::{
    future::Future,
    panic::AssertUnwindSafe,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::{FutureExt as _, StreamExt};
use lapin::{
    Channel, Connection, Consumer, Event,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, error, info, warn};

use super::{
    Delivery, Nodes, Publisher, Topology, Unreachable,
    delivery::{SessionHandles, Unsettled},
};
use crate::{readiness::Readiness, retry::RetryDelays, settings::Settings};

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("broker connection failed: {0}")]
    Broker(#[from] lapin::Error),
    #[error("{0}")]
    Topology(#[from] super::TopologyError),
    /// Checked before consuming: a decision is never applied by a session
    /// that could not report it.
    #[error("{0}")]
    MayNotPublish(#[from] super::probe::ProbeError),
    #[error("no broker node answered: {0}")]
    Unreachable(#[from] Unreachable),
    #[error("the decisions consumer was cancelled by the broker")]
    ConsumerEnded,
    #[error("the broker closed a channel of this session: {0}")]
    ChannelClosed(lapin::Error),
    #[error("a publish of this session failed in a way only a new session mends")]
    PublishLost,
}

/// A session that consumed at least this long was healthy: the next loss
/// starts the reconnect backoff afresh. A shorter one (a broker that closes
/// the channel at the first publish) keeps growing it, so a fault that
/// recurs in every session is not retried in a tight loop.
const STABLE_SESSION: Duration = Duration::from_secs(60);

pub struct Session {
    nodes: Nodes,
    connection_name: String,
    topology: Topology,
    prefetch: u16,
    reconnect: RetryDelays,
    drain_timeout: Duration,
    max_delay: Duration,
    confirm_timeout: Duration,
    /// One per process: a copy made by an earlier session must still verify.
    hop: crate::authn::HopKey,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
}

impl Session {
    pub fn new(
        settings: &Settings,
        topology: Topology,
        readiness: Arc<Readiness>,
        shutdown: CancellationToken,
    ) -> Self {
        let amqp = &settings.amqp;
        Self {
            nodes: Nodes::new(settings),
            connection_name: format!("approval-worker {}", amqp.prefix),
            topology,
            prefetch: amqp.prefetch.get(),
            reconnect: RetryDelays {
                initial: amqp.reconnect_initial.max(Duration::from_millis(1)),
                max: amqp.reconnect_max.max(Duration::from_millis(1)),
                horizon: Duration::MAX,
            },
            drain_timeout: settings.worker.drain_timeout,
            max_delay: settings.retry.horizon,
            confirm_timeout: settings.worker.confirm_timeout,
            hop: settings
                .auth
                .hop_key
                .clone()
                .unwrap_or_else(crate::authn::HopKey::random),
            readiness,
            shutdown,
        }
    }

    /// Consumes until the shutdown token fires, then drains. Losing the
    /// broker is not fatal: reconnect with backoff, redeclare, resume.
    /// Each delivery runs `handle` in its own task.
    pub async fn run<H, F>(self, handle: H)
    where
        H: Fn(Delivery) -> F,
        F: Future<Output = ()> + Send + 'static,
    {
        let in_flight = TaskTracker::new();
        let mut failures = 0u32;
        // Where the next connection attempt starts: after the node of the
        // last session, so a lost node is not the first one retried.
        let mut next_node = 0;
        let open = loop {
            if self.shutdown.is_cancelled() {
                break None;
            }
            match self
                .consume(&in_flight, &mut failures, &mut next_node, &handle)
                .await
            {
                Ok(conn) => break Some(conn),
                Err(e) => {
                    self.readiness.lost(e.to_string());
                    failures = failures.saturating_add(1);
                    metrics::counter!("approval_broker_reconnects_total").increment(1);
                    let wait = self
                        .reconnect
                        .delay(failures, None)
                        .max(Duration::from_millis(50));
                    warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "broker session lost; reconnecting");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => break None,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        };
        // Tasks of a lost session may still be finishing too: their
        // decisions will be redelivered, but let their provider calls end
        // cleanly.
        self.drain(&in_flight).await;
        if let Some(open) = open {
            open.close().await;
        }
        self.readiness.disconnected();
        info!("worker stopped");
    }

    /// One session. Returns it still open when shutdown stopped it, so
    /// in-flight decisions can still be acknowledged.
    async fn consume<H, F>(
        &self,
        in_flight: &TaskTracker,
        failures: &mut u32,
        next_node: &mut usize,
        handle: &H,
    ) -> Result<Open, SessionError>
    where
        H: Fn(Delivery) -> F,
        F: Future<Output = ()> + Send + 'static,
    {
        let (conn, node) = self
            .nodes
            .connect_from(*next_node, &self.connection_name)
            .await?;
        *next_node = node + 1;
        let node = self.nodes.redacted(node);
        // Before any channel opens, so no channel's closing goes unheard.
        let events = conn.events_listener();
        match self
            .session(&conn, &node, events, in_flight, failures, handle)
            .await
        {
            Ok(parts) => Ok(Open {
                conn,
                _setup: parts._setup,
                _handles: parts._handles,
                _consumer: parts._consumer,
            }),
            Err(e) => {
                // Closing returns every unacknowledged decision to the
                // queue at once, for the next session.
                if let Err(close) = conn.close(320, "session lost".into()).await {
                    debug!(error = %close, "connection close after a lost session");
                }
                Err(e)
            }
        }
    }

    async fn session<H, F>(
        &self,
        conn: &Connection,
        node: &str,
        events: impl futures_util::Stream<Item = Event> + Send + 'static,
        in_flight: &TaskTracker,
        failures: &mut u32,
        handle: &H,
    ) -> Result<OpenParts, SessionError>
    where
        H: Fn(Delivery) -> F,
        F: Future<Output = ()> + Send + 'static,
    {
        let mut events = Box::pin(events);
        let setup = conn.create_channel().await?;
        self.topology.declare(&setup).await?;
        super::probe::may_publish(conn, &self.topology).await?;
        let consume = conn.create_channel().await?;
        let session = Arc::new(SessionHandles {
            publisher: Publisher::new(conn.create_channel().await?).await?,
            consume: consume.clone(),
            outcomes: self.topology.outcomes(),
            decisions: self.topology.decisions(),
            topology: self.topology.clone(),
            max_delay: self.max_delay,
            confirm_timeout: self.confirm_timeout,
            hop: self.hop.clone(),
            lost: CancellationToken::new(),
        });
        consume
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await?;
        let tag = format!("approval-worker-{}", uuid::Uuid::new_v4());
        let mut consumer = consume
            .basic_consume(
                self.topology.decisions().into(),
                tag.clone().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.readiness.consuming(node);
        let since = Instant::now();
        let healthy = |failures: &mut u32| {
            if since.elapsed() >= STABLE_SESSION {
                *failures = 0;
            }
        };
        info!(
            broker = %node,
            queue = %self.topology.decisions(),
            prefetch = self.prefetch,
            "consuming decisions"
        );
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => {
                    self.readiness.start_draining();
                    info!(in_flight = in_flight.len(), "shutdown: no new decisions; draining");
                    // Stop deliveries first; in-flight ones still ack on this channel.
                    if let Err(e) = consume.basic_cancel(tag.into(), BasicCancelOptions::default()).await {
                        warn!(error = %e, "could not cancel the consumer");
                    }
                    return Ok(OpenParts { _setup: setup, _handles: session, _consumer: consumer });
                }
                // A channel closed by the broker (any of this session's:
                // setup, consume or publish) ends the session now, rather
                // than at the next failed publish.
                Some(event) = events.next() => {
                    if let Event::Error(e) = event {
                        healthy(failures);
                        session.lost.cancel();
                        return Err(SessionError::ChannelClosed(e));
                    }
                }
                _ = session.lost.cancelled() => {
                    healthy(failures);
                    return Err(SessionError::PublishLost);
                }
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        let (delivery, unsettled) = Delivery::new(session.clone(), delivery);
                        let task = handle(delivery);
                        in_flight.spawn(async move {
                            metrics::gauge!("approval_in_flight").increment(1.0);
                            run_delivery(task, unsettled).await;
                            metrics::gauge!("approval_in_flight").decrement(1.0);
                        });
                    }
                    Some(Err(e)) => {
                        healthy(failures);
                        session.lost.cancel();
                        return Err(e.into());
                    }
                    None => {
                        healthy(failures);
                        session.lost.cancel();
                        return Err(SessionError::ConsumerEnded);
                    }
                }
            }
        }
    }

    /// Waits for in-flight decisions, up to the drain timeout.
    async fn drain(&self, in_flight: &TaskTracker) {
        self.readiness.start_draining();
        in_flight.close();
        if tokio::time::timeout(self.drain_timeout, in_flight.wait())
            .await
            .is_err()
        {
            warn!(
                left = in_flight.len(),
                "drain timeout: unfinished decisions stay unacknowledged and will be redelivered"
            );
        }
    }
}

/// Runs one delivery's task. A panic in it is caught, logged with the
/// decision's ids, counted, and the delivery handed back unless the task
/// settled it first: an unsettled delivery would hold its prefetch slot for
/// the rest of the session.
async fn run_delivery<F>(task: F, unsettled: Unsettled)
where
    F: Future<Output = ()>,
{
    // The task shares nothing with the session that a panic could leave
    // half-updated; the delivery itself is settled below or already was.
    let Err(panic) = AssertUnwindSafe(task).catch_unwind().await else {
        return;
    };
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    let (decision_id, provider) = unsettled.ids();
    error!(
        decision_id = decision_id.as_deref().unwrap_or(""),
        provider = provider.as_deref().unwrap_or(""),
        panic = %message,
        "a delivery task panicked; the decision is handed back"
    );
    metrics::counter!("approval_delivery_panics_total").increment(1);
    unsettled.requeue().await;
}

/// A session stopped by shutdown. Its channels and consumer are kept until
/// the connection closes: lapin closes a channel whose last handle drops, and
/// a connection closed while one of its channels is still closing logs a
/// spurious connection error at every stop.
struct Open {
    conn: Connection,
    _setup: Channel,
    _handles: Arc<SessionHandles>,
    _consumer: Consumer,
}

/// What a session keeps open besides its connection.
struct OpenParts {
    _setup: Channel,
    _handles: Arc<SessionHandles>,
    _consumer: Consumer,
}

impl Open {
    async fn close(self) {
        // The acks go first: a loaded broker closing the connection at once
        // was seen to drop the last acks of a channel and redeliver
        // decisions already settled (by the dead-letters tool, which closes
        // the same way).
        if let Err(e) = self
            ._handles
            .consume
            .close(200, "worker shutdown".into())
            .await
        {
            debug!(error = %e, "consume channel close");
        }
        if let Err(e) = self.conn.close(200, "worker shutdown".into()).await {
            debug!(error = %e, "connection close");
        }
    }
}

#[cfg(test)]
mod tests {
    use lapin::{
        BasicProperties,
        options::{BasicPublishOptions, QueueDeclareOptions},
    };

    use super::*;

    /// A session's handles on the local broker, a private queue, and a
    /// consumer on it with manual acknowledgements.
    async fn consuming() -> (Connection, Arc<SessionHandles>, String, Consumer) {
        let url = secrecy::SecretString::from("amqp://guest:guest@127.0.0.1:5672/%2f");
        let conn = super::super::connect_url(&url, "session-panic-test")
            .await
            .unwrap();
        let consume = conn.create_channel().await.unwrap();
        let topology = Topology::new(&format!("panic-{}", uuid::Uuid::new_v4()), 5);
        let handles = Arc::new(SessionHandles {
            publisher: Publisher::new(conn.create_channel().await.unwrap())
                .await
                .unwrap(),
            consume: consume.clone(),
            outcomes: topology.outcomes(),
            decisions: topology.decisions(),
            topology,
            max_delay: Duration::from_secs(60),
            confirm_timeout: Duration::from_secs(30),
            hop: crate::authn::HopKey::random(),
            lost: CancellationToken::new(),
        });
        let queue = consume
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
            .name()
            .to_string();
        let consumer = consume
            .basic_consume(
                queue.as_str().into(),
                "t".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        (conn, handles, queue, consumer)
    }

    async fn publish(handles: &SessionHandles, queue: &str, body: &[u8]) {
        handles
            .consume
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default(),
            )
            .await
            .unwrap();
    }

    async fn next(consumer: &mut Consumer) -> lapin::message::Delivery {
        tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("a delivery within 10 s")
            .unwrap()
            .unwrap()
    }

    #[tokio::test]
    async fn a_panicking_task_hands_its_delivery_back() {
        let (conn, handles, queue, mut consumer) = consuming().await;
        publish(
            &handles,
            &queue,
            br#"{"decision_id":"p-1","provider":"flexpay"}"#,
        )
        .await;
        let first = next(&mut consumer).await;
        assert!(!first.redelivered);
        let (delivery, unsettled) = Delivery::new(handles.clone(), first);
        assert_eq!(
            unsettled.ids(),
            (Some("p-1".into()), Some("flexpay".into()))
        );
        let task = async move {
            let _held = delivery;
            panic!("boom");
        };
        run_delivery(task, unsettled).await;
        // Nacked with requeue: the same message comes back.
        let again = next(&mut consumer).await;
        assert!(again.redelivered);
        assert_eq!(again.data, first_body());

        // A task that settled before panicking is not settled twice (a
        // second ack or nack of one tag would close the channel).
        let (delivery, unsettled) = Delivery::new(handles.clone(), again);
        let task = async move {
            delivery.acknowledge(Ok(())).await;
            panic!("after the ack");
        };
        run_delivery(task, unsettled).await;
        publish(&handles, &queue, b"second").await;
        let second = next(&mut consumer).await;
        assert_eq!(second.data, b"second");
        assert!(!second.redelivered);
        assert!(handles.consume.status().connected());
        conn.close(200, "test done".into()).await.unwrap();
    }

    fn first_body() -> Vec<u8> {
        br#"{"decision_id":"p-1","provider":"flexpay"}"#.to_vec()
    }
}
