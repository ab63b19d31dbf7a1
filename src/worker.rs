//! The worker: the flow of one decision, top to bottom.
//!
//! receive → validate → dispatch to the provider (with retries and
//! reconciliation) → classify → publish the outcome (and park or schedule a
//! retry) with confirms → acknowledge.
//!
//! A decision is acknowledged only after everything it needs published was
//! confirmed by the broker; anything else leaves it unacknowledged, so the
//! broker redelivers it and the same idempotency key is used again. The
//! broker session that feeds the flow is `broker::Session`; the broker side
//! of one decision is `broker::Delivery`.

mod authenticate;
mod labels;
mod settle;

use std::{sync::Arc, time::Duration};

use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, field, info, info_span, warn};

use settle::{Dispatched, Ending, Settle};

use crate::{
    authn::{self, SignatureHeaders},
    broker::{Delivery, History, Origin, PendingConfirmation, Session, Topology},
    decision::{self, Decision},
    isolation::{Gate, Isolation, Refusal},
    locks::{ProviderShares, TargetLocks},
    outcome::{ErrorKind, Resolution},
    providers::{Bound, CallContext, ConfirmationState, Lookup, Registry, Reply},
    readiness::Readiness,
    retry::{CallError, ErrorClass, RetryDelays},
    settings::{AuthMode, Settings},
};

/// How often a pending human confirmation is polled (Qonto allows 1/s).
const CONFIRMATION_POLL: Duration = Duration::from_secs(1);

/// The least wait of a decision whose provider's share was full.
const BUSY_DEFERRAL: Duration = Duration::from_secs(1);

/// What every delivery task shares.
struct Shared {
    settings: Settings,
    registry: Registry,
    delays: RetryDelays,
    locks: TargetLocks,
    /// How many deliveries each provider may hold at once.
    shares: ProviderShares,
    /// Each provider's pause, breaker, concurrency and rate limit, which
    /// every call passes.
    isolation: Arc<Isolation>,
    shutdown: CancellationToken,
    /// Where concurrent deliveries pool their Ed25519 signatures.
    batcher: authn::Batcher,
}

pub struct Worker {
    shared: Arc<Shared>,
    session: Session,
    readiness: Arc<Readiness>,
}

impl Worker {
    pub fn new(settings: Settings, registry: Registry, shutdown: CancellationToken) -> Self {
        let topology = Topology::new(&settings.amqp.prefix, settings.amqp.delivery_limit);
        let readiness = Arc::new(Readiness::default());
        readiness.watch_providers(registry.clone());
        let session = Session::new(&settings, topology, readiness.clone(), shutdown.clone());
        let delays = RetryDelays {
            initial: settings.retry.initial_backoff,
            max: settings.retry.max_backoff,
            horizon: settings.retry.horizon,
        };
        let names = registry.names().map(|(name, _)| name);
        let isolation = Arc::new(Isolation::new(&settings, names));
        Self {
            shared: Arc::new(Shared {
                shares: ProviderShares::new(provider_share(settings.amqp.prefetch.get())),
                isolation,
                settings,
                registry,
                delays,
                locks: TargetLocks::default(),
                shutdown,
                batcher: authn::Batcher::default(),
            }),
            session,
            readiness,
        }
    }

    pub fn health(&self) -> Arc<Readiness> {
        self.readiness.clone()
    }

    /// Each provider's isolation state, for `/status` and `/metrics`.
    pub(crate) fn isolation(&self) -> Arc<Isolation> {
        self.shared.isolation.clone()
    }

    /// Runs until the shutdown token fires and in-flight decisions drained.
    pub async fn run(self) {
        let shared = self.shared;
        let handler = move |delivery| {
            let shared = shared.clone();
            async move { handle(&shared, delivery).await }
        };
        self.session.run(handler).await;
    }
}

/// Of a prefetch window, the deliveries one provider may hold at once: the
/// rest stays free for the others while that provider is slow or down.
fn provider_share(prefetch: u16) -> usize {
    let prefetch = usize::from(prefetch);
    (prefetch - prefetch / 4).max(1)
}

/// One delivery: receive, decide (validate, dispatch, classify), publish,
/// acknowledge.
async fn handle(shared: &Shared, delivery: Delivery) {
    let history = delivery.history();
    let span = info_span!(
        "decision",
        decision_id = field::Empty,
        provider = field::Empty,
        action = field::Empty,
        attempt = history.attempts,
        // A copy of ours (retry tier, parking lot): its history counts.
        copy = history.vouched,
    );
    // Publishing gets the budget's last part: each publish waits at most
    // the confirm timeout, and they run side by side.
    let worker = &shared.settings.worker;
    let deadline = Instant::now() + worker.delivery_budget - worker.confirm_timeout;
    async {
        let decided = tokio::select! {
            biased;
            // The next session gets this delivery again; calling its
            // provider now would apply a decision that cannot be reported.
            _ = delivery.session_lost() => {
                warn!("the broker session was lost; the decision is left for the next session");
                return;
            }
            decided = decide(shared, &delivery, &history, deadline) => decided,
        };
        let (Ok(settle) | Err(settle)) = decided;
        let published = settle.publish(&delivery, &history, &shared.registry).await;
        delivery.acknowledge(published).await;
    }
    .instrument(span)
    .await
}

/// Verifies and validates the delivery and runs it against its provider;
/// `Err` is how one refused before any call is settled.
async fn decide(
    shared: &Shared,
    delivery: &Delivery,
    history: &History,
    deadline: Instant,
) -> Result<Settle, Settle> {
    let body = delivery.body();
    let (signature, origin) = (delivery.signature(), delivery.origin());
    verify(shared, signature, &origin, body, history).await?;
    let decision = parse(body, history)?;
    authorize(shared, &origin, &decision, body, history)?;
    let call = validate(shared, &decision, body, history)?;
    // The broker's own delivery limit dead-letters without our headers; park
    // one delivery earlier, with the reason, so the parking lot explains it.
    if history.delivery_count + 1 >= i64::from(shared.settings.amqp.delivery_limit) {
        return poisoned(shared, &decision, call.as_ref(), history, deadline).await;
    }
    let (dispatched, ending) = dispatch(shared, &decision, call.as_ref(), history, deadline).await;
    Ok(dispatched.classify(ending))
}

/// A decision delivered too often without settling is not called again,
/// but its target is read first: one that already shows the decided state
/// (applied before a crash that kept recurring) is reported as it is, not
/// parked as if nothing had happened.
async fn poisoned(
    shared: &Shared,
    decision: &Decision,
    call: &dyn Bound,
    history: &History,
    deadline: Instant,
) -> Result<Settle, Settle> {
    let gate = shared.isolation.gate(call.provider());
    let read = tokio::time::timeout_at(deadline, gated(gate, deadline, call.read_state())).await;
    let ending = match read {
        Ok(Ok(Ok(observed))) => settle::reconciled(observed),
        Ok(Ok(Err(e))) => {
            warn!(error = %e, "state read of a poison decision failed");
            None
        }
        Ok(Err(refusal)) => {
            warn!(
                reason = refusal.reason,
                "state read of a poison decision not made: {}",
                refusal.why()
            );
            None
        }
        Err(_) => None,
    };
    match ending {
        Some(ending) => {
            let dispatched = Dispatched {
                decision,
                history,
                provider: call.provider(),
                attempts: history.attempts,
            };
            Ok(dispatched.classify(ending))
        }
        None => Err(settle::poison(decision, history)),
    }
}

/// Upstream's signature, before anything of the body is trusted.
async fn verify(
    shared: &Shared,
    signature: SignatureHeaders<'_>,
    origin: &Origin<'_>,
    body: &[u8],
    history: &History,
) -> Result<(), Settle> {
    let auth = &shared.settings.auth;
    if auth.mode == AuthMode::Off {
        return Ok(());
    }
    let batcher = &shared.batcher;
    let checked = authenticate::signature(auth, batcher, signature, origin, body, history).await;
    judged(shared, checked, || authenticate::echo(body), body, history)
}

/// The routing key and the publisher, once the body says what it decides.
fn authorize(
    shared: &Shared,
    origin: &Origin<'_>,
    decision: &Decision,
    body: &[u8],
    history: &History,
) -> Result<(), Settle> {
    let auth = &shared.settings.auth;
    if auth.mode == AuthMode::Off {
        return Ok(());
    }
    let checked = authenticate::publisher(auth, origin, decision);
    judged(shared, checked, || decision.echo(), body, history)
}

/// A refusal the authenticity mode enforces settles the decision as
/// invalid (`monitor` logs and counts it, and goes on).
fn judged(
    shared: &Shared,
    checked: Result<(), authenticate::Refusal>,
    echo: impl FnOnce() -> decision::Echo,
    body: &[u8],
    history: &History,
) -> Result<(), Settle> {
    authenticate::judged(shared.settings.auth.mode, checked)
        .map_err(|r| settle::invalid(echo(), r.kind, r.problem, history, body))
}

fn parse(body: &[u8], history: &History) -> Result<Decision, Settle> {
    let decision = decision::parse(body)
        .map_err(|e| settle::invalid(*e.echo, ErrorKind::Invalid, e.problem, history, body))?;
    let span = Span::current();
    span.record("decision_id", decision.decision_id.as_str());
    span.record("provider", decision.provider.as_str());
    span.record("action", decision.action.as_str());
    Ok(decision)
}

/// The decision bound to its provider with its target parsed, or why not.
fn validate<'a>(
    shared: &'a Shared,
    decision: &'a Decision,
    body: &[u8],
    history: &History,
) -> Result<Box<dyn Bound + 'a>, Settle> {
    let invalid = |kind, problem| settle::invalid(decision.echo(), kind, problem, history, body);
    let client = match shared.registry.lookup(&decision.provider) {
        Lookup::Enabled(client) => client,
        Lookup::Disabled => {
            let problem = format!(
                "provider {} is disabled: its credentials are not configured",
                decision.provider
            );
            return Err(invalid(ErrorKind::ProviderDisabled, problem));
        }
        Lookup::Unknown => {
            let known: Vec<_> = shared.registry.names().map(|(n, _)| n).collect();
            let problem = format!("provider must be one of {}", known.join(", "));
            return Err(invalid(ErrorKind::Invalid, problem));
        }
    };
    client
        .bind(decision)
        .map_err(|problem| invalid(ErrorKind::Invalid, problem))
}

/// Runs the decision against its provider, one decision per target at a
/// time, within its provider's share of the prefetch window and before
/// `deadline`; returns how it ended, with the calls made in all.
async fn dispatch<'a>(
    shared: &Shared,
    decision: &'a Decision,
    call: &dyn Bound,
    history: &'a History,
    deadline: Instant,
) -> (Dispatched<'a>, Ending) {
    let provider = call.provider();
    let mut dispatch = Dispatch {
        shared,
        call,
        gate: shared.isolation.gate(provider),
        deadline,
        decision,
        history,
        attempts: history.attempts,
    };
    let wait = shared.settings.worker.call_wait;
    let ending = match shared.shares.acquire(provider, wait).await {
        // A full share frees at the pace of its provider's calls: coming
        // back sooner would only take a slot from another provider again.
        None => dispatch.deferred(
            "busy",
            BUSY_DEFERRAL,
            "its provider's share of the prefetch window stayed full",
        ),
        Some(_share) => {
            let target = call.target_key();
            let run = async {
                let _guard = shared.locks.lock(format!("{provider}/{target}")).await;
                dispatch.run().await
            };
            match tokio::time::timeout_at(deadline, run).await {
                Ok(ending) => ending,
                Err(_) => {
                    let why = "the delivery's time budget ran out";
                    dispatch.deferred("budget", Duration::ZERO, why)
                }
            }
        }
    };
    let dispatched = Dispatched {
        decision,
        history,
        provider: call.provider(),
        attempts: dispatch.attempts,
    };
    (dispatched, ending)
}

/// `call` through `gate` (when the provider has one) before `deadline`:
/// admitted, made, and its result taught to the gate; or refused unmade.
async fn gated<T>(
    gate: Option<&Gate>,
    deadline: Instant,
    call: impl Future<Output = Result<T, CallError>>,
) -> Result<Result<T, CallError>, Refusal> {
    let Some(gate) = gate else {
        return Ok(call.await);
    };
    let permit = gate.admit(deadline).await?;
    let result = call.await;
    permit.record(&result);
    Ok(result)
}

/// One decision against its provider: calls, retries, reconciliation.
struct Dispatch<'a> {
    shared: &'a Shared,
    call: &'a dyn Bound,
    /// The provider's isolation gate, which every call passes.
    gate: Option<&'a Gate>,
    deadline: Instant,
    decision: &'a Decision,
    history: &'a History,
    /// Provider calls made so far, across deliveries.
    attempts: u32,
}

impl Dispatch<'_> {
    async fn run(&mut self) -> Ending {
        let shared = self.shared;
        let retry = &shared.settings.retry;
        let mut ctx = CallContext {
            idempotency_key: self.decision.idempotency_key.clone(),
            attempt: self.attempts,
            confirmation_token: None,
        };
        if let Some(pending) = &self.history.confirmation {
            if let Some(ending) = self.await_confirmation(pending).await {
                return ending;
            }
            ctx.confirmation_token = Some(pending.token.clone());
        }

        let mut calls_here = 0u32;
        let mut last_error: Option<CallError> = None;
        // A redelivery may follow a crash after the provider was called.
        let mut maybe_called = self.history.redelivered || self.history.delivery_count > 0;
        loop {
            // Without server-side idempotency a repeat call could apply the
            // decision twice: read the target first.
            if (self.attempts > 0 || maybe_called) && !self.call.idempotent() {
                maybe_called = false;
                if let Some(ending) = self.reconcile_before_repeat().await {
                    return ending;
                }
            }
            if self.attempts >= retry.max_attempts.get() {
                return Ending::exhausted(last_error, "attempts ran out");
            }
            // Before the attempt is counted: a call the gate refuses is
            // never made, so it spends nothing.
            let permit = match self.gate.map(|g| g.admit(self.deadline)) {
                None => None,
                Some(admit) => match admit.await {
                    Ok(permit) => Some(permit),
                    Err(refusal) => return self.gate_deferred(refusal),
                },
            };
            self.attempts += 1;
            calls_here += 1;
            ctx.attempt = self.attempts;
            Span::current().record("attempt", self.attempts);
            let result = self.call.apply(&ctx).await;
            if let Some(permit) = permit {
                permit.record(&result);
            }
            let error = match result {
                Ok(Reply::Done { state, response }) => {
                    info!(provider_state = state.as_deref().unwrap_or(""), "applied");
                    return Ending::Applied { state, response };
                }
                Ok(Reply::NeedsConfirmation {
                    token,
                    expires_at,
                    response,
                }) => {
                    info!("waiting for a human confirmation");
                    let pending = PendingConfirmation { token, expires_at };
                    return Ending::ConfirmationStarted { pending, response };
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
            let refused = Ending::refused;
            match error.class {
                ErrorClass::Permanent => {
                    return refused(ErrorKind::RejectedByProvider, error, Resolution::Call);
                }
                ErrorClass::Auth => {
                    return refused(ErrorKind::Unauthorized, error, Resolution::Call);
                }
                ErrorClass::ChallengeMismatch => {
                    return refused(ErrorKind::ChallengeMismatch, error, Resolution::Call);
                }
                ErrorClass::Ambiguous => match self.gated(self.call.read_state()).await {
                    // Not knowing the state, call nothing now.
                    Err(refusal) => return self.gate_deferred(refusal),
                    Ok(Ok(observed)) => match settle::reconciled(observed) {
                        Some(ending) => return ending,
                        // A 4xx on a still-pending target is a real refusal;
                        // a timeout on one means nothing happened: retry.
                        None if error.http_status.is_some() => {
                            let kind = ErrorKind::RejectedByProvider;
                            return refused(kind, error, Resolution::Reconciled);
                        }
                        None => {}
                    },
                    Ok(Err(read)) => {
                        warn!(error = %read, "reconciliation read failed");
                        // A read that may pass later leaves the state unknown:
                        // retry (the repeat reads first where the provider has
                        // no idempotency) rather than report `failed` on a guess.
                        let unknown = read.class.is_transient();
                        if error.http_status.is_some() && !unknown {
                            let kind = ErrorKind::RejectedByProvider;
                            return refused(kind, error, Resolution::Call);
                        }
                    }
                },
                ErrorClass::Unavailable => {
                    // Nothing was sent: the attempt is given back.
                    self.attempts -= 1;
                    return self.held(error);
                }
                ErrorClass::Retryable => {}
            }
            // Retryable, or ambiguous with nothing applied.
            if self.attempts >= retry.max_attempts.get() {
                return Ending::exhausted(Some(error), "attempts ran out");
            }
            let delay = shared.delays.delay(self.attempts, error.retry_after);
            if self.history.elapsed() + delay > retry.horizon {
                let why = "the retry horizon would be passed";
                return Ending::exhausted(Some(error), why);
            }
            last_error = Some(error);
            let in_process =
                calls_here < retry.in_process_attempts.get() && delay <= retry.in_process_max_wait;
            let later = Ending::Later {
                delay,
                confirmation: None,
            };
            if !in_process {
                return later;
            }
            metrics::counter!("approval_retries_scheduled_total", "provider" => self.call.provider(), "level" => "in_process")
                .increment(1);
            debug!(delay_ms = delay.as_millis() as u64, "retrying in process");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                // Draining: hand the wait to a retry queue instead of holding shutdown.
                _ = shared.shutdown.cancelled() => return later,
            }
        }
    }

    /// Before a repeat call to a provider without idempotency; `None` when
    /// the target is still pending, so the call may be made.
    async fn reconcile_before_repeat(&self) -> Option<Ending> {
        let read = match self.gated(self.call.read_state()).await {
            Ok(read) => read,
            Err(refusal) => return Some(self.gate_deferred(refusal)),
        };
        match read {
            Ok(observed) => settle::reconciled(observed),
            Err(e) if e.class.is_transient() => {
                // Not knowing the state, do not call: try again later.
                warn!(error = %e, "state read failed before a repeat call");
                if self.past_horizon() {
                    let why = "the target's state could not be read";
                    return Some(Ending::exhausted(Some(e), why));
                }
                let delay = self
                    .shared
                    .delays
                    .delay(self.attempts.max(1), e.retry_after);
                Some(Ending::Later {
                    delay,
                    confirmation: None,
                })
            }
            Err(error) => {
                warn!(error = %error, "state read refused before a repeat call");
                let kind = ErrorKind::RejectedByProvider;
                let resolution = Resolution::Reconciled;
                Some(Ending::Refused {
                    kind,
                    error,
                    resolution,
                })
            }
        }
    }

    /// Hands the decision to a retry tier without a call, for at least
    /// `at_least`, keeping any pending confirmation; `None` once the retry
    /// horizon has passed. Every such wait obeys one rule: a decision is
    /// deferred up to the horizon, never past it (a wait that would pass it
    /// is cut to end there), and only one still deferred then ends.
    fn defer(
        &self,
        reason: &'static str,
        at_least: Duration,
        why: &dyn std::fmt::Display,
    ) -> Option<Ending> {
        let left = self
            .shared
            .settings
            .retry
            .horizon
            .checked_sub(self.history.elapsed())
            .filter(|left| !left.is_zero())?;
        let delays = &self.shared.delays;
        let delay = delays.delay(self.attempts.max(1), Some(at_least)).min(left);
        let provider = self.call.provider();
        metrics::counter!("approval_deferrals_total", "provider" => provider, "reason" => reason)
            .increment(1);
        let retry_in_ms = delay.as_millis() as u64;
        info!(reason, retry_in_ms, "{why}; moved to a retry queue");
        Some(Ending::Later {
            delay,
            confirmation: self.history.confirmation.clone(),
        })
    }

    /// The worker itself could not go on here (the provider's share of the
    /// prefetch window stayed full, or the delivery's budget ran out); the
    /// attempts made so far stay counted (a call cut short may have reached
    /// the provider: the next delivery reads the target first where the
    /// provider has no idempotency).
    fn deferred(&self, reason: &'static str, at_least: Duration, why: &'static str) -> Ending {
        self.defer(reason, at_least, &why)
            .unwrap_or_else(|| Ending::exhausted(None, "the retry horizon passed"))
    }

    /// The client would not call its provider, for at least what it asked;
    /// past the horizon, unusable credentials end `unauthorized`.
    fn held(&self, error: CallError) -> Ending {
        let at_least = error.retry_after.unwrap_or_default();
        if let Some(later) = self.defer("unavailable", at_least, &error) {
            return later;
        }
        if error.provider_code.as_deref() == Some(crate::retry::CREDENTIALS_UNUSABLE) {
            return Ending::refused(ErrorKind::Unauthorized, error, Resolution::Call);
        }
        Ending::exhausted(Some(error), "the retry horizon passed")
    }

    /// A call through the provider's gate, or the gate's refusal.
    async fn gated<T>(
        &self,
        call: impl Future<Output = Result<T, CallError>>,
    ) -> Result<Result<T, CallError>, Refusal> {
        gated(self.gate, self.deadline, call).await
    }

    /// The provider's gate refused a call, which was not made: no attempt
    /// is spent.
    fn gate_deferred(&self, refusal: Refusal) -> Ending {
        self.defer(refusal.reason, refusal.retry_in, &refusal.why())
            .unwrap_or_else(|| Ending::exhausted(None, "the retry horizon passed"))
    }

    fn past_horizon(&self) -> bool {
        self.history.elapsed() > self.shared.settings.retry.horizon
    }

    /// Polls a human confirmation; `None` when allowed (replay the call).
    async fn await_confirmation(&self, pending: &PendingConfirmation) -> Option<Ending> {
        let expired = pending
            .expires_at
            .as_deref()
            .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
            .is_some_and(|t| t <= OffsetDateTime::now_utc());
        let poll_again = |delay| {
            let confirmation = Some(pending.clone());
            Some(Ending::Later {
                delay,
                confirmation,
            })
        };
        let polled = match self
            .gated(self.call.poll_confirmation(&pending.token))
            .await
        {
            Ok(polled) => polled,
            // The deferral keeps the pending confirmation on the copy.
            Err(refusal) => return Some(self.gate_deferred(refusal)),
        };
        match polled {
            Ok(ConfirmationState::Allowed) => None,
            Ok(ConfirmationState::Denied) => Some(Ending::Denied("the confirmation was denied")),
            Ok(ConfirmationState::Waiting) if expired || self.past_horizon() => {
                Some(Ending::Denied("the confirmation expired"))
            }
            Ok(ConfirmationState::Waiting) => poll_again(CONFIRMATION_POLL),
            Err(e) if e.class.is_transient() => {
                if expired {
                    return Some(Ending::Denied("the confirmation expired"));
                }
                poll_again(CONFIRMATION_POLL.max(e.retry_after.unwrap_or_default()))
            }
            Err(error) => {
                let kind = ErrorKind::ConfirmationDenied;
                let resolution = Resolution::Call;
                Some(Ending::Refused {
                    kind,
                    error,
                    resolution,
                })
            }
        }
    }
}
