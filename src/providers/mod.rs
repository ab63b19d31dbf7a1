//! The provider boundary: one small trait, one module per provider, and a
//! registry keyed by the `provider` field of a decision.
//!
//! Adding a provider: write `providers/<name>.rs` with a `build` function
//! and add one line to [`REGISTRY`]. Providers never touch the broker.

use std::{collections::BTreeMap, sync::Arc};

use async_trait::async_trait;
use serde_json::Value;

use crate::{
    decision::Decision,
    retry::{CallError, ErrorClass},
    settings::{ProviderSections, Settings, SettingsError},
};

pub mod auth;
pub mod flexpay;
pub mod http;
pub mod ledger_v1;
pub mod ledger_v2;
pub mod moneypipe;
pub mod qonto;

/// One line per provider: its name in decisions, and how to build it from
/// its `[providers.<name>]` section (`Ok(None)` when it has no credentials).
const REGISTRY: &[(&str, Build)] = &[
    ("qonto", qonto::build),
    ("ledger_v1", ledger_v1::build),
    ("ledger_v2", ledger_v2::build),
    ("moneypipe", moneypipe::build),
    ("flexpay", flexpay::build),
];

pub type Build =
    fn(&ProviderSections, &http::Http) -> Result<Option<Arc<dyn Provider>>, SettingsError>;

/// What a call needs beyond the decision itself.
#[derive(Debug, Clone)]
pub struct CallContext {
    pub idempotency_key: String,
    /// 1-based number of this call across every delivery of the decision.
    pub attempt: u32,
    /// Set when replaying a call after a human confirmed it (Qonto SCA).
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
    /// A human must confirm first (Qonto 428 + SCA session).
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

pub enum Lookup<'a> {
    Enabled(&'a Arc<dyn Provider>),
    Disabled,
    Unknown,
}

/// Every known provider, enabled or not.
#[derive(Clone)]
pub struct Registry {
    providers: BTreeMap<&'static str, Option<Arc<dyn Provider>>>,
}

impl Registry {
    pub fn from_settings(settings: &Settings) -> Result<Self, SettingsError> {
        let http = http::Http::from_settings(&settings.worker)?;
        Self::build(&settings.providers, &http)
    }

    pub fn build(sections: &ProviderSections, http: &http::Http) -> Result<Self, SettingsError> {
        let mut providers = BTreeMap::new();
        for (name, build) in REGISTRY {
            providers.insert(*name, build(sections, http)?);
        }
        Ok(Self { providers })
    }

    /// A registry of hand-built providers, for tests.
    pub fn from_providers(list: Vec<(&'static str, Option<Arc<dyn Provider>>)>) -> Self {
        Self {
            providers: list.into_iter().collect(),
        }
    }

    pub fn lookup(&self, name: &str) -> Lookup<'_> {
        match self.providers.get(name) {
            Some(Some(p)) => Lookup::Enabled(p),
            Some(None) => Lookup::Disabled,
            None => Lookup::Unknown,
        }
    }

    pub fn names(&self) -> impl Iterator<Item = (&'static str, bool)> + '_ {
        self.providers.iter().map(|(n, p)| (*n, p.is_some()))
    }
}
