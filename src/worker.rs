//! The worker: the flow of one decision, top to bottom, and the broker
//! session that feeds it.
//!
//! receive → validate → dispatch to the provider (with retries and
//! reconciliation) → classify → publish the outcome (and park or schedule a
//! retry) with confirms → acknowledge.
//!
//! A decision is acknowledged only after everything it needs published was
//! confirmed by the broker; anything else leaves it unacknowledged, so the
//! broker redelivers it and the same idempotency key is used again.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection,
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    },
    types::FieldTable,
};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, Span, debug, error, field, info, info_span, warn};

use crate::{
    broker::{self, Publisher, Topology, headers},
    decision::{self, Action, Decision, Echo},
    locks::TargetLocks,
    outcome::{
        Confirmation, ErrorKind, OutcomeError, OutcomeEvent, Status, bound_response, rfc3339,
    },
    providers::{CallContext, ConfirmationState, Lookup, Provider, Registry, Reply, Verdict},
    retry::{CallError, ErrorClass, RetryDelays},
    settings::Settings,
};

/// How often a pending human confirmation is polled (Qonto allows 1/s).
const CONFIRMATION_POLL: Duration = Duration::from_secs(1);
/// Pause before a decision whose publishes failed is handed back.
const REQUEUE_PAUSE: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("broker connection failed: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the decisions consumer was cancelled by the broker")]
    ConsumerEnded,
}

/// Readiness as the admin endpoint reports it.
#[derive(Debug, Default)]
pub struct Health {
    connected: AtomicBool,
    consuming: AtomicBool,
    draining: AtomicBool,
}

impl Health {
    pub fn ready(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
            && self.consuming.load(Ordering::SeqCst)
            && !self.draining.load(Ordering::SeqCst)
    }

    fn set(&self, connected: bool, consuming: bool) {
        self.connected.store(connected, Ordering::SeqCst);
        self.consuming.store(consuming, Ordering::SeqCst);
        metrics::gauge!("approval_ready").set(if self.ready() { 1.0 } else { 0.0 });
    }

    fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        metrics::gauge!("approval_ready").set(0.0);
    }
}

/// What every delivery task shares.
struct Shared {
    settings: Settings,
    registry: Registry,
    topology: Topology,
    delays: RetryDelays,
    locks: TargetLocks,
    shutdown: CancellationToken,
    /// Named once: every decision publishes here.
    outcomes_exchange: String,
}

pub struct Worker {
    shared: Arc<Shared>,
    health: Arc<Health>,
    connection_name: String,
}

impl Worker {
    pub fn new(settings: Settings, registry: Registry, shutdown: CancellationToken) -> Self {
        let topology = Topology::new(&settings.amqp.prefix, settings.amqp.delivery_limit);
        let delays = RetryDelays {
            initial: settings.retry.initial_backoff,
            max: settings.retry.max_backoff,
        };
        let connection_name = format!("approval-worker {}", settings.amqp.prefix);
        let outcomes_exchange = topology.outcomes();
        Self {
            shared: Arc::new(Shared {
                settings,
                registry,
                topology,
                delays,
                locks: TargetLocks::default(),
                shutdown,
                outcomes_exchange,
            }),
            health: Arc::new(Health::default()),
            connection_name,
        }
    }

    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Runs until the shutdown token fires and in-flight decisions drained.
    /// Losing the broker is not fatal: reconnect with backoff, redeclare,
    /// resume consuming.
    pub async fn run(self) {
        let shared = &self.shared;
        let amqp = &shared.settings.amqp;
        let reconnect = RetryDelays {
            initial: amqp.reconnect_initial.max(Duration::from_millis(1)),
            max: amqp.reconnect_max.max(Duration::from_millis(1)),
        };
        let mut failures = 0u32;
        let in_flight = TaskTracker::new();
        while !shared.shutdown.is_cancelled() {
            match self.session(&in_flight, &mut failures).await {
                Ok(()) => break,
                Err(e) => {
                    self.health.set(false, false);
                    failures += 1;
                    metrics::counter!("approval_broker_reconnects_total").increment(1);
                    let wait = reconnect
                        .delay(failures, None)
                        .max(Duration::from_millis(50));
                    warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "broker session lost; reconnecting");
                    tokio::select! {
                        _ = shared.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        self.health.start_draining();
        in_flight.close();
        // Tasks of a lost session may still be finishing; their decisions
        // will be redelivered, but let their provider calls end cleanly.
        if tokio::time::timeout(shared.settings.worker.drain_timeout, in_flight.wait())
            .await
            .is_err()
        {
            warn!(
                left = in_flight.len(),
                "drain timeout: unfinished decisions stay unacknowledged and will be redelivered"
            );
        }
        self.health.set(false, false);
        info!("worker stopped");
    }

    async fn session(
        &self,
        in_flight: &TaskTracker,
        failures: &mut u32,
    ) -> Result<(), WorkerError> {
        let shared = &self.shared;
        let s = &shared.settings;
        let conn = broker::connect(&s.amqp.url, &self.connection_name).await?;
        let setup = conn.create_channel().await?;
        shared.topology.declare(&setup).await?;
        let consume_channel = conn.create_channel().await?;
        let channels = Arc::new(Channels {
            publisher: Publisher::new(conn.create_channel().await?).await?,
            consume: consume_channel.clone(),
        });
        consume_channel
            .basic_qos(s.amqp.prefetch.get(), BasicQosOptions::default())
            .await?;
        let tag = format!("approval-worker-{}", uuid::Uuid::new_v4());
        let mut consumer = consume_channel
            .basic_consume(
                shared.topology.decisions().into(),
                tag.clone().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.health.set(true, true);
        *failures = 0;
        info!(
            broker = %s.amqp_url_redacted(),
            queue = %shared.topology.decisions(),
            prefetch = s.amqp.prefetch,
            "consuming decisions"
        );
        loop {
            tokio::select! {
                _ = shared.shutdown.cancelled() => {
                    self.health.start_draining();
                    info!(in_flight = in_flight.len(), "shutdown: no new decisions; draining");
                    // Stop deliveries first; in-flight ones still ack on this channel.
                    if let Err(e) = consume_channel.basic_cancel(tag.into(), BasicCancelOptions::default()).await {
                        warn!(error = %e, "could not cancel the consumer");
                    }
                    in_flight.close();
                    if tokio::time::timeout(s.worker.drain_timeout, in_flight.wait()).await.is_err() {
                        warn!(left = in_flight.len(), "drain timeout: unfinished decisions stay unacknowledged and will be redelivered");
                    }
                    close(&conn).await;
                    return Ok(());
                }
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        let shared = self.shared.clone();
                        let channels = channels.clone();
                        in_flight.spawn(async move {
                            metrics::gauge!("approval_in_flight").increment(1.0);
                            handle(&shared, &channels, delivery).await;
                            metrics::gauge!("approval_in_flight").decrement(1.0);
                        });
                    }
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err(WorkerError::ConsumerEnded),
                }
            }
        }
    }
}

async fn close(conn: &Connection) {
    if let Err(e) = conn.close(200, "worker shutdown".into()).await {
        debug!(error = %e, "connection close");
    }
}

/// History of a decision carried in its headers across deliveries.
struct Meta {
    received_at: OffsetDateTime,
    first_received_at: OffsetDateTime,
    /// Provider calls made in earlier deliveries.
    attempts: u32,
    /// Deliveries of this copy beyond the first (quorum queues count them).
    delivery_count: i64,
    redelivered: bool,
    confirmation: Option<(String, Option<String>)>,
}

impl Meta {
    /// Time since the decision was first received, across deliveries.
    fn elapsed(&self) -> Duration {
        (OffsetDateTime::now_utc() - self.first_received_at)
            .try_into()
            .unwrap_or(Duration::ZERO)
    }

    fn read(delivery: &Delivery) -> Self {
        let h = delivery.properties.headers().as_ref();
        let received_at = OffsetDateTime::now_utc();
        let first_received_at = headers::get_str(h, headers::FIRST_RECEIVED_AT)
            .and_then(|t| OffsetDateTime::parse(&t, &Rfc3339).ok())
            .unwrap_or(received_at);
        Self {
            received_at,
            first_received_at,
            attempts: headers::get_int(h, headers::ATTEMPTS)
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(0),
            delivery_count: headers::get_int(h, headers::DELIVERY_COUNT).unwrap_or(0),
            redelivered: delivery.redelivered,
            confirmation: headers::get_str(h, headers::CONFIRMATION_TOKEN)
                .map(|t| (t, headers::get_str(h, headers::CONFIRMATION_EXPIRES_AT))),
        }
    }
}

/// How a decision leaves the worker.
enum Settle {
    /// Publish `event`; park the original when the status says so.
    Final(Box<OutcomeEvent>),
    /// Schedule another delivery after `delay` through a retry queue, with
    /// an event to publish first (`awaiting_confirmation`).
    Later {
        delay: Duration,
        attempts: u32,
        confirmation: Option<(String, Option<String>)>,
        event: Option<Box<OutcomeEvent>>,
    },
}

/// The broker side of one session, shared by its delivery tasks.
struct Channels {
    publisher: Publisher,
    /// Deliveries are settled on the channel that delivered them, directly:
    /// lapin's per-delivery `Acker` routes each ack through an internal task
    /// it spawns (about 6 % of the worker's perf samples in `bench`; the
    /// direct ack costs about 2 %).
    consume: Channel,
}

async fn handle(shared: &Shared, channels: &Channels, delivery: Delivery) {
    let meta = Meta::read(&delivery);
    let span = info_span!(
        "decision",
        decision_id = field::Empty,
        provider = field::Empty,
        action = field::Empty,
        attempt = meta.attempts,
    );
    async {
        let settle = decide(shared, &delivery, &meta).await;
        let tag = delivery.delivery_tag;
        match deliver(shared, &channels.publisher, &delivery, &meta, settle).await {
            Ok(()) => {
                if let Err(e) = channels
                    .consume
                    .basic_ack(tag, BasicAckOptions::default())
                    .await
                {
                    warn!(error = %e, "ack failed; the decision will be redelivered");
                }
            }
            Err(e) => {
                error!(error = %e, "publishing failed; decision not acknowledged and handed back");
                tokio::time::sleep(REQUEUE_PAUSE).await;
                let requeue = BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                };
                if let Err(e) = channels.consume.basic_nack(tag, requeue).await {
                    warn!(error = %e, "nack failed; the broker redelivers on reconnect");
                }
            }
        }
    }
    .instrument(span)
    .await
}

/// receive → validate → dispatch → classify, as one readable function.
async fn decide(shared: &Shared, delivery: &Delivery, meta: &Meta) -> Settle {
    let body = &delivery.data;
    let invalid = |echo: Echo, kind: ErrorKind, problem: String| {
        warn!(error_kind = kind.as_str(), problem = %problem, "decision not applied");
        let mut event = OutcomeEvent::new(echo, Status::Invalid, meta.received_at, body);
        event.error = Some(OutcomeError::new(kind, problem));
        event.attempts = meta.attempts;
        Settle::Final(Box::new(event))
    };

    let decision = match decision::parse(body) {
        Ok(d) => d,
        Err(e) => return invalid(*e.echo, ErrorKind::Invalid, e.problem),
    };
    let span = Span::current();
    span.record("decision_id", decision.decision_id.as_str());
    span.record("provider", decision.provider.as_str());
    span.record("action", decision.action.as_str());

    let provider = match shared.registry.lookup(&decision.provider) {
        Lookup::Enabled(p) => p.clone(),
        Lookup::Disabled => {
            return invalid(
                decision.echo(),
                ErrorKind::ProviderDisabled,
                format!(
                    "provider {} is disabled: its credentials are not configured",
                    decision.provider
                ),
            );
        }
        Lookup::Unknown => {
            let known: Vec<_> = shared.registry.names().map(|(n, _)| n).collect();
            return invalid(
                decision.echo(),
                ErrorKind::Invalid,
                format!("provider must be one of {}", known.join(", ")),
            );
        }
    };
    if let Err(problem) = provider.validate(&decision) {
        return invalid(decision.echo(), ErrorKind::Invalid, problem);
    }
    // The broker's own delivery limit dead-letters without our headers; park
    // one delivery earlier, with the reason, so the parking lot explains it.
    if meta.delivery_count + 1 >= i64::from(shared.settings.amqp.delivery_limit) {
        let mut event = base_event(&decision, meta, Status::Failed);
        event.error = Some(OutcomeError::new(
            ErrorKind::Poison,
            format!(
                "delivered {} times without settling; parked to stop the loop",
                meta.delivery_count + 1
            ),
        ));
        return Settle::Final(Box::new(event));
    }

    let _guard = shared
        .locks
        .lock(format!(
            "{}/{}",
            decision.provider,
            provider.target_key(&decision)
        ))
        .await;
    Dispatch {
        shared,
        provider: provider.as_ref(),
        decision: &decision,
        meta,
        attempts: meta.attempts,
    }
    .run()
    .await
}

fn base_event(d: &Decision, meta: &Meta, status: Status) -> OutcomeEvent {
    let mut e = OutcomeEvent::new(d.echo(), status, meta.received_at, &[]);
    e.idempotency_key = Some(d.idempotency_key.clone());
    e.attempts = meta.attempts;
    e
}

/// One decision against its provider: calls, retries, reconciliation.
struct Dispatch<'a> {
    shared: &'a Shared,
    provider: &'a dyn Provider,
    decision: &'a Decision,
    meta: &'a Meta,
    /// Provider calls made so far, across deliveries.
    attempts: u32,
}

impl Dispatch<'_> {
    async fn run(mut self) -> Settle {
        let retry = &self.shared.settings.retry;
        let mut ctx = CallContext {
            idempotency_key: self.decision.idempotency_key.clone(),
            attempt: self.attempts,
            confirmation_token: None,
        };

        if let Some((token, expires_at)) = &self.meta.confirmation {
            match self.await_confirmation(token, expires_at.as_deref()).await {
                Ok(()) => ctx.confirmation_token = Some(token.clone()),
                Err(settle) => return *settle,
            }
        }

        let mut calls_here = 0u32;
        let mut last_error: Option<CallError> = None;
        // A redelivery may follow a crash after the provider was called.
        let mut maybe_called = self.meta.redelivered || self.meta.delivery_count > 0;
        loop {
            // Without server-side idempotency a repeat call could apply the
            // decision twice: read the target first.
            if (self.attempts > 0 || maybe_called) && !self.provider.idempotent() {
                maybe_called = false;
                if let Some(settle) = self.reconcile_before_repeat().await {
                    return settle;
                }
            }
            if self.attempts >= retry.max_attempts.get() {
                return self.exhausted(last_error.as_ref(), "attempts ran out");
            }
            self.attempts += 1;
            calls_here += 1;
            ctx.attempt = self.attempts;
            Span::current().record("attempt", self.attempts);
            let error = match self.provider.apply(self.decision, &ctx).await {
                Ok(Reply::Done { state, response }) => {
                    info!(provider_state = state.as_deref().unwrap_or(""), "applied");
                    return self.finish(Status::Applied, "call", state, Some(response), None);
                }
                Ok(Reply::NeedsConfirmation {
                    token,
                    expires_at,
                    response,
                }) => {
                    info!("waiting for a human confirmation");
                    return self.confirmation_started(token, expires_at, response);
                }
                Err(e) => e,
            };
            warn!(
                class = ?error.class,
                http_status = error.http_status,
                provider_code = error.provider_code.as_deref().unwrap_or(""),
                error = %error,
                "provider call failed"
            );
            match error.class {
                ErrorClass::Permanent => {
                    return self.failed(ErrorKind::RejectedByProvider, &error, "call");
                }
                ErrorClass::Auth => return self.failed(ErrorKind::Unauthorized, &error, "call"),
                ErrorClass::Ambiguous => match self.provider.read_state(self.decision).await {
                    Ok(observed) => match observed.verdict {
                        Verdict::AsDecided => {
                            return self.finish(
                                Status::AlreadyApplied,
                                "reconciled",
                                Some(observed.state),
                                Some(observed.response),
                                None,
                            );
                        }
                        Verdict::Conflict => {
                            return self.conflict(&observed.state, observed.response);
                        }
                        // A 4xx on a still-pending target is a real refusal;
                        // a timeout on one means nothing happened: retry.
                        Verdict::Pending if error.http_status.is_some() => {
                            return self.failed(
                                ErrorKind::RejectedByProvider,
                                &error,
                                "reconciled",
                            );
                        }
                        Verdict::Pending => {}
                    },
                    Err(read) => {
                        warn!(error = %read, "reconciliation read failed");
                        if error.http_status.is_some() {
                            return self.failed(ErrorKind::RejectedByProvider, &error, "call");
                        }
                    }
                },
                ErrorClass::Retryable => {}
            }
            // Retryable, or ambiguous with nothing applied.
            if self.attempts >= retry.max_attempts.get() {
                return self.exhausted(Some(&error), "attempts ran out");
            }
            let delay = self.shared.delays.delay(self.attempts, error.retry_after);
            if self.meta.elapsed() + delay > retry.horizon {
                return self.exhausted(Some(&error), "the retry horizon would be passed");
            }
            last_error = Some(error);
            let in_process =
                calls_here < retry.in_process_attempts.get() && delay <= retry.in_process_max_wait;
            if !in_process {
                return self.later(delay, None, None);
            }
            metrics::counter!("approval_retries_scheduled_total", "provider" => self.provider.name(), "level" => "in_process")
                .increment(1);
            debug!(delay_ms = delay.as_millis() as u64, "retrying in process");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                // Draining: hand the wait to a retry queue instead of holding shutdown.
                _ = self.shared.shutdown.cancelled() => return self.later(delay, None, None),
            }
        }
    }

    /// Before a repeat call to a provider without idempotency.
    async fn reconcile_before_repeat(&self) -> Option<Settle> {
        match self.provider.read_state(self.decision).await {
            Ok(observed) => match observed.verdict {
                Verdict::AsDecided => Some(self.finish(
                    Status::AlreadyApplied,
                    "reconciled",
                    Some(observed.state),
                    Some(observed.response),
                    None,
                )),
                Verdict::Conflict => Some(self.conflict(&observed.state, observed.response)),
                Verdict::Pending => None,
            },
            Err(e) if e.class == ErrorClass::Retryable || e.class == ErrorClass::Ambiguous => {
                // Not knowing the state, do not call: try again later.
                warn!(error = %e, "state read failed before a repeat call");
                if self.past_horizon() {
                    return Some(self.exhausted(Some(&e), "the target's state could not be read"));
                }
                Some(
                    self.later(
                        self.shared
                            .delays
                            .delay(self.attempts.max(1), e.retry_after),
                        None,
                        None,
                    ),
                )
            }
            Err(e) => {
                warn!(error = %e, "state read refused before a repeat call");
                Some(self.failed(ErrorKind::RejectedByProvider, &e, "reconciled"))
            }
        }
    }

    fn past_horizon(&self) -> bool {
        self.meta.elapsed() > self.shared.settings.retry.horizon
    }

    /// Polls a human confirmation; `Ok` when allowed (replay the call).
    async fn await_confirmation(
        &self,
        token: &str,
        expires_at: Option<&str>,
    ) -> Result<(), Box<Settle>> {
        let expired = expires_at
            .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
            .is_some_and(|t| t <= OffsetDateTime::now_utc());
        match self.provider.poll_confirmation(token).await {
            Ok(ConfirmationState::Allowed) => Ok(()),
            Ok(ConfirmationState::Denied) => {
                Err(Box::new(self.denied("the confirmation was denied")))
            }
            Ok(ConfirmationState::Waiting) if expired || self.past_horizon() => {
                Err(Box::new(self.denied("the confirmation expired")))
            }
            Ok(ConfirmationState::Waiting) => Err(Box::new(self.later(
                CONFIRMATION_POLL,
                Some((token.to_owned(), expires_at.map(str::to_owned))),
                None,
            ))),
            Err(e) if e.class == ErrorClass::Retryable || e.class == ErrorClass::Ambiguous => {
                if expired {
                    return Err(Box::new(self.denied("the confirmation expired")));
                }
                Err(Box::new(self.later(
                    CONFIRMATION_POLL.max(e.retry_after.unwrap_or_default()),
                    Some((token.to_owned(), expires_at.map(str::to_owned))),
                    None,
                )))
            }
            Err(e) => Err(Box::new(self.failed(
                ErrorKind::ConfirmationDenied,
                &e,
                "call",
            ))),
        }
    }

    fn confirmation_started(
        &self,
        token: String,
        expires_at: Option<String>,
        response: serde_json::Value,
    ) -> Settle {
        let mut event = base_event(self.decision, self.meta, Status::AwaitingConfirmation);
        event.attempts = self.attempts;
        event.resolution = Some("call");
        event.provider_response = Some(bound_response(response));
        event.confirmation = Some(Confirmation {
            kind: format!("{}_sca", self.provider.name()),
            expires_at: expires_at.clone(),
        });
        self.later(CONFIRMATION_POLL, Some((token, expires_at)), Some(event))
    }

    fn finish(
        &self,
        status: Status,
        resolution: &'static str,
        state: Option<String>,
        response: Option<serde_json::Value>,
        error: Option<OutcomeError>,
    ) -> Settle {
        let mut event = base_event(self.decision, self.meta, status);
        event.attempts = self.attempts;
        event.resolution = Some(resolution);
        event.provider_state = state;
        event.provider_response = response.map(bound_response);
        event.error = error;
        Settle::Final(Box::new(event))
    }

    fn failed(&self, kind: ErrorKind, e: &CallError, resolution: &'static str) -> Settle {
        let state = e
            .response
            .as_ref()
            .and_then(|r| r.get("status"))
            .and_then(|s| s.as_str())
            .map(str::to_owned);
        self.finish(
            Status::Failed,
            resolution,
            state,
            e.response.clone(),
            Some(OutcomeError {
                kind,
                message: e.message.clone(),
                http_status: e.http_status,
                provider_code: e.provider_code.clone(),
            }),
        )
    }

    fn conflict(&self, state: &str, response: serde_json::Value) -> Settle {
        warn!(provider_state = state, "target decided otherwise");
        self.finish(
            Status::Failed,
            "reconciled",
            Some(state.to_owned()),
            Some(response),
            Some(OutcomeError::new(
                ErrorKind::Conflict,
                format!(
                    "target is {state} at the provider, which contradicts {}",
                    self.decision.action.as_str()
                ),
            )),
        )
    }

    fn denied(&self, why: &str) -> Settle {
        self.finish(
            Status::Failed,
            "call",
            None,
            None,
            Some(OutcomeError::new(ErrorKind::ConfirmationDenied, why)),
        )
    }

    fn exhausted(&self, last: Option<&CallError>, why: &str) -> Settle {
        let message = match last {
            Some(e) => format!("{why} after {} calls; last error: {e}", self.attempts),
            None => format!("{why} after {} calls", self.attempts),
        };
        self.finish(
            Status::Failed,
            "call",
            None,
            last.and_then(|e| e.response.clone()),
            Some(OutcomeError {
                kind: ErrorKind::Exhausted,
                message,
                http_status: last.and_then(|e| e.http_status),
                provider_code: last.and_then(|e| e.provider_code.clone()),
            }),
        )
    }

    fn later(
        &self,
        delay: Duration,
        confirmation: Option<(String, Option<String>)>,
        event: Option<OutcomeEvent>,
    ) -> Settle {
        metrics::counter!("approval_retries_scheduled_total", "provider" => self.provider.name(), "level" => "queue")
            .increment(1);
        info!(
            delay_ms = delay.as_millis() as u64,
            "decision moves to a retry queue"
        );
        Settle::Later {
            delay,
            attempts: self.attempts,
            confirmation,
            event: event.map(Box::new),
        }
    }
}

/// Publishes what `settle` needs, each with a confirm.
async fn deliver(
    shared: &Shared,
    publisher: &Publisher,
    delivery: &Delivery,
    meta: &Meta,
    settle: Settle,
) -> Result<(), broker::PublishError> {
    let topology = &shared.topology;
    match settle {
        Settle::Final(mut event) => {
            event.completed_at = rfc3339(OffsetDateTime::now_utc());
            let kind = event.error.as_ref().map(|e| e.kind);
            metrics::counter!(
                "approval_decisions_total",
                "provider" => provider_label(&shared.registry, event.provider.as_deref()),
                "action" => action_label(event.action.as_deref()),
                "status" => event.status.as_str(),
            )
            .increment(1);
            let outcome = publish_outcome(shared, publisher, &event);
            if event.status.is_parked() {
                let kind = kind.unwrap_or(ErrorKind::Invalid);
                let error = event
                    .error
                    .as_ref()
                    .map(|e| e.message.as_str())
                    .unwrap_or_default();
                let mut h = carried_headers(delivery);
                headers::set_str(&mut h, headers::ERROR_KIND, kind.as_str());
                headers::set_str(&mut h, headers::ERROR, error);
                headers::set_int(&mut h, headers::ATTEMPTS, i64::from(event.attempts));
                headers::set_str(
                    &mut h,
                    headers::FIRST_RECEIVED_AT,
                    &rfc3339(meta.first_received_at),
                );
                let props = headers::copy_properties(&delivery.properties, h);
                let dead = topology.dead();
                let park = publisher.publish("", &dead, &delivery.data, props, true);
                // Parking and retries are the rare paths: their second
                // publish lives on the heap, so every in-flight decision's
                // task stays the size of the common single publish.
                tokio::try_join!(Box::pin(outcome), Box::pin(park))?;
                metrics::counter!("approval_parked_total", "kind" => kind.as_str()).increment(1);
                info!(
                    status = event.status.as_str(),
                    error_kind = kind.as_str(),
                    "parked"
                );
            } else {
                outcome.await?;
            }
            Ok(())
        }
        Settle::Later {
            delay,
            attempts,
            confirmation,
            event,
        } => {
            let queue = topology.retry_tier(delay);
            let mut h = carried_headers(delivery);
            headers::set_int(&mut h, headers::ATTEMPTS, i64::from(attempts));
            headers::set_str(
                &mut h,
                headers::FIRST_RECEIVED_AT,
                &rfc3339(meta.first_received_at),
            );
            if let Some((token, expires_at)) = &confirmation {
                headers::set_str(&mut h, headers::CONFIRMATION_TOKEN, token);
                if let Some(at) = expires_at {
                    headers::set_str(&mut h, headers::CONFIRMATION_EXPIRES_AT, at);
                }
            }
            let props = headers::copy_properties(&delivery.properties, h)
                .with_expiration(delay.as_millis().max(1).to_string().into());
            let retry = Box::pin(publisher.publish("", &queue, &delivery.data, props, true));
            match event {
                Some(event) => {
                    tokio::try_join!(Box::pin(publish_outcome(shared, publisher, &event)), retry)?;
                }
                None => retry.await?,
            }
            debug!(%queue, "scheduled");
            Ok(())
        }
    }
}

/// The original headers minus our bookkeeping and the broker's delivery
/// history, which must not travel into a new copy of the message.
fn carried_headers(delivery: &Delivery) -> FieldTable {
    headers::without(delivery.properties.headers().as_ref(), headers::HISTORY)
}

async fn publish_outcome(
    shared: &Shared,
    publisher: &Publisher,
    event: &OutcomeEvent,
) -> Result<(), broker::PublishError> {
    let props = outcome_properties(&event.event_id.to_string(), event.decision_id.as_deref());
    publisher
        .publish(
            &shared.outcomes_exchange,
            &event.routing_key(),
            &event.to_json(),
            props,
            false,
        )
        .await
}

/// The AMQP properties of an outcome event (CONTRACT.md); the bench's
/// ceiling relay sends the same set.
pub fn outcome_properties(event_id: &str, decision_id: Option<&str>) -> BasicProperties {
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(event_id.into())
        .with_app_id("approval-worker".into())
        .with_type("approval.outcome".into())
        .with_timestamp(OffsetDateTime::now_utc().unix_timestamp().max(0) as u64);
    match decision_id {
        Some(id) => props.with_correlation_id(id.into()),
        None => props,
    }
}

/// Bounded label values: an unreadable message must not mint new series,
/// and a known value is a static string, so counting allocates nothing.
fn provider_label(registry: &Registry, value: Option<&str>) -> &'static str {
    registry
        .names()
        .find(|(name, _)| Some(*name) == value)
        .map_or("unknown", |(name, _)| name)
}

fn action_label(value: Option<&str>) -> &'static str {
    [Action::Approve, Action::Reject]
        .into_iter()
        .map(Action::as_str)
        .find(|a| Some(*a) == value)
        .unwrap_or("unknown")
}
