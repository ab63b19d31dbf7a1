//! Qonto played by wiremock: the credentials a test worker is given, its
//! environment, the provider's answers, and sample decisions.

use approval_worker::tools::sim::samples;
use serde_json::{Value, json};
use wiremock::ResponseTemplate;

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

/// Qonto's answer to a decided transfer request, in `status`.
pub fn answer(status: &str) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({
        "request_transfer": {
            "id": "7b6f4c1e-3c55-4a56-9f5e-0d6a1c1f2a3b",
            "request_type": "transfer",
            "status": status,
        }
    }))
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
