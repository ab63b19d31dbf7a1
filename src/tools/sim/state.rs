//! Shared simulator state and small helpers used by every provider module.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::Json;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use p256::ecdsa::VerifyingKey;
use rand::RngCore as _;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::faults::Faults;
use super::stats::{Counters, SimStats};
use super::{Provider, ScaAuto, SimConfig, TargetInfo};
use super::{flexpay, ledger_v1, ledger_v2, moneypipe, qonto};

/// Everything the handlers share. One mutex per provider store keeps the
/// critical sections short and independent; no lock is held across an await.
pub(crate) struct Sim {
    pub config: SimConfig,
    pub verifying_key: VerifyingKey,
    pub qonto: Mutex<qonto::Store>,
    pub ledger_v1: Mutex<ledger_v1::Store>,
    pub ledger_v2: Mutex<ledger_v2::Store>,
    pub ledger_v2_tokens: Mutex<ledger_v2::Tokens>,
    pub moneypipe: Mutex<moneypipe::Store>,
    pub flexpay: Mutex<flexpay::Store>,
    pub flexpay_tokens: Mutex<TokenStore>,
    counters: [Counters; 5],
    faults: [Mutex<Faults>; 5],
    /// Scripted failures: the next decision calls whose path contains the
    /// fragment get this status (a demo's "decision that meets transient failures").
    scripted: Mutex<Vec<Scripted>>,
    /// Stops the server and releases requests held by a timeout fault.
    pub shutdown: CancellationToken,
}

impl Sim {
    pub fn new(config: SimConfig) -> std::io::Result<Self> {
        let invalid = |msg: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, msg);
        let signing_key =
            crate::jws::load_signing_key(&config.credentials.ledger_v2_signing_key_pem)
                .map_err(|e| invalid(format!("simulator ledger_v2 signing key: {e}")))?;
        let faults: [Mutex<Faults>; 5] = Default::default();
        for (name, provider_faults) in &config.faults {
            let provider = Provider::parse(name)
                .ok_or_else(|| invalid(format!("simulator faults: unknown provider {name:?}")))?;
            provider_faults
                .validate()
                .map_err(|e| invalid(format!("simulator faults for {name}: {e}")))?;
            *lock(&faults[provider.index()]) = *provider_faults;
        }
        Ok(Self {
            verifying_key: *signing_key.verifying_key(),
            config,
            qonto: Mutex::default(),
            ledger_v1: Mutex::default(),
            ledger_v2: Mutex::default(),
            ledger_v2_tokens: Mutex::default(),
            moneypipe: Mutex::default(),
            flexpay: Mutex::default(),
            flexpay_tokens: Mutex::default(),
            counters: Default::default(),
            faults,
            scripted: Mutex::default(),
            shutdown: CancellationToken::new(),
        })
    }

    pub fn fail_next(&self, provider: Provider, path_fragment: &str, calls: u32, status: u16) {
        lock(&self.scripted).push(Scripted {
            provider,
            path_fragment: path_fragment.to_owned(),
            remaining: calls,
            status,
        });
    }

    /// The scripted failure status for this decision call, if one is due.
    pub fn scripted_failure(&self, provider: Provider, path: &str) -> Option<u16> {
        let mut scripted = lock(&self.scripted);
        let entry = scripted.iter_mut().find(|s| {
            s.provider == provider && s.remaining > 0 && path.contains(&s.path_fragment)
        })?;
        entry.remaining -= 1;
        Some(entry.status)
    }

    pub fn counters(&self, provider: Provider) -> &Counters {
        &self.counters[provider.index()]
    }

    pub fn faults(&self, provider: Provider) -> Faults {
        *lock(&self.faults[provider.index()])
    }

    pub fn set_faults(&self, provider: Provider, faults: Faults) {
        *lock(&self.faults[provider.index()]) = faults;
    }

    pub fn stats(&self) -> SimStats {
        let snap = |p: Provider| self.counters(p).snapshot();
        SimStats {
            qonto: snap(Provider::Qonto),
            ledger_v1: snap(Provider::LedgerV1),
            ledger_v2: snap(Provider::LedgerV2),
            moneypipe: snap(Provider::MoneyPipe),
            flexpay: snap(Provider::FlexPay),
        }
    }

    pub fn require_sca(&self, request_id: &str, auto: ScaAuto) {
        lock(&self.qonto).require_sca(request_id, auto);
    }

    pub fn target(&self, provider: Provider, key: &str) -> Option<TargetInfo> {
        match provider {
            Provider::Qonto => lock(&self.qonto).target(key),
            Provider::LedgerV1 => lock(&self.ledger_v1).target(key),
            Provider::LedgerV2 => lock(&self.ledger_v2).target(key),
            Provider::MoneyPipe => lock(&self.moneypipe).target(key),
            Provider::FlexPay => lock(&self.flexpay).target(key),
        }
    }

    /// Clears targets, caches, SCA state and counters. Tokens survive so a
    /// running worker is not forced through re-authentication by a test reset.
    pub fn reset(&self) {
        *lock(&self.qonto) = Default::default();
        *lock(&self.ledger_v1) = Default::default();
        *lock(&self.ledger_v2) = Default::default();
        *lock(&self.moneypipe) = Default::default();
        *lock(&self.flexpay) = Default::default();
        for counters in &self.counters {
            counters.reset();
        }
    }
}

/// A poisoned lock only means a handler panicked mid-update; the maps are
/// still usable for a simulator, so keep serving.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The distinct idempotency keys of the state-changing calls that reached one
/// target; a second distinct key means the worker lost track of its key.
#[derive(Clone, Debug, Default)]
pub(crate) struct KeyLog(Vec<String>);

impl KeyLog {
    pub fn record(&mut self, key: Option<&str>, counters: &Counters) {
        let Some(key) = key else { return };
        if self.0.iter().any(|seen| seen == key) {
            return;
        }
        self.0.push(key.to_owned());
        if self.0.len() == 2 {
            Counters::bump(&counters.conflicting_keys);
        }
    }

    pub fn info(&self, state: &str) -> TargetInfo {
        TargetInfo {
            state: state.to_owned(),
            keys: self.0.clone(),
        }
    }
}

/// Bearer tokens with an expiry. Expired entries are pruned when the map
/// grows, so a worker that re-authenticates too often cannot grow it forever.
#[derive(Debug, Default)]
pub(crate) struct TokenStore(HashMap<String, Instant>);

impl TokenStore {
    pub fn issue(&mut self, ttl: Duration) -> String {
        let now = Instant::now();
        if self.0.len() >= 1024 {
            self.0.retain(|_, expires| *expires > now);
        }
        let token = random_hex(24);
        self.0.insert(token.clone(), now + ttl);
        token
    }

    pub fn is_valid(&self, token: &str) -> bool {
        self.0
            .get(token)
            .is_some_and(|expires| *expires > Instant::now())
    }
}

/// Marks a response whose call changed a target's state; the fault layer
/// needs it to fail *after* applying (`apply_then_fail_ratio`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Applied;

pub(crate) fn applied(mut response: Response) -> Response {
    response.extensions_mut().insert(Applied);
    response
}

pub(crate) fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    (status, Json(body)).into_response()
}

pub(crate) fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    header_str(headers, header::AUTHORIZATION.as_str())?.strip_prefix("Bearer ")
}

/// The generic idempotency header every provider but Qonto receives.
pub(crate) fn idempotency_key(headers: &HeaderMap) -> Option<&str> {
    header_str(headers, "idempotency-key")
}

pub(crate) fn is_json(headers: &HeaderMap) -> bool {
    header_str(headers, header::CONTENT_TYPE.as_str())
        .is_some_and(|ct| ct.trim_start().starts_with("application/json"))
}

pub(crate) fn now_rfc3339() -> String {
    rfc3339(time::OffsetDateTime::now_utc())
}

pub(crate) fn rfc3339(at: time::OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

pub(crate) fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Decoded `key=value` pairs of a query string or form body, repeated keys
/// kept (Qonto's `status[]=a&status[]=b`).
pub(crate) fn form_pairs(raw: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        let spaced = s.replace('+', " ");
        percent_encoding::percent_decode_str(&spaced)
            .decode_utf8_lossy()
            .into_owned()
    };
    raw.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(key), decode(value))
        })
        .collect()
}

/// Parses `?page=&per_page=`-style numbers, `None` when absent, `Err` when
/// present but not a number.
pub(crate) fn number_param(
    pairs: &[(String, String)],
    name: &str,
) -> Result<Option<usize>, String> {
    match pairs.iter().find(|(key, _)| key == name) {
        None => Ok(None),
        Some((_, value)) => value
            .parse()
            .map(Some)
            .map_err(|_| format!("{name} must be a non-negative integer")),
    }
}

pub struct Scripted {
    provider: Provider,
    path_fragment: String,
    remaining: u32,
    status: u16,
}
