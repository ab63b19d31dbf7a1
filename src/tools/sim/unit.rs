//! The two faces of a provider's simulator half, as the simulator core sees
//! them: [`SimHalf`], what a registry line carries (start it, sample it), and
//! [`SimUnit`], one running fake: its provider's wire behaviour on top of
//! [`Held`], the state every fake keeps the same way. The core reads these
//! traits, provider folders implement them; below it only `kit` and `stats`.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::Response;
use serde_json::Value;

use super::kit::{Fake, ScaAuto, TargetInfo, Targets};
use super::quota::Refusal;
use super::stats::Counters;

/// A provider's simulator half before it runs: what a registry line names.
pub trait SimHalf: Sync {
    /// Path under the simulator's root that the worker's base URL points at.
    fn prefix(&self) -> &'static str;

    /// Starts a fake with this unit's options from `options` (its defaults
    /// when absent).
    fn start(&self, options: &UnitOptions) -> Result<Arc<dyn SimUnit>, String>;

    /// A valid target for a decision with `action` ("approve" or "reject"),
    /// new at every call so it meets a pending target.
    fn sample_target(&self, action: &str) -> Value;

    /// The key the fake files a sample target under (see [`Held::target`]).
    fn sample_key(&self, target: &Value) -> Option<String>;

    /// The target's state, in the provider's vocabulary, once a decision
    /// with `action` ("approve" or "reject") was applied to it.
    fn decided_state(&self, action: &str) -> &'static str;

    /// Whether the worker must obtain an access token from this fake before
    /// deciding (one token then serves every call of a run).
    fn issues_tokens(&self) -> bool {
        false
    }

    /// A target the worker must refuse before any call, with the action it
    /// goes with, when the provider's target shape allows one.
    fn malformed_target(&self) -> Option<(&'static str, Value)> {
        None
    }

    /// HTTP calls one decision costs when nothing fails; the bench measures
    /// units above one on their own.
    fn calls_per_decision(&self) -> u32 {
        1
    }

    /// Sets this unit's options for the benchmark, where the simulator shares
    /// the machine with the worker being measured: work a real provider does
    /// on its own machines (a signature check) can be skipped.
    fn for_bench(&self, _options: &mut UnitOptions) {}

    /// Whether an approval can wait for a human confirmation
    /// ([`SimUnit::require_confirmation`]).
    fn confirms(&self) -> bool {
        false
    }

    /// A fragment of the path of every decision call for the target filed
    /// under `key`, for scripted failures; `None` when the path does not
    /// name that key.
    fn decision_path(&self, _key: &str) -> Option<String> {
        None
    }
}

/// What a fake call is, for the fault layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallKind {
    /// Token exchange: faulted only with `include_auth`.
    Auth,
    /// A sandbox endpoint that plays a human: a test helper, never faulted.
    Helper,
    Read,
    Decision,
}

impl CallKind {
    /// Writes decide, anything else reads.
    pub fn by_method(method: &Method) -> Self {
        if method == Method::POST || method == Method::PUT {
            Self::Decision
        } else {
            Self::Read
        }
    }

    /// Token exchanges live under `auth`; the rest go by method.
    pub fn with_auth_under(auth: &str, method: &Method, path: &str) -> Self {
        if path.contains(auth) {
            Self::Auth
        } else {
            Self::by_method(method)
        }
    }
}

/// What the core reads and resets on a running fake, whatever its provider:
/// written once, for [`Fake`].
pub trait Held {
    fn counters(&self) -> &Counters;

    /// The target filed under `key`; `None` if never seen.
    fn target(&self, key: &str) -> Option<TargetInfo>;

    /// Forgets targets, caches and confirmation sessions; keeps issued tokens
    /// so a running worker is not forced through re-authentication.
    fn reset(&self);
}

impl<C: Send + Sync, S: Targets> Held for Fake<C, S> {
    fn counters(&self) -> &Counters {
        &self.counters
    }

    fn target(&self, key: &str) -> Option<TargetInfo> {
        self.store().target(key)
    }

    fn reset(&self) {
        *self.store() = S::default();
    }
}

/// One running fake, as its provider makes it.
pub trait SimUnit: Held + Send + Sync + 'static {
    /// The fake's routes, relative to its prefix, with its state attached.
    fn routes(self: Arc<Self>) -> Router;

    /// An error in the provider's documented error shape, so the worker's
    /// error parsing is exercised even on simulated faults.
    fn error(&self, status: StatusCode, code: &str, message: &str) -> Response;

    /// The provider's error code for a simulated fault.
    fn fault_code(&self, rate_limited: bool) -> &'static str {
        if rate_limited {
            "RATE_LIMITED"
        } else {
            "SERVICE_UNAVAILABLE"
        }
    }

    /// The provider's rate-limit answer.
    fn rate_limited(&self, retry_after_secs: u64) -> Response {
        let mut response = self.error(
            StatusCode::TOO_MANY_REQUESTS,
            self.fault_code(true),
            "Too Many Requests (simulated)",
        );
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from(retry_after_secs));
        response
    }

    /// The provider's answer to a call over its quota; by default its
    /// rate-limit answer with `Retry-After` in whole seconds, rounded up.
    fn quota_exceeded(&self, refusal: &Refusal) -> Response {
        self.rate_limited(refusal.retry_after_secs())
    }

    fn call_kind(&self, method: &Method, _path: &str) -> CallKind {
        CallKind::by_method(method)
    }

    /// The worker's settings keys under `[providers.<name>]` (upper case, as
    /// in `APPROVAL_PROVIDERS__<NAME>__<KEY>`) naming the credentials this
    /// fake accepts, with their values.
    fn worker_env(&self) -> Vec<(&'static str, String)>;

    /// Makes approving this target wait for a confirmation resolved by
    /// `auto`; `false` when the provider has no such step.
    fn require_confirmation(&self, _key: &str, _auto: ScaAuto) -> bool {
        false
    }
}

/// Per-unit simulator options, one value per type: each unit defines its own
/// options type in its folder and reads it back at start.
#[derive(Clone, Default)]
pub struct UnitOptions(HashMap<TypeId, Arc<dyn Any + Send + Sync>>);

impl UnitOptions {
    pub fn set<T: Any + Send + Sync>(&mut self, options: T) {
        self.0.insert(TypeId::of::<T>(), Arc::new(options));
    }

    /// The options of type `T`, or its defaults.
    pub fn get<T: Any + Clone + Default>(&self) -> T {
        self.0
            .get(&TypeId::of::<T>())
            .and_then(|options| options.downcast_ref::<T>())
            .cloned()
            .unwrap_or_default()
    }
}

impl fmt::Debug for UnitOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UnitOptions({} set)", self.0.len())
    }
}
