//! What every provider is to the rest of the program: the typed
//! [`Provider`] trait each client implements, the erased [`Client`] and
//! [`Bound`] the worker holds, and the [`Unit`] a registry line names. A leaf:
//! it imports no provider, so each provider can import it without a cycle.

use std::{fmt, sync::Arc};

use futures_util::future::BoxFuture;
use serde_json::Value;

use super::http;
use crate::{
    decision::Decision,
    retry::{CallError, ErrorClass},
    settings::{ProviderSections, SettingsError, env_key},
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
    fn(&ProviderSections, &http::Http) -> Result<Option<Arc<dyn Client>>, SettingsError>;

/// The one rule for a provider's credentials, all or none: none set
/// disables the provider (the contract's way to run without it), every one
/// set enables it, and a partial set stops start-up naming what is missing,
/// as it is a deployment slip rather than a choice.
pub(crate) fn credentials<T, const N: usize>(
    provider: &str,
    keys: [(&str, Option<T>); N],
) -> Result<Option<[T; N]>, SettingsError> {
    let missing: Vec<String> = keys
        .iter()
        .filter(|(_, value)| value.is_none())
        .map(|(key, _)| env_key(&format!("providers.{provider}.{key}")))
        .collect();
    if missing.len() == N {
        return Ok(None);
    }
    if let Some(first) = missing.first() {
        let set: Vec<String> = keys
            .iter()
            .filter(|(_, value)| value.is_some())
            .map(|(key, _)| env_key(&format!("providers.{provider}.{key}")))
            .collect();
        return Err(SettingsError::Invalid {
            key: first.clone(),
            problem: format!(
                "{} set without {}: set all of them, or none to disable {provider}",
                set.join(", "),
                missing.join(", ")
            ),
        });
    }
    let values: Vec<T> = keys.into_iter().filter_map(|(_, value)| value).collect();
    Ok(values.try_into().ok())
}

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

/// One provider's client, typed: `validate` parses the decision's target
/// once into [`Provider::Target`], and every call takes that parsed target,
/// so no call can meet a target that did not pass validation.
///
/// The futures are named `Send` here rather than boxed: the one box per call
/// is made by the erased [`Bound`] the worker holds.
pub trait Provider: Send + Sync + 'static {
    /// The target as this provider needs it, borrowing from the decision.
    type Target<'d>: Send + Sync + 'd;

    fn name(&self) -> &'static str;

    /// Whether the provider deduplicates calls on our idempotency key. When
    /// it does not, the worker reads the target's state before any repeat.
    fn idempotent(&self) -> bool {
        false
    }

    /// Provider-specific checks (target shape, id syntax, reason rules),
    /// run before any call. The error names the first problem.
    fn validate<'d>(&self, decision: &'d Decision) -> Result<Self::Target<'d>, String>;

    /// Identifies the target, so two decisions for it never run at once.
    fn target_key(&self, target: &Self::Target<'_>) -> String;

    /// Makes one decision call (token calls and challenge reads included).
    fn apply(
        &self,
        decision: &Decision,
        target: &Self::Target<'_>,
        ctx: &CallContext,
    ) -> impl Future<Output = Result<Reply, CallError>> + Send;

    /// Reads the target's current state, for reconciliation.
    fn read_state(
        &self,
        _decision: &Decision,
        _target: &Self::Target<'_>,
    ) -> impl Future<Output = Result<Observed, CallError>> + Send {
        let error = CallError::new(
            ErrorClass::Permanent,
            format!("{} offers no state read", self.name()),
        );
        async move { Err(error) }
    }

    /// What keeps the client from calling its provider at all now (a
    /// revoked OAuth grant), for readiness; `None` when nothing does.
    fn problem(&self) -> Option<String> {
        None
    }

    /// Polls a human confirmation step started by [`Reply::NeedsConfirmation`].
    fn poll_confirmation(
        &self,
        _token: &str,
    ) -> impl Future<Output = Result<ConfirmationState, CallError>> + Send {
        let error = CallError::new(
            ErrorClass::Permanent,
            format!("{} has no confirmation step", self.name()),
        );
        async move { Err(error) }
    }
}

/// A provider as the registry stores it: the type of its target erased.
pub trait Client: Send + Sync + 'static {
    /// Validates `decision` for this provider; the result carries the parsed
    /// target with it, so it is the only way to make a call.
    fn bind<'a>(&'a self, decision: &'a Decision) -> Result<Box<dyn Bound + 'a>, String>;

    /// See [`Provider::problem`].
    fn problem(&self) -> Option<String>;
}

/// One decision bound to its provider and its parsed target.
pub trait Bound: Send + Sync {
    fn provider(&self) -> &'static str;
    fn idempotent(&self) -> bool;
    fn target_key(&self) -> String;
    fn apply<'s>(&'s self, ctx: &'s CallContext) -> BoxFuture<'s, Result<Reply, CallError>>;
    fn read_state(&self) -> BoxFuture<'_, Result<Observed, CallError>>;
    fn poll_confirmation<'s>(
        &'s self,
        token: &'s str,
    ) -> BoxFuture<'s, Result<ConfirmationState, CallError>>;
}

impl fmt::Debug for dyn Bound + '_ {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bound")
            .field("provider", &self.provider())
            .field("target", &self.target_key())
            .finish()
    }
}

impl<P: Provider> Client for P {
    fn bind<'a>(&'a self, decision: &'a Decision) -> Result<Box<dyn Bound + 'a>, String> {
        let target = self.validate(decision)?;
        Ok(Box::new(Binding {
            provider: self,
            decision,
            target,
        }))
    }

    fn problem(&self) -> Option<String> {
        Provider::problem(self)
    }
}

struct Binding<'a, P: Provider> {
    provider: &'a P,
    decision: &'a Decision,
    target: P::Target<'a>,
}

impl<P: Provider> Bound for Binding<'_, P> {
    fn provider(&self) -> &'static str {
        self.provider.name()
    }

    fn idempotent(&self) -> bool {
        self.provider.idempotent()
    }

    fn target_key(&self) -> String {
        self.provider.target_key(&self.target)
    }

    fn apply<'s>(&'s self, ctx: &'s CallContext) -> BoxFuture<'s, Result<Reply, CallError>> {
        Box::pin(self.provider.apply(self.decision, &self.target, ctx))
    }

    fn read_state(&self) -> BoxFuture<'_, Result<Observed, CallError>> {
        Box::pin(self.provider.read_state(self.decision, &self.target))
    }

    fn poll_confirmation<'s>(
        &'s self,
        token: &'s str,
    ) -> BoxFuture<'s, Result<ConfirmationState, CallError>> {
        Box::pin(self.provider.poll_confirmation(token))
    }
}

/// One-shot calls for the client tests, which drive a provider the way the
/// worker does: through [`Client::bind`], never around validation.
#[cfg(test)]
impl dyn Client {
    pub(crate) fn validate(&self, decision: &Decision) -> Result<(), String> {
        self.bind(decision).map(drop)
    }

    pub(crate) async fn apply(
        &self,
        decision: &Decision,
        ctx: &CallContext,
    ) -> Result<Reply, CallError> {
        let call = self
            .bind(decision)
            .map_err(|e| CallError::new(ErrorClass::Permanent, e))?;
        call.apply(ctx).await
    }

    pub(crate) async fn read_state(&self, decision: &Decision) -> Result<Observed, CallError> {
        let call = self
            .bind(decision)
            .map_err(|e| CallError::new(ErrorClass::Permanent, e))?;
        call.read_state().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_all_or_none() {
        let none: [(&str, Option<&str>); 2] = [("id", None), ("secret", None)];
        assert_eq!(credentials("p", none).unwrap(), None);
        let all = [("id", Some("i")), ("secret", Some("s"))];
        assert_eq!(credentials("p", all).unwrap(), Some(["i", "s"]));
        let partial = [("id", Some("i")), ("secret", None), ("extra", None)];
        let Err(SettingsError::Invalid { key, problem }) = credentials("p", partial) else {
            panic!("a partial set must fail");
        };
        assert_eq!(key, "APPROVAL_PROVIDERS__P__SECRET");
        assert!(
            problem.contains("APPROVAL_PROVIDERS__P__SECRET, APPROVAL_PROVIDERS__P__EXTRA"),
            "{problem}"
        );
        assert!(
            problem.contains("APPROVAL_PROVIDERS__P__ID set"),
            "{problem}"
        );
    }
}
