//! How a decision leaves the worker: classify turns what dispatching
//! established into an outcome (status, error kind, resolution), and
//! publish sends what that outcome needs. Every outcome the flow can reach
//! is built here.

use std::time::Duration;

use serde_json::Value;
use time::OffsetDateTime;
use tracing::{info, warn};

use super::{CONFIRMATION_POLL, labels};
use crate::{
    broker::{Delivery, History, PendingConfirmation, PublishError},
    decision::{Decision, Echo},
    outcome::{
        Confirmation, ErrorKind, OutcomeError, OutcomeEvent, Resolution, Status, bound_response,
        rfc3339,
    },
    providers::{Observed, Registry, Verdict},
    retry::CallError,
};

/// What dispatching a decision established.
pub(super) enum Ending {
    /// The provider accepted the decision call.
    Applied {
        state: Option<String>,
        response: Value,
    },
    /// The provider asks a human to confirm first.
    ConfirmationStarted {
        pending: PendingConfirmation,
        response: Value,
    },
    /// The target's state, read back, is already as decided.
    AlreadyApplied { state: String, response: Value },
    /// The target's state, read back, contradicts the decision.
    Conflict { state: String, response: Value },
    /// The provider refused the call or the state read.
    Refused {
        kind: ErrorKind,
        error: CallError,
        resolution: Resolution,
    },
    /// No more calls are allowed (attempts or horizon).
    Exhausted {
        last: Option<CallError>,
        why: &'static str,
    },
    /// The human confirmation was denied or expired.
    Denied(&'static str),
    /// Nothing settled yet: try again after `delay` through a retry queue.
    Later {
        delay: Duration,
        confirmation: Option<PendingConfirmation>,
    },
}

impl Ending {
    pub(super) fn refused(kind: ErrorKind, error: CallError, resolution: Resolution) -> Self {
        Self::Refused {
            kind,
            error,
            resolution,
        }
    }

    pub(super) fn exhausted(last: Option<CallError>, why: &'static str) -> Self {
        Self::Exhausted { last, why }
    }
}

/// The one reading of a target's state: `None` while it is still pending.
pub(super) fn reconciled(observed: Observed) -> Option<Ending> {
    let Observed {
        state,
        verdict,
        response,
    } = observed;
    match verdict {
        Verdict::AsDecided => Some(Ending::AlreadyApplied { state, response }),
        Verdict::Conflict => Some(Ending::Conflict { state, response }),
        Verdict::Pending => None,
    }
}

/// The decision a dispatch ran for, and how many calls it made in all.
pub(super) struct Dispatched<'a> {
    pub decision: &'a Decision,
    pub history: &'a History,
    pub provider: &'static str,
    pub attempts: u32,
}

impl Dispatched<'_> {
    pub(super) fn classify(&self, ending: Ending) -> Settle {
        match ending {
            Ending::Applied { state, response } => self.finish(
                Status::Applied,
                Resolution::Call,
                state,
                Some(response),
                None,
            ),
            Ending::ConfirmationStarted { pending, response } => {
                let mut event = self.event(Status::AwaitingConfirmation, Resolution::Call);
                event.provider_response = Some(bound_response(response));
                event.confirmation = Some(Confirmation {
                    kind: format!("{}_sca", self.provider),
                    expires_at: pending.expires_at.clone(),
                });
                self.later(CONFIRMATION_POLL, Some(pending), Some(event))
            }
            Ending::AlreadyApplied { state, response } => self.finish(
                Status::AlreadyApplied,
                Resolution::Reconciled,
                Some(state),
                Some(response),
                None,
            ),
            Ending::Conflict { state, response } => {
                warn!(provider_state = state, "target decided otherwise");
                let problem = format!(
                    "target is {state} at the provider, which contradicts {}",
                    self.decision.action.as_str()
                );
                self.finish(
                    Status::Failed,
                    Resolution::Reconciled,
                    Some(state),
                    Some(response),
                    Some(OutcomeError::new(ErrorKind::Conflict, problem)),
                )
            }
            Ending::Refused {
                kind,
                error,
                resolution,
            } => {
                let state = error
                    .response
                    .as_ref()
                    .and_then(|r| r.get("status"))
                    .and_then(|s| s.as_str())
                    .map(str::to_owned);
                self.finish(
                    Status::Failed,
                    resolution,
                    state,
                    error.response,
                    Some(OutcomeError {
                        kind,
                        message: error.message,
                        http_status: error.http_status,
                        provider_code: error.provider_code,
                    }),
                )
            }
            Ending::Exhausted { last, why } => {
                let message = match &last {
                    Some(e) => format!("{why} after {} calls; last error: {e}", self.attempts),
                    None => format!("{why} after {} calls", self.attempts),
                };
                let (response, http_status, provider_code) = match last {
                    Some(e) => (e.response, e.http_status, e.provider_code),
                    None => (None, None, None),
                };
                self.finish(
                    Status::Failed,
                    Resolution::Call,
                    None,
                    response,
                    Some(OutcomeError {
                        kind: ErrorKind::Exhausted,
                        message,
                        http_status,
                        provider_code,
                    }),
                )
            }
            Ending::Denied(why) => self.finish(
                Status::Failed,
                Resolution::Call,
                None,
                None,
                Some(OutcomeError::new(ErrorKind::ConfirmationDenied, why)),
            ),
            Ending::Later {
                delay,
                confirmation,
            } => self.later(delay, confirmation, None),
        }
    }

    fn event(&self, status: Status, resolution: Resolution) -> OutcomeEvent {
        let mut event = base_event(self.decision, self.history, status);
        event.attempts = self.attempts;
        event.resolution = Some(resolution);
        event
    }

    fn finish(
        &self,
        status: Status,
        resolution: Resolution,
        state: Option<String>,
        response: Option<Value>,
        error: Option<OutcomeError>,
    ) -> Settle {
        let mut event = self.event(status, resolution);
        event.provider_state = state;
        event.provider_response = response.map(bound_response);
        event.error = error;
        Settle::Final(Box::new(event))
    }

    fn later(
        &self,
        delay: Duration,
        confirmation: Option<PendingConfirmation>,
        event: Option<OutcomeEvent>,
    ) -> Settle {
        metrics::counter!("approval_retries_scheduled_total", "provider" => self.provider, "level" => "queue")
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

/// How a decision leaves the worker.
pub(super) enum Settle {
    /// Publish `event`; park the original when the status says so.
    Final(Box<OutcomeEvent>),
    /// Schedule another delivery after `delay` through a retry queue, with
    /// an event to publish first (`awaiting_confirmation`).
    Later {
        delay: Duration,
        attempts: u32,
        confirmation: Option<PendingConfirmation>,
        event: Option<Box<OutcomeEvent>>,
    },
}

impl Settle {
    /// Publishes what this settlement needs, each with a confirm.
    pub(super) async fn publish(
        self,
        delivery: &Delivery,
        history: &History,
        registry: &Registry,
    ) -> Result<(), PublishError> {
        match self {
            Settle::Final(mut event) => {
                event.completed_at = rfc3339(OffsetDateTime::now_utc());
                let outcome = delivery.publish_outcome(&event);
                if event.status.is_parked() {
                    let kind = event.error.as_ref().map_or(ErrorKind::Invalid, |e| e.kind);
                    let error = event.error.as_ref().map_or("", |e| e.message.as_str());
                    let park = delivery.park(history, event.attempts, kind.as_str(), error);
                    // Parking and retries are the rare paths: their second publish
                    // lives on the heap, so every in-flight decision's task stays
                    // the size of the common single publish.
                    tokio::try_join!(Box::pin(outcome), Box::pin(park))?;
                    metrics::counter!("approval_parked_total", "kind" => kind.as_str())
                        .increment(1);
                    info!(
                        status = event.status.as_str(),
                        error_kind = kind.as_str(),
                        "parked"
                    );
                } else {
                    outcome.await?;
                }
                // Counted once the broker confirmed the event: a publish
                // that failed is redelivered and would be counted twice.
                metrics::counter!(
                    "approval_decisions_total",
                    "provider" => labels::provider(registry, event.provider.as_deref()),
                    "action" => labels::action(event.action.as_deref()),
                    "status" => event.status.as_str(),
                )
                .increment(1);
                Ok(())
            }
            Settle::Later {
                delay,
                attempts,
                confirmation,
                event,
            } => {
                let retry = delivery.retry_in_tier(history, delay, attempts, confirmation.as_ref());
                let retry = Box::pin(retry);
                match event {
                    Some(event) => {
                        let outcome = Box::pin(delivery.publish_outcome(&event));
                        tokio::try_join!(outcome, retry).map(|_| ())
                    }
                    None => retry.await,
                }
            }
        }
    }
}

/// A decision that cannot be applied: unreadable, or refused before any call.
pub(super) fn invalid(
    echo: Echo,
    kind: ErrorKind,
    problem: String,
    history: &History,
    body: &[u8],
) -> Settle {
    warn!(error_kind = kind.as_str(), problem = %problem, "decision not applied");
    let mut event = OutcomeEvent::new(echo, Status::Invalid, history.received_at, body);
    // Nothing was sent with it.
    event.idempotency_key = None;
    event.error = Some(OutcomeError::new(kind, problem));
    event.attempts = history.attempts;
    Settle::Final(Box::new(event))
}

/// Delivered too often without settling: parked before the broker's own
/// delivery limit would dead-letter it without our headers.
pub(super) fn poison(decision: &Decision, history: &History) -> Settle {
    let mut event = base_event(decision, history, Status::Failed);
    event.error = Some(OutcomeError::new(
        ErrorKind::Poison,
        format!(
            "delivered {} times without settling; parked to stop the loop",
            history.delivery_count + 1
        ),
    ));
    Settle::Final(Box::new(event))
}

fn base_event(d: &Decision, history: &History, status: Status) -> OutcomeEvent {
    let mut e = OutcomeEvent::new(d.echo(), status, history.received_at, &[]);
    e.attempts = history.attempts;
    e
}
