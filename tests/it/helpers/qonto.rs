//! Qonto played by wiremock: the credentials a test worker is given, its
//! environment, the provider's answers, and sample decisions.

use std::time::Duration;

use approval_worker::tools::sim::samples;
use serde_json::{Value, json};
use wiremock::{Request, Respond, ResponseTemplate};

// Marked so a test can search logs and events for them.
pub const LOGIN: &str = "login-S3CRET-a";
pub const SECRET_KEY: &str = "key-S3CRET-b";
pub const STAGING_TOKEN: &str = "token-S3CRET-c";
pub const ACCESS_TOKEN: &str = "oauth-S3CRET-d";

/// Every credential above, for leak checks.
pub const SECRETS: &[&str] = &[LOGIN, SECRET_KEY, STAGING_TOKEN, ACCESS_TOKEN];

/// How the worker authenticates at the mocked Qonto.
#[derive(Clone, Copy, Debug)]
pub enum Auth {
    /// Login and secret key, plus the sandbox's staging token.
    ApiKey,
    /// An OAuth access token, sent as `Bearer`.
    AccessToken,
    /// Only the base URL: the worker disables the provider.
    Missing,
}

/// Environment pointing a worker at the mocked Qonto on `base_url`.
pub fn env(base_url: &str, auth: Auth) -> Vec<(String, String)> {
    let var = |key: &str, value: &str| (format!("APPROVAL_PROVIDERS__QONTO__{key}"), value.into());
    let mut env = vec![var("BASE_URL", base_url)];
    match auth {
        Auth::ApiKey => env.extend([
            var("LOGIN", LOGIN),
            var("SECRET_KEY", SECRET_KEY),
            var("STAGING_TOKEN", STAGING_TOKEN),
        ]),
        Auth::AccessToken => env.push(var("ACCESS_TOKEN", ACCESS_TOKEN)),
        Auth::Missing => {}
    }
    env
}

/// Qonto's answer to a decision call: the request the call's path names,
/// now in `status` (the worker checks that the answer names its request).
pub fn answer(status: &str) -> Answer {
    Answer {
        status: status.to_owned(),
        delay: None,
    }
}

/// Qonto's answer for the transfer request `request_id`, in `status`.
pub fn answer_for(request_id: &str, status: &str) -> ResponseTemplate {
    typed_answer("transfer", request_id, status)
}

/// Qonto's answer for a request of type `singular` (`flash_card`), wrapped
/// under `request_{singular}` as its examples show.
fn typed_answer(singular: &str, request_id: &str, status: &str) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({
        format!("request_{singular}"): {
            "id": request_id,
            "request_type": singular,
            "status": status,
        }
    }))
}

/// See [`answer`].
pub struct Answer {
    status: String,
    delay: Option<Duration>,
}

impl Answer {
    pub fn set_delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }
}

impl Respond for Answer {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        // `/v2/requests/{plural_type}/{id}/{verb}`
        let mut segments = request.url.path().rsplit('/').skip(1);
        let id = segments.next().unwrap_or_default();
        let plural = segments.next().unwrap_or_default();
        let singular = plural.strip_suffix('s').unwrap_or(plural);
        let reply = typed_answer(singular, id, &self.status);
        match self.delay {
            Some(delay) => reply.set_delay(delay),
            None => reply,
        }
    }
}

/// The simulator's sample Qonto decision (a transfer request, new each time).
pub fn decision(decision_id: &str, action: &str) -> Value {
    samples::decision("qonto", action, decision_id)
}

/// A sample decline for the transfer request `request_id`.
pub fn decline(decision_id: &str, request_id: &str) -> Value {
    let mut d = decision(decision_id, "reject");
    d["target"]["request_id"] = json!(request_id);
    d
}

/// A fresh Qonto request id.
pub fn request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Writes a Qonto OAuth token store file as the worker requires it: owner
/// read and write only.
pub fn write_token_file(path: &std::path::Path, value: &Value) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(value.to_string().as_bytes()).unwrap();
}
