//! Typed configuration: `config/default.toml` (compiled in), then the
//! `--config` file, then `APPROVAL_<SECTION>__<KEY>` environment variables
//! (CONTRACT.md section 2).
//!
//! Every secret is a [`SecretString`], whose `Debug` prints `[REDACTED]`, so
//! a settings dump in a log line or an error can never leak a credential.

use std::{net::SocketAddr, path::Path, time::Duration};

use config::{Config, Environment, File, FileFormat};
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

const DEFAULTS: &str = include_str!("../config/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("configuration could not be read: {0}")]
    Load(String),
    #[error("invalid configuration value for {key}: {problem}")]
    Invalid { key: String, problem: String },
}

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub amqp: AmqpSettings,
    pub worker: WorkerSettings,
    pub retry: RetrySettings,
    pub admin: AdminSettings,
    pub log: LogSettings,
    pub providers: ProviderSections,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AmqpSettings {
    /// Carries the broker password, hence secret.
    pub url: SecretString,
    pub prefix: String,
    pub prefetch: u16,
    pub delivery_limit: u32,
    pub reconnect_initial_ms: u64,
    pub reconnect_max_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct WorkerSettings {
    pub drain_timeout_ms: u64,
    pub max_calls_per_provider: usize,
    pub http_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// Speak HTTP/2 from the first byte (h2c on `http://`), see default.toml.
    pub http2_prior_knowledge: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RetrySettings {
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    pub in_process_attempts: u32,
    pub in_process_max_wait_ms: u64,
    pub horizon_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AdminSettings {
    pub bind: String,
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
    pub level: String,
}

/// Raw per-provider sections (`[providers.<name>]`). Each provider module
/// deserializes and checks its own section, so adding a provider does not
/// touch this file. `Debug` lists names only: sections hold secrets.
#[derive(Clone, Deserialize, Default)]
#[serde(transparent)]
pub struct ProviderSections(pub std::collections::BTreeMap<String, config::Value>);

impl std::fmt::Debug for ProviderSections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl ProviderSections {
    /// Deserializes `[providers.<name>]` into the provider's own settings type.
    pub fn section<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<T, SettingsError> {
        let value = self.0.get(name).cloned().unwrap_or_else(|| {
            config::Value::new(None, config::ValueKind::Table(Default::default()))
        });
        value.try_deserialize().map_err(|e| {
            let err = describe_config_error(&e);
            match err {
                SettingsError::Invalid { key, problem } if !key.starts_with("APPROVAL_") => {
                    SettingsError::Invalid {
                        key: env_key(&format!("providers.{name}.{}", key.to_lowercase())),
                        problem,
                    }
                }
                SettingsError::Load(text) => SettingsError::Invalid {
                    key: env_key(&format!("providers.{name}")),
                    problem: text,
                },
                other => other,
            }
        })
    }
}

/// Checks a provider's base URL setting.
pub fn check_base_url(provider: &str, url: &str) -> Result<Url, SettingsError> {
    match Url::parse(url) {
        Ok(u) if u.scheme() == "https" || u.scheme() == "http" => Ok(u),
        _ => Err(SettingsError::Invalid {
            key: env_key(&format!("providers.{provider}.base_url")),
            problem: "expected an http:// or https:// URL".to_owned(),
        }),
    }
}

/// Checks a configurable (publicly unconfirmed) path template.
pub fn check_path_template(
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

fn empty_as_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<LogFormat>, D::Error> {
    let raw: Option<String> = Option::deserialize(d)?;
    match raw.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some("json") => Ok(Some(LogFormat::Json)),
        Some("pretty") => Ok(Some(LogFormat::Pretty)),
        Some(other) => Err(serde::de::Error::custom(format!(
            "expected \"json\" or \"pretty\", got {other:?}"
        ))),
    }
}

/// A configured secret, treating an empty string like an absent one so that
/// `APPROVAL_..._TOKEN=` in a manifest disables rather than sends "".
pub fn present(secret: &Option<SecretString>) -> Option<&SecretString> {
    secret
        .as_ref()
        .filter(|s| !s.expose_secret().trim().is_empty())
}

/// Turns a dotted config path into the environment form users set.
pub fn env_key(path: &str) -> String {
    format!("APPROVAL_{}", path.replace('.', "__").to_uppercase())
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
                return Err(SettingsError::Load(format!(
                    "the --config file {} does not exist",
                    path.display()
                )));
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
        let settings: Settings = builder
            .build()
            .and_then(Config::try_deserialize)
            .map_err(|e| describe_config_error(&e))?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), SettingsError> {
        let invalid = |path: &str, problem: &str| SettingsError::Invalid {
            key: env_key(path),
            problem: problem.to_owned(),
        };
        match Url::parse(self.amqp.url.expose_secret()) {
            Ok(u) if u.scheme() == "amqp" || u.scheme() == "amqps" => {}
            // The URL may hold a password: never echo it back.
            _ => return Err(invalid("amqp.url", "expected an amqp:// or amqps:// URL")),
        }
        let prefix_ok = !self.amqp.prefix.is_empty()
            && self.amqp.prefix.len() <= 100
            && self
                .amqp
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if !prefix_ok {
            return Err(invalid(
                "amqp.prefix",
                "expected 1..100 characters of [A-Za-z0-9._-]",
            ));
        }
        if self.amqp.prefetch == 0 {
            return Err(invalid(
                "amqp.prefetch",
                "expected an integer from 1 to 65535",
            ));
        }
        if self.amqp.delivery_limit < 2 {
            return Err(invalid(
                "amqp.delivery_limit",
                "expected an integer of at least 2",
            ));
        }
        if self.retry.max_attempts == 0 {
            return Err(invalid(
                "retry.max_attempts",
                "expected an integer of at least 1",
            ));
        }
        if self.retry.in_process_attempts == 0 {
            return Err(invalid(
                "retry.in_process_attempts",
                "expected an integer of at least 1",
            ));
        }
        if self.retry.initial_backoff_ms == 0
            || self.retry.initial_backoff_ms > self.retry.max_backoff_ms
        {
            return Err(invalid(
                "retry.initial_backoff_ms",
                "expected a positive number of milliseconds not above APPROVAL_RETRY__MAX_BACKOFF_MS",
            ));
        }
        // RabbitMQ closes a channel whose delivery stays unacknowledged past
        // its consumer timeout (30 min by default): the longest a delivery
        // can spend in process must stay far below it.
        let longest_in_process = u64::from(self.retry.in_process_attempts)
            .saturating_mul(self.worker.http_timeout_ms + self.retry.in_process_max_wait_ms);
        if longest_in_process > 10 * 60 * 1000 {
            return Err(invalid(
                "retry.in_process_attempts",
                "in-process attempts x (APPROVAL_WORKER__HTTP_TIMEOUT_MS + APPROVAL_RETRY__IN_PROCESS_MAX_WAIT_MS) must stay under 10 minutes, far below RabbitMQ's consumer acknowledgement timeout",
            ));
        }
        if self.worker.max_calls_per_provider == 0 {
            return Err(invalid(
                "worker.max_calls_per_provider",
                "expected an integer of at least 1",
            ));
        }
        if self.worker.http_timeout_ms == 0 {
            return Err(invalid(
                "worker.http_timeout_ms",
                "expected a positive number of milliseconds",
            ));
        }
        if self.admin.bind.parse::<SocketAddr>().is_err() {
            return Err(invalid(
                "admin.bind",
                "expected a socket address such as 127.0.0.1:9090",
            ));
        }
        if self
            .log
            .level
            .parse::<tracing_subscriber::EnvFilter>()
            .is_err()
        {
            return Err(invalid(
                "log.level",
                "expected a tracing filter such as info or approval_worker=debug",
            ));
        }
        Ok(())
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.worker.drain_timeout_ms)
    }

    /// The broker URL with any password replaced, for log lines.
    pub fn amqp_url_redacted(&self) -> String {
        match Url::parse(self.amqp.url.expose_secret()) {
            Ok(mut u) => {
                if u.password().is_some() {
                    let _ = u.set_password(Some("***"));
                }
                u.to_string()
            }
            Err(_) => "<unparseable>".to_owned(),
        }
    }
}

/// `config` names the dotted key in most messages; rewrite it into the
/// environment form operators actually set.
fn describe_config_error(e: &config::ConfigError) -> SettingsError {
    let text = e.to_string();
    if let Some(start) = text.find("for key `") {
        let rest = &text[start + 9..];
        if let Some(end) = rest.find('`') {
            let path = &rest[..end];
            return SettingsError::Invalid {
                key: env_key(path),
                problem: text[..start].trim().to_owned(),
            };
        }
    }
    if let Some(field) = text.strip_prefix("missing field `") {
        let field = field.trim_end_matches('`');
        return SettingsError::Invalid {
            key: field.to_owned(),
            problem: "missing".to_owned(),
        };
    }
    SettingsError::Load(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(vars: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        Settings::load_from(
            None,
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    /// Every shipped key has its `APPROVAL_` variable wired in the
    /// Kubernetes ConfigMap or Secret, so a new setting cannot be forgotten there.
    #[test]
    fn every_default_key_is_wired_in_the_kubernetes_manifests() {
        let manifests = concat!(
            include_str!("../deploy/k8s/configmap.yaml"),
            include_str!("../deploy/k8s/secret.yaml")
        );
        let mut section = String::new();
        let mut missing = Vec::new();
        for line in include_str!("../config/default.toml")
            .lines()
            .map(str::trim)
        {
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_uppercase().replace('.', "__");
            } else if let Some((key, _)) = line.split_once('=').filter(|_| !line.starts_with('#')) {
                let var = format!("APPROVAL_{section}__{}", key.trim().to_uppercase());
                if !manifests.contains(&format!("{var}:")) {
                    missing.push(var);
                }
            }
        }
        assert!(section.len() > 1, "default.toml has sections");
        assert_eq!(missing, Vec::<String>::new());
    }

    #[test]
    fn defaults_load_and_match_the_contract() {
        let s = load(&[]).unwrap();
        assert_eq!(s.amqp.prefix, "approvals");
        assert_eq!(
            s.amqp.url.expose_secret(),
            "amqp://guest:guest@127.0.0.1:5672/%2f"
        );
        assert_eq!(s.admin.bind, "127.0.0.1:9090");
        assert!(s.providers.0.contains_key("qonto"));
    }

    #[test]
    fn environment_keys_override_nested_values() {
        let s = load(&[
            ("APPROVAL_AMQP__PREFETCH", "7"),
            ("APPROVAL_PROVIDERS__LEDGER_V1__BASE_URL", "http://x.test"),
            ("APPROVAL_PROVIDERS__QONTO__LOGIN", "l"),
            ("APPROVAL_PROVIDERS__QONTO__SECRET_KEY", "s3cr3t-value"),
            ("APPROVAL_LOG__FORMAT", "json"),
        ])
        .unwrap();
        assert_eq!(s.amqp.prefetch, 7);
        #[derive(Deserialize)]
        struct V1 {
            base_url: String,
        }
        let v1: V1 = s.providers.section("ledger_v1").unwrap();
        assert_eq!(v1.base_url, "http://x.test");
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

    #[test]
    fn redacted_url_hides_the_password() {
        let s = load(&[("APPROVAL_AMQP__URL", "amqp://u:topsecret@h:5672/%2f")]).unwrap();
        assert!(!s.amqp_url_redacted().contains("topsecret"));
    }
}
