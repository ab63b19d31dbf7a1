//! Typed configuration: `config/default.toml` (compiled in), then the
//! `--config` file, then `APPROVAL_<SECTION>__<KEY>` environment variables
//! (CONTRACT.md section 2).
//!
//! Each value is parsed into the type that cannot hold a bad one (`NonZero*`,
//! `SocketAddr`, `Duration`), so a loaded `Settings` needs no re-checking;
//! only rules that span two keys are checked after loading.
//!
//! Every secret is a [`SecretString`], whose `Debug` prints `[REDACTED]`, so
//! a settings dump in a log line or an error can never leak a credential.

use std::{
    net::SocketAddr,
    num::{NonZeroU16, NonZeroU32, NonZeroUsize},
    path::{Path, PathBuf},
    time::Duration,
};

use config::{Config, ConfigError, Environment, File, FileFormat};
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, de::Error as _};

const DEFAULTS: &str = include_str!("../config/default.toml");

/// RabbitMQ closes a channel whose delivery stays unacknowledged past its
/// consumer timeout (30 min by default): the longest a delivery can spend in
/// process must stay far below it.
const LONGEST_IN_PROCESS: Duration = Duration::from_secs(10 * 60);
/// The longest delivery budget: five minutes' room under that timeout.
const LONGEST_DELIVERY: Duration = Duration::from_secs(25 * 60);

/// Every message names the key in the environment form operators set. The
/// messages repeat their cause's text because they are printed on one line.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("configuration could not be read: the --config file {} does not exist", .0.display())]
    NoConfigFile(PathBuf),
    #[error("configuration could not be read: {0}")]
    Read(#[source] Box<ConfigError>),
    /// A rule across keys, or a provider's own check, refused a value.
    #[error("invalid configuration value for {key}: {problem}")]
    Invalid { key: String, problem: String },
    /// A value its type or field parser refused.
    #[error("invalid configuration value for {key}: {problem}")]
    Value {
        key: String,
        problem: String,
        #[source]
        source: Box<ConfigError>,
    },
    #[error("configuration could not be read: HTTP client could not be built: {0}")]
    HttpClient(#[source] reqwest::Error),
}

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub(crate) amqp: AmqpSettings,
    pub(crate) worker: WorkerSettings,
    pub(crate) retry: RetrySettings,
    pub(crate) admin: AdminSettings,
    pub log: LogSettings,
    pub(crate) providers: ProviderSections,
    pub(crate) auth: AuthSettings,
    pub(crate) isolation: IsolationSettings,
    /// Each provider's `rate_limit`, parsed from its section at load
    /// (absent: no limit).
    #[serde(skip)]
    rate_limits: std::collections::BTreeMap<String, Vec<crate::isolation::limiter::Window>>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct AmqpSettings {
    /// The broker's nodes, in the order they are tried.
    pub(crate) url: AmqpNodes,
    #[serde(deserialize_with = "queue_prefix")]
    pub(crate) prefix: String,
    pub(crate) prefetch: NonZeroU16,
    #[serde(deserialize_with = "delivery_limit")]
    pub(crate) delivery_limit: u32,
    #[serde(rename = "reconnect_initial_ms", deserialize_with = "millis")]
    pub(crate) reconnect_initial: Duration,
    #[serde(rename = "reconnect_max_ms", deserialize_with = "millis")]
    pub(crate) reconnect_max: Duration,
}

/// `APPROVAL_AMQP__URL`: one broker URL, or the nodes of a cluster as a
/// comma-separated list (a comma inside a password must be written `%2C`).
/// Never empty. Each URL carries the broker password, hence secret.
#[derive(Debug, Clone)]
pub(crate) struct AmqpNodes(Vec<SecretString>);

impl AmqpNodes {
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// Node `i`, counted round the list (modulo its length), so a caller
    /// moving on to the next node may simply count up.
    pub(crate) fn url(&self, i: usize) -> &SecretString {
        &self.0[i % self.0.len()]
    }

    /// Node `i` with its password replaced, for log lines and reports.
    pub(crate) fn redacted(&self, i: usize) -> String {
        redact(self.url(i).expose_secret())
    }
}

impl<'de> Deserialize<'de> for AmqpNodes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let list = SecretString::deserialize(d)?;
        let entries: Vec<&str> = list.expose_secret().split(',').map(str::trim).collect();
        let mut nodes = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            let scheme_ok =
                Url::parse(entry).is_ok_and(|u| u.scheme() == "amqp" || u.scheme() == "amqps");
            // lapin's own parser, so nothing that loads fails at connect time.
            if !scheme_ok || entry.parse::<lapin::uri::AMQPUri>().is_err() {
                return Err(D::Error::custom(if entries.len() == 1 {
                    "expected an amqp:// or amqps:// URL".to_owned()
                } else {
                    format!(
                        "expected a comma-separated list of amqp:// or amqps:// URLs; entry {} of {} is not one",
                        i + 1,
                        entries.len()
                    )
                }));
            }
            nodes.push(SecretString::from(*entry));
        }
        Ok(Self(nodes))
    }
}

/// `url` with any password replaced.
fn redact(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<unparseable>".to_owned(),
    }
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct WorkerSettings {
    #[serde(rename = "drain_timeout_ms", deserialize_with = "millis")]
    pub(crate) drain_timeout: Duration,
    pub(crate) max_calls_per_provider: NonZeroUsize,
    #[serde(rename = "http_timeout_ms", deserialize_with = "positive_millis")]
    pub(crate) http_timeout: Duration,
    #[serde(rename = "connect_timeout_ms", deserialize_with = "millis")]
    pub(crate) connect_timeout: Duration,
    /// Speak HTTP/2 from the first byte (h2c on `http://`), see default.toml.
    pub(crate) http2_prior_knowledge: bool,
    /// The most one delivery may take, every step included.
    #[serde(rename = "delivery_budget_ms", deserialize_with = "positive_millis")]
    pub(crate) delivery_budget: Duration,
    /// The longest a publish waits for the broker's confirm.
    #[serde(rename = "confirm_timeout_ms", deserialize_with = "positive_millis")]
    pub(crate) confirm_timeout: Duration,
    /// The longest a decision waits for one of its provider's call slots
    /// before it moves to a retry queue (no attempt spent).
    #[serde(rename = "call_wait_ms", deserialize_with = "millis")]
    pub(crate) call_wait: Duration,
}

/// Per-provider isolation (see `isolation/` and the README): the pause,
/// the circuit breaker, adaptive concurrency and the rate limiter's wait.
/// The concurrency ceiling is `worker.max_calls_per_provider`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct IsolationSettings {
    /// The longest a call waits for a rate-limit slot before its decision
    /// moves to a retry queue (no attempt spent).
    #[serde(rename = "limiter_max_wait_ms", deserialize_with = "millis")]
    pub(crate) limiter_max_wait: Duration,
    /// The longest pause a provider's Retry-After is believed for.
    #[serde(rename = "max_pause_ms", deserialize_with = "positive_millis")]
    pub(crate) max_pause: Duration,
    /// Consecutive transport errors, timeouts or 5xx that open the breaker.
    pub(crate) breaker_failures: NonZeroU32,
    #[serde(rename = "breaker_cool_down_ms", deserialize_with = "positive_millis")]
    pub(crate) breaker_cool_down: Duration,
    #[serde(
        rename = "breaker_max_cool_down_ms",
        deserialize_with = "positive_millis"
    )]
    pub(crate) breaker_max_cool_down: Duration,
    /// Off: every provider may have `max_calls_per_provider` calls in flight.
    pub(crate) concurrency_adaptive: bool,
    pub(crate) concurrency_floor: NonZeroUsize,
    pub(crate) concurrency_initial: NonZeroUsize,
    #[serde(deserialize_with = "fraction")]
    pub(crate) concurrency_decrease: f64,
    #[serde(deserialize_with = "above_one")]
    pub(crate) concurrency_latency_rise: f64,
    #[serde(rename = "concurrency_latency_slack_ms", deserialize_with = "millis")]
    pub(crate) concurrency_latency_slack: Duration,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct RetrySettings {
    pub(crate) max_attempts: NonZeroU32,
    #[serde(rename = "initial_backoff_ms", deserialize_with = "positive_millis")]
    pub(crate) initial_backoff: Duration,
    #[serde(rename = "max_backoff_ms", deserialize_with = "millis")]
    pub(crate) max_backoff: Duration,
    pub(crate) in_process_attempts: NonZeroU32,
    #[serde(rename = "in_process_max_wait_ms", deserialize_with = "millis")]
    pub(crate) in_process_max_wait: Duration,
    #[serde(rename = "horizon_ms", deserialize_with = "millis")]
    pub(crate) horizon: Duration,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct AdminSettings {
    pub(crate) bind: SocketAddr,
}

/// Who may decide (CONTRACT v2 section 4.1).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct AuthSettings {
    pub(crate) mode: AuthMode,
    /// The trusted upstream keys, parsed once at load.
    #[serde(deserialize_with = "auth_keys")]
    pub(crate) keys: std::sync::Arc<crate::authn::Keys>,
    #[serde(rename = "max_age_s", deserialize_with = "seconds")]
    pub(crate) max_age: Duration,
    /// Empty: any `user_id` (or none) is accepted.
    #[serde(deserialize_with = "list")]
    pub(crate) allowed_user_ids: Vec<String>,
    /// `None`: a random key for this process alone.
    #[serde(deserialize_with = "hop_key")]
    pub(crate) hop_key: Option<crate::authn::HopKey>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Only decisions that pass are applied.
    Enforce,
    /// Verified, logged and counted, applied anyway (while upstream
    /// teams start signing).
    Monitor,
    /// No checks.
    Off,
}

impl AuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::Enforce => "enforce",
            AuthMode::Monitor => "monitor",
            AuthMode::Off => "off",
        }
    }
}

fn auth_keys<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<std::sync::Arc<crate::authn::Keys>, D::Error> {
    let raw = Option::<SecretString>::deserialize(d)?;
    let raw = raw.as_ref().map(|r| r.expose_secret()).unwrap_or_default();
    // The error names the entry's position, never its text.
    crate::authn::Keys::parse(raw.split(','))
        .map(std::sync::Arc::new)
        .map_err(|e| D::Error::custom(e.to_string()))
}

fn hop_key<'de, D: Deserializer<'de>>(d: D) -> Result<Option<crate::authn::HopKey>, D::Error> {
    let raw = Option::<SecretString>::deserialize(d)?;
    match raw.as_ref().map(|r| r.expose_secret().trim()) {
        None | Some("") => Ok(None),
        Some(key) => crate::authn::HopKey::parse(key)
            .map(Some)
            .map_err(|e| D::Error::custom(e.to_string())),
    }
}

fn list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let raw = Option::<String>::deserialize(d)?;
    Ok(raw
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect())
}

fn seconds<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = u64::deserialize(d)?;
    if s == 0 {
        return Err(D::Error::custom("expected a positive number of seconds"));
    }
    Ok(Duration::from_secs(s))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LogSettings {
    #[serde(default, deserialize_with = "empty_as_none")]
    pub format: Option<LogFormat>,
    /// A tracing filter, checked at load so logging cannot fail to start.
    #[serde(deserialize_with = "log_filter")]
    pub level: String,
}

/// Raw per-provider sections (`[providers.<name>]`). Each provider module
/// deserializes and checks its own section, so adding a provider does not
/// touch this file. `Debug` lists names only: sections hold secrets.
#[derive(Clone, Deserialize, Default)]
#[serde(transparent)]
pub(crate) struct ProviderSections(pub(crate) std::collections::BTreeMap<String, config::Value>);

impl std::fmt::Debug for ProviderSections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl ProviderSections {
    /// Deserializes `[providers.<name>]` into the provider's own settings type.
    pub(crate) fn section<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<T, SettingsError> {
        let value = self.0.get(name).cloned().unwrap_or_else(|| {
            config::Value::new(None, config::ValueKind::Table(Default::default()))
        });
        value
            .try_deserialize()
            .map_err(|e| from_config(e, &format!("providers.{name}")))
    }
}

impl ProviderSections {
    /// Every section's `rate_limit` (CONTRACT v2 section 2), checked.
    fn rate_limits(
        &self,
    ) -> Result<
        std::collections::BTreeMap<String, Vec<crate::isolation::limiter::Window>>,
        SettingsError,
    > {
        #[derive(Deserialize)]
        struct Section {
            rate_limit: Option<String>,
        }
        let mut limits = std::collections::BTreeMap::new();
        for name in self.0.keys() {
            let section: Section = self.section(name)?;
            let rules =
                crate::isolation::limiter::parse(section.rate_limit.as_deref().unwrap_or(""))
                    .map_err(|problem| SettingsError::Invalid {
                        key: env_key(&format!("providers.{name}.rate_limit")),
                        problem,
                    })?;
            if !rules.is_empty() {
                limits.insert(name.clone(), rules);
            }
        }
        Ok(limits)
    }
}

/// Checks a provider's base URL setting.
pub(crate) fn check_base_url(provider: &str, url: &str) -> Result<Url, SettingsError> {
    match Url::parse(url) {
        Ok(u) if u.scheme() == "https" || u.scheme() == "http" => Ok(u),
        _ => Err(SettingsError::Invalid {
            key: env_key(&format!("providers.{provider}.base_url")),
            problem: "expected an http:// or https:// URL".to_owned(),
        }),
    }
}

/// Checks a configurable (publicly unconfirmed) path template.
pub(crate) fn check_path_template(
    provider: &str,
    key: &str,
    template: &str,
    var: &str,
) -> Result<(), SettingsError> {
    if template.starts_with('/') && template.contains(var) {
        Ok(())
    } else {
        Err(SettingsError::Invalid {
            key: env_key(&format!("providers.{provider}.{key}")),
            problem: format!("expected a path starting with / containing {var}"),
        })
    }
}

/// A provider credential setting, as the provider's calls will use it.
///
/// Surrounding whitespace is trimmed at load: a secret written with
/// `kubectl create secret --from-file` or `echo` ends in a newline, which no
/// HTTP header may carry, so every call would fail to be built. A value that
/// still looks like a manifest's placeholder (`REPLACE_ME`, `changeme`,
/// `<...>`) is refused at load, naming the key: sent as a credential it
/// could only be refused by the provider, decision after decision.
#[derive(Clone)]
pub(crate) struct Credential(SecretString);

impl<'de> Deserialize<'de> for Credential {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = SecretString::deserialize(d)?;
        let value = raw.expose_secret().trim();
        if looks_like_placeholder(value) {
            // The message never quotes the value: it may be a real secret.
            return Err(D::Error::custom(
                "looks like a placeholder (such as REPLACE_ME, changeme or <...>): \
                 set the real value, or remove the key to disable the provider",
            ));
        }
        Ok(Self(SecretString::from(value.to_owned())))
    }
}

/// Placeholders that deployment templates use, in any case and with `_`,
/// `-` or spaces anywhere (`REPLACE_ME`, `change-me`), or any `<...>`.
fn looks_like_placeholder(value: &str) -> bool {
    let word: String = value
        .chars()
        .filter(|c| !matches!(c, '_' | '-' | ' '))
        .flat_map(char::to_lowercase)
        .collect();
    matches!(word.as_str(), "replaceme" | "changeme")
        || (value.len() >= 2 && value.starts_with('<') && value.ends_with('>'))
}

/// A configured credential, treating an empty one like an absent one so that
/// `APPROVAL_..._TOKEN=` in a manifest disables rather than sends "".
pub(crate) fn present(credential: &Option<Credential>) -> Option<&SecretString> {
    credential
        .as_ref()
        .map(|c| &c.0)
        .filter(|s| !s.expose_secret().is_empty())
}

/// Turns a dotted config path into the environment form users set.
pub(crate) fn env_key(path: &str) -> String {
    format!("APPROVAL_{}", path.replace('.', "__").to_uppercase())
}

/// Names the offending key the way operators set it. `config` reports the
/// dotted path below the table it deserialized, hence `prefix`.
fn from_config(e: ConfigError, prefix: &str) -> SettingsError {
    let path = |key: &str| env_key(format!("{prefix}.{key}").trim_matches('.'));
    let (key, problem) = match &e {
        ConfigError::Type {
            key: Some(key),
            unexpected,
            expected,
            ..
        } => (
            path(key),
            format!("invalid type: {unexpected}, expected {expected}"),
        ),
        ConfigError::At {
            error,
            key: Some(key),
            ..
        } => (path(key), error.to_string()),
        ConfigError::NotFound(key) => (path(key), "missing".to_owned()),
        _ if prefix.is_empty() => return SettingsError::Read(Box::new(e)),
        // Inside a provider section, at least name the section.
        _ => (path(""), e.to_string()),
    };
    SettingsError::Value {
        key,
        problem,
        source: Box::new(e),
    }
}

impl Settings {
    /// Loads defaults, then `extra_file`, then the process environment.
    pub fn load(extra_file: Option<&Path>) -> Result<Self, SettingsError> {
        Self::load_from(extra_file, std::env::vars())
    }

    /// Same as [`Settings::load`] with an explicit environment, so tests and
    /// the demo can configure a worker without touching the process's env.
    pub fn load_from(
        extra_file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, SettingsError> {
        let mut builder = Config::builder().add_source(File::from_str(DEFAULTS, FileFormat::Toml));
        if let Some(path) = extra_file {
            if !path.exists() {
                return Err(SettingsError::NoConfigFile(path.to_owned()));
            }
            builder = builder.add_source(File::from(path).required(true));
        }
        let env: config::Map<String, String> = vars
            .into_iter()
            .filter(|(k, _)| k.starts_with("APPROVAL_"))
            .collect();
        builder = builder.add_source(
            Environment::with_prefix("APPROVAL")
                .prefix_separator("_")
                .separator("__")
                .source(Some(env)),
        );
        let mut settings: Settings = builder
            .build()
            .and_then(Config::try_deserialize)
            .map_err(|e| from_config(e, ""))?;
        settings.check_across_keys()?;
        settings.rate_limits = settings.providers.rate_limits()?;
        Ok(settings)
    }

    /// `provider`'s rate-limit windows; empty when it has none.
    pub(crate) fn rate_limit(&self, provider: &str) -> &[crate::isolation::limiter::Window] {
        self.rate_limits.get(provider).map_or(&[], Vec::as_slice)
    }

    /// The rules no single value's type can carry.
    fn check_across_keys(&self) -> Result<(), SettingsError> {
        let invalid = |path: &str, problem: &str| SettingsError::Invalid {
            key: env_key(path),
            problem: problem.to_owned(),
        };
        if self.retry.initial_backoff > self.retry.max_backoff {
            return Err(invalid(
                "retry.initial_backoff_ms",
                "expected a positive number of milliseconds not above APPROVAL_RETRY__MAX_BACKOFF_MS",
            ));
        }
        let longest_in_process = (self.worker.http_timeout + self.retry.in_process_max_wait)
            .saturating_mul(self.retry.in_process_attempts.get());
        if longest_in_process > LONGEST_IN_PROCESS {
            return Err(invalid(
                "retry.in_process_attempts",
                "in-process attempts x (APPROVAL_WORKER__HTTP_TIMEOUT_MS + APPROVAL_RETRY__IN_PROCESS_MAX_WAIT_MS) must stay under 10 minutes, far below RabbitMQ's consumer acknowledgement timeout",
            ));
        }
        // The publishes after the provider's answer need their share of
        // the budget, and the whole must end before the broker's consumer
        // timeout closes the channel.
        if self.worker.delivery_budget > LONGEST_DELIVERY
            || self.worker.confirm_timeout.saturating_mul(2) > self.worker.delivery_budget
        {
            return Err(invalid(
                "worker.delivery_budget_ms",
                "expected at most 25 minutes (RabbitMQ's consumer timeout is 30) and at least twice APPROVAL_WORKER__CONFIRM_TIMEOUT_MS",
            ));
        }
        let isolation = &self.isolation;
        if isolation.concurrency_floor > self.worker.max_calls_per_provider {
            return Err(invalid(
                "isolation.concurrency_floor",
                "expected at most APPROVAL_WORKER__MAX_CALLS_PER_PROVIDER (the ceiling)",
            ));
        }
        if isolation.breaker_cool_down > isolation.breaker_max_cool_down {
            return Err(invalid(
                "isolation.breaker_cool_down_ms",
                "expected at most APPROVAL_ISOLATION__BREAKER_MAX_COOL_DOWN_MS",
            ));
        }
        Ok(())
    }

    /// What the authenticity settings leave open, for `check` and `run`:
    /// `Err` when no decision can pass (enforce without keys), warnings
    /// for a mode that lets unsigned decisions through or a hop key each
    /// process makes up.
    pub fn auth_report(&self) -> (Result<(), String>, Vec<String>) {
        let auth = &self.auth;
        let mut warnings = Vec::new();
        let verdict = match auth.mode {
            AuthMode::Enforce if auth.keys.is_empty() => Err(
                "APPROVAL_AUTH__MODE is enforce but APPROVAL_AUTH__KEYS holds no key: every decision is parked as unauthenticated".to_owned(),
            ),
            AuthMode::Enforce => Ok(()),
            AuthMode::Monitor => {
                warnings.push("APPROVAL_AUTH__MODE=monitor: unauthenticated decisions are applied (logged and counted); switch to enforce once every publisher signs".to_owned());
                Ok(())
            }
            AuthMode::Off => {
                warnings.push("APPROVAL_AUTH__MODE=off: decisions are applied without any authenticity check".to_owned());
                Ok(())
            }
        };
        if auth.hop_key.is_none() {
            warnings.push("APPROVAL_AUTH__HOP_KEY is not set: this process trusts only its own retry copies; set one shared key on every replica".to_owned());
        }
        (verdict, warnings)
    }

    /// The broker URL (every node, comma-separated) with each password
    /// replaced, for log lines and reports.
    pub(crate) fn amqp_url_redacted(&self) -> String {
        let nodes = &self.amqp.url;
        (0..nodes.len())
            .map(|i| nodes.redacted(i))
            .collect::<Vec<_>>()
            .join(",")
    }
}

// Field parsers for rules a standard type does not carry. Their messages
// never quote the value: it may be a secret.

fn queue_prefix<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let prefix = String::deserialize(d)?;
    let valid = (1..=100).contains(&prefix.len())
        && prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if valid {
        Ok(prefix)
    } else {
        Err(D::Error::custom(
            "expected 1..100 characters of [A-Za-z0-9._-]",
        ))
    }
}

/// One delivery is the first attempt; the broker's limit must leave room
/// for at least one redelivery.
fn delivery_limit<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    match u32::deserialize(d)? {
        limit @ 2.. => Ok(limit),
        _ => Err(D::Error::custom("expected an integer of at least 2")),
    }
}

/// `*_ms` keys hold whole milliseconds.
fn millis<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    u64::deserialize(d).map(Duration::from_millis)
}

fn positive_millis<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match millis(d)? {
        Duration::ZERO => Err(D::Error::custom(
            "expected a positive number of milliseconds",
        )),
        positive => Ok(positive),
    }
}

/// A factor strictly between 0 and 1.
fn fraction<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    match f64::deserialize(d)? {
        f if f > 0.0 && f < 1.0 => Ok(f),
        _ => Err(D::Error::custom(
            "expected a number between 0 and 1, such as 0.5",
        )),
    }
}

/// A ratio above 1, and a sane one.
fn above_one<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    match f64::deserialize(d)? {
        f if f > 1.0 && f <= 100.0 => Ok(f),
        _ => Err(D::Error::custom(
            "expected a number above 1 (and at most 100), such as 2",
        )),
    }
}

fn log_filter<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let level = String::deserialize(d)?;
    match level.parse::<tracing_subscriber::EnvFilter>() {
        Ok(_) => Ok(level),
        Err(_) => Err(D::Error::custom(
            "expected a tracing filter such as info or approval_worker=debug",
        )),
    }
}

fn empty_as_none<'de, D: Deserializer<'de>>(d: D) -> Result<Option<LogFormat>, D::Error> {
    let raw: Option<String> = Option::deserialize(d)?;
    match raw.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some("json") => Ok(Some(LogFormat::Json)),
        Some("pretty") => Ok(Some(LogFormat::Pretty)),
        Some(other) => Err(D::Error::custom(format!(
            "expected \"json\" or \"pretty\", got {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::REGISTRY;

    fn load(vars: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        Settings::load_from(
            None,
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    /// Every registry unit has its `[providers.<name>]` section in the
    /// shipped defaults, and every shipped key has its `APPROVAL_` variable
    /// wired in the Kubernetes ConfigMap or Secret, so neither a new
    /// provider nor a new setting can be forgotten there.
    #[test]
    fn every_default_key_is_wired_in_the_kubernetes_manifests() {
        let defaults = include_str!("../config/default.toml");
        let manifests = concat!(
            include_str!("../deploy/k8s/configmap.yaml"),
            include_str!("../deploy/k8s/secret.yaml")
        );
        let mut sections = Vec::new();
        let mut section = String::new();
        let mut missing = Vec::new();
        for line in defaults.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                sections.push(name.to_owned());
                section = name.to_uppercase().replace('.', "__");
            } else if let Some((key, _)) = line.split_once('=').filter(|_| !line.starts_with('#')) {
                let var = format!("APPROVAL_{section}__{}", key.trim().to_uppercase());
                if !manifests.contains(&format!("{var}:")) {
                    missing.push(var);
                }
            }
        }
        for unit in REGISTRY {
            if !sections.contains(&format!("providers.{}", unit.name)) {
                missing.push(format!("[providers.{}] in config/default.toml", unit.name));
            }
        }
        assert!(sections.len() > REGISTRY.len(), "default.toml has sections");
        assert_eq!(missing, Vec::<String>::new());
    }

    #[test]
    fn defaults_load_and_match_the_contract() {
        let s = load(&[]).unwrap();
        assert_eq!(s.amqp.prefix, "approvals");
        assert_eq!(
            s.amqp.url.url(0).expose_secret(),
            "amqp://guest:guest@127.0.0.1:5672/%2f"
        );
        assert_eq!(s.admin.bind, "127.0.0.1:9090".parse().unwrap());
        for unit in REGISTRY {
            assert!(s.providers.0.contains_key(unit.name), "{}", unit.name);
        }
    }

    #[test]
    fn environment_keys_override_nested_values() {
        let name = REGISTRY[0].name;
        let var = |key: &str| format!("APPROVAL_PROVIDERS__{}__{key}", name.to_uppercase());
        let (base_url, secret) = (var("BASE_URL"), var("SECRET"));
        let s = load(&[
            ("APPROVAL_AMQP__PREFETCH", "7"),
            (base_url.as_str(), "http://x.test"),
            (secret.as_str(), "s3cr3t-value"),
            ("APPROVAL_LOG__FORMAT", "json"),
        ])
        .unwrap();
        assert_eq!(s.amqp.prefetch.get(), 7);
        #[derive(Deserialize)]
        struct Section {
            base_url: String,
        }
        let section: Section = s.providers.section(name).unwrap();
        assert_eq!(section.base_url, "http://x.test");
        assert_eq!(s.log.format, Some(LogFormat::Json));
        assert!(!format!("{s:?}").contains("s3cr3t-value"));
    }

    #[test]
    fn a_bad_value_names_the_key() {
        let err = load(&[("APPROVAL_AMQP__PREFETCH", "lots")]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("APPROVAL_AMQP__PREFETCH"), "{text}");

        let err = load(&[("APPROVAL_AMQP__URL", "http://user:pw@host")]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("APPROVAL_AMQP__URL") && !text.contains("pw"),
            "{text}"
        );

        let err = load(&[("APPROVAL_RETRY__MAX_ATTEMPTS", "0")]).unwrap_err();
        assert!(err.to_string().contains("APPROVAL_RETRY__MAX_ATTEMPTS"));

        let err = load(&[("APPROVAL_RETRY__IN_PROCESS_ATTEMPTS", "100")]).unwrap_err();
        assert!(
            err.to_string()
                .contains("APPROVAL_RETRY__IN_PROCESS_ATTEMPTS")
        );
    }

    /// Each single-key rule lives in the key's type or parser; the two rules
    /// spanning keys are checked after loading. All name the key to fix.
    #[test]
    fn every_rule_names_the_key_to_fix() {
        for (key, bad) in [
            ("APPROVAL_AMQP__URL", "amqp//nowhere"),
            ("APPROVAL_AMQP__PREFIX", "has space"),
            ("APPROVAL_AMQP__PREFIX", ""),
            ("APPROVAL_AMQP__PREFETCH", "0"),
            ("APPROVAL_AMQP__PREFETCH", "70000"),
            ("APPROVAL_AMQP__DELIVERY_LIMIT", "1"),
            ("APPROVAL_AMQP__RECONNECT_MAX_MS", "soon"),
            ("APPROVAL_WORKER__DRAIN_TIMEOUT_MS", "-5"),
            ("APPROVAL_WORKER__MAX_CALLS_PER_PROVIDER", "0"),
            ("APPROVAL_WORKER__HTTP_TIMEOUT_MS", "0"),
            ("APPROVAL_WORKER__HTTP2_PRIOR_KNOWLEDGE", "maybe"),
            ("APPROVAL_RETRY__MAX_ATTEMPTS", "0"),
            ("APPROVAL_RETRY__IN_PROCESS_ATTEMPTS", "0"),
            ("APPROVAL_RETRY__INITIAL_BACKOFF_MS", "0"),
            ("APPROVAL_RETRY__INITIAL_BACKOFF_MS", "60001"),
            ("APPROVAL_ADMIN__BIND", "localhost"),
            ("APPROVAL_LOG__LEVEL", "info,[=x"),
            ("APPROVAL_LOG__FORMAT", "xml"),
        ] {
            let err = load(&[(key, bad)]).unwrap_err();
            let text = err.to_string();
            assert!(
                text.starts_with(&format!("invalid configuration value for {key}: ")),
                "{key}={bad:?}: {text}"
            );
        }
        // A rule across keys names the one to change, and the other.
        let err = load(&[
            ("APPROVAL_RETRY__MAX_BACKOFF_MS", "100"),
            ("APPROVAL_RETRY__INITIAL_BACKOFF_MS", "200"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("APPROVAL_RETRY__MAX_BACKOFF_MS"));
    }

    #[test]
    fn rate_limits_default_to_qontos_quota_and_name_the_key_when_bad() {
        use crate::isolation::limiter::Window;
        let s = load(&[]).unwrap();
        let qonto = [
            Window {
                limit: 1000,
                window: Duration::from_secs(10),
            },
            Window {
                limit: 10_000,
                window: Duration::from_secs(600),
            },
        ];
        assert_eq!(s.rate_limit("qonto"), qonto);
        assert!(s.rate_limit("flexpay").is_empty());
        let s = load(&[
            ("APPROVAL_PROVIDERS__QONTO__RATE_LIMIT", "none"),
            ("APPROVAL_PROVIDERS__FLEXPAY__RATE_LIMIT", "5/1s"),
        ])
        .unwrap();
        assert!(s.rate_limit("qonto").is_empty());
        assert_eq!(s.rate_limit("flexpay").len(), 1);
        for bad in ["5/1", "0/1s", "5/0ms", "lots"] {
            let err = load(&[("APPROVAL_PROVIDERS__LEDGER_V1__RATE_LIMIT", bad)]).unwrap_err();
            assert!(
                err.to_string().starts_with(
                    "invalid configuration value for APPROVAL_PROVIDERS__LEDGER_V1__RATE_LIMIT: expected"
                ),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn isolation_settings_are_checked_naming_the_key() {
        let s = load(&[]).unwrap();
        assert_eq!(s.isolation.breaker_failures.get(), 5);
        assert_eq!(s.isolation.breaker_cool_down, Duration::from_secs(15));
        assert_eq!(s.isolation.concurrency_decrease, 0.5);
        for (key, bad) in [
            ("APPROVAL_ISOLATION__BREAKER_FAILURES", "0"),
            ("APPROVAL_ISOLATION__BREAKER_COOL_DOWN_MS", "0"),
            ("APPROVAL_ISOLATION__BREAKER_COOL_DOWN_MS", "999999999"),
            ("APPROVAL_ISOLATION__CONCURRENCY_DECREASE", "1.5"),
            ("APPROVAL_ISOLATION__CONCURRENCY_DECREASE", "0"),
            ("APPROVAL_ISOLATION__CONCURRENCY_LATENCY_RISE", "1"),
            ("APPROVAL_ISOLATION__CONCURRENCY_FLOOR", "0"),
            ("APPROVAL_ISOLATION__CONCURRENCY_FLOOR", "1000"),
            ("APPROVAL_ISOLATION__MAX_PAUSE_MS", "0"),
        ] {
            let text = load(&[(key, bad)]).unwrap_err().to_string();
            assert!(
                text.starts_with(&format!("invalid configuration value for {key}: ")),
                "{key}={bad}: {text}"
            );
        }
        let s = load(&[("APPROVAL_ISOLATION__CONCURRENCY_LATENCY_RISE", "1.5")]).unwrap();
        assert_eq!(s.isolation.concurrency_latency_rise, 1.5);
    }

    #[test]
    fn a_value_error_keeps_its_cause() {
        let err = load(&[("APPROVAL_AMQP__PREFETCH", "0")]).unwrap_err();
        let cause = std::error::Error::source(&err).expect("the config error is kept");
        assert!(cause.to_string().contains("amqp.prefetch"), "{cause}");
    }

    #[test]
    fn values_arrive_typed_in_the_contract_units() {
        let s = load(&[
            ("APPROVAL_WORKER__DRAIN_TIMEOUT_MS", "1500"),
            ("APPROVAL_RETRY__HORIZON_MS", "60000"),
            ("APPROVAL_AMQP__RECONNECT_INITIAL_MS", "0"),
            ("APPROVAL_ADMIN__BIND", "0.0.0.0:9191"),
        ])
        .unwrap();
        assert_eq!(s.worker.drain_timeout, Duration::from_millis(1500));
        assert_eq!(s.retry.horizon, Duration::from_secs(60));
        assert_eq!(s.amqp.reconnect_initial, Duration::ZERO);
        assert_eq!(s.admin.bind, SocketAddr::from(([0, 0, 0, 0], 9191)));
        let defaults = load(&[]).unwrap();
        assert_eq!(defaults.retry.initial_backoff, Duration::from_millis(200));
        assert_eq!(defaults.worker.max_calls_per_provider.get(), 256);
    }

    #[test]
    fn a_bad_provider_value_names_the_provider_key() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Section {
            window: u32,
        }
        let s = load(&[("APPROVAL_PROVIDERS__ACME__WINDOW", "wide")]).unwrap();
        let err = s.providers.section::<Section>("acme").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid configuration value for APPROVAL_PROVIDERS__ACME__WINDOW: "),
            "{err}"
        );
        let err = s.providers.section::<Section>("other").unwrap_err();
        assert!(
            err.to_string()
                .contains("APPROVAL_PROVIDERS__OTHER__WINDOW"),
            "{err}"
        );
    }

    #[derive(Deserialize)]
    struct CredentialSection {
        token: Option<Credential>,
    }

    fn token(value: &str) -> Result<Option<String>, SettingsError> {
        let s = load(&[("APPROVAL_PROVIDERS__ACME__TOKEN", value)]).unwrap();
        let section: CredentialSection = s.providers.section("acme")?;
        Ok(present(&section.token).map(|t| t.expose_secret().to_owned()))
    }

    /// `kubectl create secret --from-file` keeps the file's final newline,
    /// which no HTTP header can carry.
    #[test]
    fn credentials_are_trimmed_and_blank_ones_are_unset() {
        assert_eq!(token("tok-1\n").unwrap().as_deref(), Some("tok-1"));
        assert_eq!(token(" \ttok-2 \r\n").unwrap().as_deref(), Some("tok-2"));
        assert_eq!(token("").unwrap(), None);
        assert_eq!(token(" \n").unwrap(), None);
        // Inner characters are the provider's business.
        assert_eq!(token("a b").unwrap().as_deref(), Some("a b"));
    }

    #[test]
    fn placeholder_credentials_are_refused_naming_the_key() {
        for value in [
            "REPLACE_ME",
            "replace_me\n",
            "Replace-Me",
            "changeme",
            " CHANGE_ME ",
            "<your api key>",
            "<>",
        ] {
            let Err(err) = token(value) else {
                panic!("{value:?} must be refused");
            };
            let text = err.to_string();
            assert!(
                text.starts_with(
                    "invalid configuration value for APPROVAL_PROVIDERS__ACME__TOKEN: looks like a placeholder"
                ),
                "{value:?}: {text}"
            );
            assert!(
                !text.contains("your api key"),
                "the value is not quoted: {text}"
            );
        }
        for real in ["changeme2", "replace_me_not", "<abc", "abc>", "sk_live_x"] {
            assert_eq!(token(real).unwrap().as_deref(), Some(real), "{real}");
        }
    }

    /// Every credential setting of every provider goes through the same
    /// rule: the shipped Secret manifest's untouched placeholders stop
    /// start-up at the first provider key, named.
    #[test]
    fn every_provider_refuses_the_shipped_secret_placeholders() {
        let manifest = include_str!("../deploy/k8s/secret.yaml");
        let placeholders: Vec<&str> = manifest
            .lines()
            .filter_map(|l| l.trim().strip_suffix(": \"REPLACE_ME\""))
            .filter(|key| key.starts_with("APPROVAL_PROVIDERS__"))
            .collect();
        assert!(placeholders.len() >= REGISTRY.len(), "{placeholders:?}");
        for key in placeholders {
            let s = load(&[(key, "REPLACE_ME")]).unwrap();
            let err = crate::providers::Registry::from_settings(&s)
                .err()
                .unwrap_or_else(|| panic!("{key}=REPLACE_ME must stop start-up"));
            assert!(
                err.to_string()
                    .starts_with(&format!("invalid configuration value for {key}: ")),
                "{key}: {err}"
            );
        }
    }

    /// The broker refuses a message above `max_message_size` before
    /// assembling it, so the shipped broker config must bound it: above the
    /// contract's decision size with room for the headers of a parked copy,
    /// and far below what a prefetch of such messages may take in memory.
    #[test]
    fn the_shipped_broker_config_bounds_message_size() {
        let conf = include_str!("../deploy/rabbitmq/rabbitmq.conf");
        let size: usize = conf
            .lines()
            .filter_map(|l| l.trim().strip_prefix("max_message_size"))
            .filter_map(|rest| rest.trim().strip_prefix('='))
            .map(|v| v.trim().parse().expect("a byte count"))
            .next()
            .expect("rabbitmq.conf sets max_message_size");
        let decision = crate::decision::MAX_BODY_BYTES;
        assert!(
            size >= decision * 3 / 2,
            "{size} leaves no margin over {decision}"
        );
        assert!(
            size <= 4 * decision,
            "{size} is far above the contract's {decision}"
        );
    }

    #[test]
    fn a_missing_config_file_is_named() {
        let path = Path::new("/nonexistent/approval.toml");
        let err = Settings::load_from(Some(path), Vec::new()).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/approval.toml"),
            "{err}"
        );
    }

    #[test]
    fn redacted_url_hides_the_password() {
        let s = load(&[("APPROVAL_AMQP__URL", "amqp://u:topsecret@h:5672/%2f")]).unwrap();
        assert!(!s.amqp_url_redacted().contains("topsecret"));
        assert_eq!(s.amqp_url_redacted(), "amqp://u:***@h:5672/%2f");
    }

    #[test]
    fn a_list_of_urls_names_the_nodes_in_order() {
        let s = load(&[(
            "APPROVAL_AMQP__URL",
            "amqp://u:p1@a:5672/%2f, amqps://u:p2@b:5671/%2f ,amqp://c",
        )])
        .unwrap();
        let nodes = &s.amqp.url;
        assert_eq!(nodes.len(), 3);
        assert_eq!(nodes.url(0).expose_secret(), "amqp://u:p1@a:5672/%2f");
        assert_eq!(nodes.url(1).expose_secret(), "amqps://u:p2@b:5671/%2f");
        assert_eq!(nodes.url(2).expose_secret(), "amqp://c");
        assert_eq!(nodes.url(3).expose_secret(), nodes.url(0).expose_secret());
        assert_eq!(nodes.redacted(1), "amqps://u:***@b:5671/%2f");
    }

    #[test]
    fn a_bad_entry_in_the_list_names_the_key_and_the_entry() {
        for (list, entry) in [
            ("amqp://u:pw-one@a/%2f,http://u:pw-two@b/", "entry 2 of 2"),
            ("amqp://u:pw-one@a/%2f,", "entry 2 of 2"),
            (",amqp://u:pw-one@a/%2f", "entry 1 of 2"),
            (
                "amqp://u:pw-one@a/%2f,amqp://u:pw-two@b/?heartbeat=soon",
                "entry 2 of 2",
            ),
        ] {
            let text = load(&[("APPROVAL_AMQP__URL", list)])
                .unwrap_err()
                .to_string();
            assert!(
                text.starts_with("invalid configuration value for APPROVAL_AMQP__URL: ")
                    && text.contains(entry),
                "{list}: {text}"
            );
            assert!(!text.contains("pw-"), "{text}");
        }
    }

    #[test]
    fn the_redacted_list_hides_every_password() {
        let s = load(&[(
            "APPROVAL_AMQP__URL",
            "amqp://u:first-pw@a:5672/%2f,amqps://v:second-pw@b:5671/%2f",
        )])
        .unwrap();
        let redacted = s.amqp_url_redacted();
        assert_eq!(redacted, "amqp://u:***@a:5672/%2f,amqps://v:***@b:5671/%2f");
        for i in 0..2 {
            assert!(!s.amqp.url.redacted(i).contains("-pw"));
        }
        assert!(!format!("{s:?}").contains("-pw"), "{s:?}");
    }
}
