//! What every provider is to the rest of the program: the [`Provider`]
//! trait the worker calls, and the [`Unit`] a registry line names. A leaf:
//! it imports no provider, so each provider can import it without a cycle.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use super::http;
use crate::{
    decision::Decision,
    retry::{CallError, ErrorClass},
    settings::{ProviderSections, SettingsError},
    tools::sim::unit::SimHalf,
};

/// One provider, whole: its name in decisions, how to build its client from
/// its `[providers.<name>]` section, and its simulator half.
pub struct Unit {
    pub name: &'static str,
    pub build: Build,
    pub sim: &'static dyn SimHalf,
}

pub type Build =
    fn(&ProviderSections, &http::Http) -> Result<Option<Arc<dyn Provider>>, SettingsError>;

/// What a call needs beyond the decision itself.
#[derive(Debug, Clone)]
pub struct CallContext {
    pub idempotency_key: String,
    /// 1-based number of this call across every delivery of the decision.
    pub attempt: u32,
    /// Set when replaying a call after a human confirmed it (an SCA session).
    pub confirmation_token: Option<String>,
}

/// A provider's answer to a decision call that did not fail.
#[derive(Debug, Clone)]
pub enum Reply {
    /// The provider accepted the decision; `state` is the target's state it reports.
    Done {
        state: Option<String>,
        response: Value,
    },
    /// A human must confirm first (for example 428 and an SCA session).
    NeedsConfirmation {
        token: String,
        expires_at: Option<String>,
        response: Value,
    },
}

/// How a target's current state relates to the decision being applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Already in the state the decision asks for.
    AsDecided,
    /// Still waiting for a decision.
    Pending,
    /// Decided the other way, cancelled or expired.
    Conflict,
}

#[derive(Debug, Clone)]
pub struct Observed {
    pub state: String,
    pub verdict: Verdict,
    pub response: Value,
}

/// State of a human confirmation step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfirmationState {
    Waiting,
    Allowed,
    Denied,
}

#[async_trait]
pub trait Provider: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// Whether the provider deduplicates calls on our idempotency key. When
    /// it does not, the worker reads the target's state before any repeat.
    fn idempotent(&self) -> bool {
        false
    }

    /// Provider-specific checks (target shape, id syntax, reason rules),
    /// run before any call. The error names the first problem.
    fn validate(&self, decision: &Decision) -> Result<(), String>;

    /// Identifies the target, so two decisions for it never run at once.
    fn target_key(&self, decision: &Decision) -> String;

    /// Makes one decision call (token calls and challenge reads included).
    async fn apply(&self, decision: &Decision, ctx: &CallContext) -> Result<Reply, CallError>;

    /// Reads the target's current state, for reconciliation.
    async fn read_state(&self, _decision: &Decision) -> Result<Observed, CallError> {
        Err(CallError::new(
            ErrorClass::Permanent,
            format!("{} offers no state read", self.name()),
        ))
    }

    /// Polls a human confirmation step started by [`Reply::NeedsConfirmation`].
    async fn poll_confirmation(&self, _token: &str) -> Result<ConfirmationState, CallError> {
        Err(CallError::new(
            ErrorClass::Permanent,
            format!("{} has no confirmation step", self.name()),
        ))
    }
}
