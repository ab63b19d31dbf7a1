//! The bench's side of the worker's queues: loading decisions with
//! pipelined confirms and timing the outcome events they cause.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use lapin::{BasicProperties, Connection, options::BasicPublishOptions, types::FieldTable};
use tokio::sync::mpsc;

use super::{BenchError, PHASE_DEADLINE};
use crate::{
    broker::{Publisher, Topology},
    tools::{capture, signer::Signer, sim::samples},
};

/// A body and the headers it is published with (its signature).
pub(super) type Signed = (Vec<u8>, FieldTable);

/// The worker's decisions queue and its outcome stream, seen from the bench.
pub(super) struct Feed {
    publisher: Publisher,
    /// Signs every decision, unless the run measures without.
    signer: Option<Signer>,
    pub(super) queue: String,
    events: mpsc::UnboundedReceiver<Vec<u8>>,
}

impl Feed {
    /// Declares `topology` and opens its feed: a confirmed publisher to its
    /// decisions queue and a capture of its outcomes exchange.
    pub(super) async fn declare(
        conn: &Connection,
        topology: &Topology,
        signer: Option<Signer>,
    ) -> Result<Self, BenchError> {
        let setup = conn.create_channel().await?;
        topology.declare(&setup).await?;
        Ok(Self {
            signer,
            events: capture::outcomes(&setup, topology).await?,
            publisher: Publisher::new(conn.create_channel().await?).await?,
            queue: topology.decisions(),
        })
    }

    /// Signs what follows with `signer` (or not at all); returns the one
    /// used so far.
    pub(super) fn swap_signer(&mut self, signer: Option<Signer>) -> Option<Signer> {
        std::mem::replace(&mut self.signer, signer)
    }

    /// Loads one decision and returns the outcome event it caused.
    pub(super) async fn one_event(&mut self, bodies: Vec<Vec<u8>>) -> Result<Vec<u8>, BenchError> {
        let signed = self.sign(bodies);
        publish_all(&self.publisher, &self.queue, &signed).await?;
        tokio::time::timeout(PHASE_DEADLINE, self.events.recv())
            .await
            .ok()
            .flatten()
            .ok_or(BenchError::Timeout("sample event", 0, 1))
    }

    /// Loads `bodies` into the worker's queue and returns the rate of their
    /// outcomes.
    pub(super) async fn phase(
        &mut self,
        phase: &'static str,
        bodies: Vec<Vec<u8>>,
    ) -> Result<f64, BenchError> {
        let signed = self.sign(bodies);
        load_and_drain(
            &self.publisher,
            &self.queue,
            signed,
            &mut self.events,
            phase,
        )
        .await
    }

    /// Loads `bodies` and waits up to `deadline` for all their outcomes:
    /// when the first and the last arrived, and how many had each status.
    pub(super) async fn phase_outcomes(
        &mut self,
        phase: &'static str,
        bodies: Vec<Vec<u8>>,
        deadline: Duration,
    ) -> Result<Drained, BenchError> {
        let n = bodies.len();
        let signed = self.sign(bodies);
        let publisher = self.publisher.clone();
        let queue = self.queue.clone();
        let published = Instant::now();
        let load = tokio::spawn(async move { publish_all(&publisher, &queue, &signed).await });
        let until = published + deadline;
        let mut drained = Drained {
            published,
            first: None,
            last: published,
            statuses: BTreeMap::new(),
        };
        let mut seen = 0;
        while seen < n {
            match tokio::time::timeout(
                until.saturating_duration_since(Instant::now()),
                self.events.recv(),
            )
            .await
            {
                Ok(Some(event)) => {
                    seen += 1;
                    drained.last = Instant::now();
                    drained.first.get_or_insert(drained.last);
                    let status = serde_json::from_slice::<EventStatus>(&event)
                        .map(|e| e.status)
                        .unwrap_or_default();
                    *drained.statuses.entry(status).or_default() += 1;
                }
                _ => {
                    load.abort();
                    return Err(BenchError::Timeout(phase, seen, n));
                }
            }
        }
        load.await
            .map_err(|e| BenchError::Setup(format!("publisher task: {e}")))??;
        Ok(drained)
    }

    /// Each body with its signature headers (none when unsigned).
    fn sign(&self, bodies: Vec<Vec<u8>>) -> Vec<Signed> {
        bodies
            .into_iter()
            .map(|body| {
                let headers = self
                    .signer
                    .as_ref()
                    .map(|s| s.headers(&body))
                    .unwrap_or_default();
                (body, headers)
            })
            .collect()
    }
}

/// Publishes every body with confirms pipelined (not awaited one by one).
async fn publish_all(
    publisher: &Publisher,
    queue_or_exchange: &str,
    bodies: &[Signed],
) -> Result<(), BenchError> {
    let channel = publisher.channel();
    for (body, headers) in bodies {
        let _confirm = channel
            .basic_publish(
                "".into(),
                queue_or_exchange.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into())
                    .with_headers(headers.clone()),
            )
            .await?;
    }
    channel.wait_for_confirms().await?;
    Ok(())
}

/// Publishes `bodies` while counting the results they cause: the rate runs
/// from the first result, which may arrive while the load is still being
/// published, to the last.
async fn load_and_drain<T>(
    publisher: &Publisher,
    queue: &str,
    bodies: Vec<Signed>,
    events: &mut mpsc::UnboundedReceiver<T>,
    phase: &'static str,
) -> Result<f64, BenchError> {
    let n = bodies.len();
    let publisher = publisher.clone();
    let queue = queue.to_owned();
    let load = tokio::spawn(async move { publish_all(&publisher, &queue, &bodies).await });
    let rate = drain_rate(events, n, phase).await?;
    load.await
        .map_err(|e| BenchError::Setup(format!("publisher task: {e}")))??;
    Ok(rate)
}

/// Items per second between the first and the last of `n` results.
async fn drain_rate<T>(
    events: &mut mpsc::UnboundedReceiver<T>,
    n: usize,
    phase: &'static str,
) -> Result<f64, BenchError> {
    let deadline = Instant::now() + PHASE_DEADLINE;
    let mut first = None;
    let mut seen = 0;
    while seen < n {
        match tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            events.recv(),
        )
        .await
        {
            Ok(Some(_)) => {
                seen += 1;
                first.get_or_insert_with(Instant::now);
            }
            _ => return Err(BenchError::Timeout(phase, seen, n)),
        }
    }
    let elapsed = first.map(|f| f.elapsed()).unwrap_or_default().as_secs_f64();
    Ok(if elapsed > 0.0 {
        (n - 1) as f64 / elapsed
    } else {
        n as f64
    })
}

pub(super) async fn paced_latency(
    feed: &mut Feed,
    mix: &[&str],
    n: usize,
    rate: f64,
) -> Result<(f64, f64), BenchError> {
    let mix: Vec<String> = mix.iter().map(|p| (*p).to_owned()).collect();
    let rate = rate.max(100.0);
    let sent: Arc<std::sync::Mutex<HashMap<String, Instant>>> = Arc::default();
    let publisher = feed.publisher.clone();
    let queue = feed.queue.clone();
    let log = sent.clone();
    // Signed ahead, so the pace is the publisher's alone.
    let bodies = feed.sign(
        (0..n)
            .map(|i| {
                samples::decision(&mix[i % mix.len()], "reject", &format!("l-{i}"))
                    .to_string()
                    .into_bytes()
            })
            .collect(),
    );
    let pacer = tokio::spawn(async move {
        let start = Instant::now();
        for (i, (body, headers)) in bodies.into_iter().enumerate() {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
            let id = format!("l-{i}");
            log.lock().expect("latency log").insert(id, Instant::now());
            let _ = publisher
                .channel()
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_headers(headers),
                )
                .await;
        }
    });
    let deadline = Instant::now() + PHASE_DEADLINE;
    let mut latencies = Vec::with_capacity(n);
    while latencies.len() < n {
        match tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            feed.events.recv(),
        )
        .await
        {
            Ok(Some(event)) => {
                let arrived = Instant::now();
                let id = serde_json::from_slice::<EventId>(&event)
                    .map(|e| e.decision_id)
                    .unwrap_or_default();
                if let Some(at) = sent.lock().expect("latency log").get(&id) {
                    latencies.push(arrived.duration_since(*at).as_secs_f64() * 1000.0);
                }
            }
            _ => return Err(BenchError::Timeout("latency", latencies.len(), n)),
        }
    }
    let _ = pacer.await;
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    Ok((pct(0.50), pct(0.99)))
}

/// What [`Feed::phase_outcomes`] saw.
pub(super) struct Drained {
    pub(super) published: Instant,
    pub(super) first: Option<Instant>,
    pub(super) last: Instant,
    /// Outcome status (`applied`, `failed`, ...) -> events with it.
    pub(super) statuses: BTreeMap<String, usize>,
}

/// The one field the quota phase reads from an outcome event.
#[derive(serde::Deserialize)]
struct EventStatus {
    #[serde(default)]
    status: String,
}

/// The one field the latency phase reads from an outcome event.
#[derive(serde::Deserialize)]
struct EventId {
    #[serde(default)]
    decision_id: String,
}
