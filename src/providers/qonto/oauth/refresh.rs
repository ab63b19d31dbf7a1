//! Qonto's OAuth token endpoint (Ory Hydra): `POST /oauth2/token`,
//! form-encoded, the client authenticated in the body
//! (`client_secret_post`, as Qonto documents), `X-Qonto-Staging-Token`
//! when configured.

use std::time::Duration;

use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use crate::{
    providers::{
        auth::lifetime,
        http::{Http, SecretHeader},
    },
    retry::{CallError, ErrorClass},
};

/// Bounds on an access-token lifetime as the server states it. Above a day
/// is a misread unit or garbage; below two seconds no call could use the
/// token before its refresh is due. Nothing is ever taken as living
/// longer than the server said, except a lifetime under the floor.
pub const MIN_LIFETIME: Duration = Duration::from_secs(2);
pub const MAX_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);
/// When the answer states no lifetime: Qonto documents one hour.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

#[derive(Clone)]
pub struct TokenEndpoint {
    pub(super) http: Http,
    pub(super) url: Url,
    pub(super) client_id: SecretString,
    pub(super) client_secret: SecretString,
    pub(super) staging_token: Option<SecretString>,
}

pub enum Grant<'a> {
    Refresh(&'a SecretString),
    Code {
        code: &'a str,
        redirect_uri: &'a str,
    },
}

/// A pair as the server issued it.
pub struct Issued {
    pub access: SecretString,
    /// `None` when the answer carried none (a refresh then keeps the old one).
    pub refresh: Option<SecretString>,
    pub lifetime: Duration,
}

#[derive(Debug)]
pub enum EndpointError {
    /// `invalid_grant`: the refresh token (or code) is dead: for a refresh
    /// token, the grant is revoked.
    InvalidGrant(String),
    /// The server refused our client (`invalid_client`, 401): the client id
    /// or secret is wrong; nothing a retry fixes.
    Refused(CallError),
    /// No answer, or one that does not say what happened (5xx, timeout):
    /// the server may have rotated the pair.
    Transient(CallError),
}

impl EndpointError {
    pub fn message(&self) -> String {
        match self {
            Self::InvalidGrant(d) => format!("the OAuth server answered invalid_grant ({d})"),
            Self::Refused(e) | Self::Transient(e) => e.message.clone(),
        }
    }
}

impl TokenEndpoint {
    pub async fn exchange(&self, grant: Grant<'_>) -> Result<Issued, EndpointError> {
        let mut form: Vec<(&str, &str)> = match &grant {
            Grant::Refresh(token) => vec![
                ("grant_type", "refresh_token"),
                ("refresh_token", token.expose_secret()),
            ],
            Grant::Code { code, redirect_uri } => vec![
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", redirect_uri),
            ],
        };
        form.push(("client_id", self.client_id.expose_secret()));
        form.push(("client_secret", self.client_secret.expose_secret()));
        let mut request = self
            .http
            .client()
            .post(self.url.clone())
            .header("Accept", "application/json")
            .form(&form);
        if let Some(staging) = &self.staging_token {
            request = request.secret_header("X-Qonto-Staging-Token", staging.expose_secret());
        }
        let secrets: Vec<&str> = match &grant {
            Grant::Refresh(t) => vec![t.expose_secret(), self.client_secret.expose_secret()],
            Grant::Code { code, .. } => vec![code, self.client_secret.expose_secret()],
        };
        let response = self
            .http
            .send(super::super::NAME, "oauth_token", request)
            .await
            .map_err(|mut e| {
                e.message = format!(
                    "the OAuth token call {}",
                    e.message.trim_start_matches("oauth_token ")
                );
                // Nothing applied, but the server may have rotated: a timeout
                // after sending is as unknown as a 5xx.
                e.class = ErrorClass::Retryable;
                EndpointError::Transient(e)
            })?;
        let body = &response.body;
        let text = |k: &str| body.get(k).and_then(Value::as_str);
        let status = response.status.as_u16();
        if !response.status.is_success() {
            let code = text("error").map(|c| clip(c, &secrets));
            let description = text("error_description")
                .map(|d| clip(d, &secrets))
                .unwrap_or_default();
            let mut error = CallError::new(
                ErrorClass::Retryable,
                format!(
                    "the OAuth server answered HTTP {status} {} {description}",
                    code.as_deref().unwrap_or("")
                )
                .trim_end()
                .to_owned(),
            );
            error.http_status = Some(status);
            error.provider_code = code.clone();
            error.retry_after = crate::retry::retry_after(&response.headers);
            return Err(match (status, code.as_deref()) {
                (_, Some("invalid_grant")) => {
                    EndpointError::InvalidGrant(if description.is_empty() {
                        "no description".to_owned()
                    } else {
                        description
                    })
                }
                (400..=499, _) if status != 429 => {
                    error.class = ErrorClass::Auth;
                    EndpointError::Refused(error)
                }
                _ => EndpointError::Transient(error),
            });
        }
        let access = text("access_token").filter(|t| valid_token(t));
        let Some(access) = access else {
            let mut error = CallError::new(
                ErrorClass::Retryable,
                "the OAuth server's answer carries no usable access_token",
            );
            error.http_status = Some(status);
            return Err(EndpointError::Transient(error));
        };
        if let Some(kind) = text("token_type")
            && !kind.eq_ignore_ascii_case("bearer")
        {
            let mut error = CallError::new(
                ErrorClass::Auth,
                format!(
                    "the OAuth server issued a {} token, not a bearer token",
                    clip(kind, &secrets)
                ),
            );
            error.http_status = Some(status);
            return Err(EndpointError::Refused(error));
        }
        let lifetime = body
            .get("expires_in")
            .and_then(lifetime)
            .unwrap_or(DEFAULT_LIFETIME)
            .clamp(MIN_LIFETIME, MAX_LIFETIME);
        Ok(Issued {
            access: SecretString::from(access.to_owned()),
            refresh: text("refresh_token")
                .filter(|t| valid_token(t))
                .map(|t| SecretString::from(t.to_owned())),
            lifetime,
        })
    }
}

/// A token must fit a header and a store row.
fn valid_token(t: &str) -> bool {
    (1..=4096).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_graphic())
}

/// The server's text, short and with any of our secrets it echoes removed.
fn clip(text: &str, secrets: &[&str]) -> String {
    let mut kept: String = text.chars().take(200).collect();
    for s in secrets.iter().filter(|s| s.len() >= 4) {
        kept = kept.replace(s, "[redacted]");
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use wiremock::{
        Mock, MockServer, ResponseTemplate,
        matchers::{body_string, header, method, path},
    };

    fn endpoint(server: &MockServer, staging: Option<&str>) -> TokenEndpoint {
        TokenEndpoint {
            http: Http::new(Duration::from_secs(5), Duration::from_secs(5)).unwrap(),
            url: Url::parse(&format!("{}/oauth2/token", server.uri())).unwrap(),
            client_id: SecretString::from("client-1"),
            client_secret: SecretString::from("secret-1"),
            staging_token: staging.map(SecretString::from),
        }
    }

    #[tokio::test]
    async fn a_refresh_posts_the_form_with_the_staging_token() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/oauth2/token"))
            .and(header("content-type", "application/x-www-form-urlencoded"))
            .and(header("x-qonto-staging-token", "stage-1"))
            .and(body_string(
                "grant_type=refresh_token&refresh_token=r%2F0&client_id=client-1&client_secret=secret-1",
            ))
            .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "access_token": "a1", "token_type": "bearer", "expires_in": 1e12,
                "refresh_token": "r1", "scope": "offline_access"
            })))
            .expect(1)
            .mount(&server)
            .await;
        let issued = endpoint(&server, Some("stage-1"))
            .exchange(Grant::Refresh(&SecretString::from("r/0")))
            .await
            .unwrap();
        assert_eq!(issued.access.expose_secret(), "a1");
        assert_eq!(issued.refresh.unwrap().expose_secret(), "r1");
        assert_eq!(issued.lifetime, MAX_LIFETIME, "an absurd lifetime is cut");
    }

    #[tokio::test]
    async fn answers_are_classified_and_never_echo_a_secret() {
        let server = MockServer::start().await;
        let cases = [
            (
                400,
                r#"{"error":"invalid_grant","error_description":"token r-secret reused"}"#,
                "grant",
            ),
            (401, r#"{"error":"invalid_client"}"#, "refused"),
            (503, "down", "transient"),
            (429, "{}", "transient"),
            (200, r#"{"token_type":"bearer"}"#, "transient"),
        ];
        for (status, body, expected) in cases {
            server.reset().await;
            Mock::given(method("POST"))
                .respond_with(ResponseTemplate::new(status).set_body_string(body))
                .mount(&server)
                .await;
            let e = endpoint(&server, None)
                .exchange(Grant::Refresh(&SecretString::from("r-secret")))
                .await
                .err()
                .unwrap_or_else(|| panic!("{status} must fail"));
            let got = match &e {
                EndpointError::InvalidGrant(_) => "grant",
                EndpointError::Refused(_) => "refused",
                EndpointError::Transient(_) => "transient",
            };
            assert_eq!(got, expected, "{status}: {e:?}");
            assert!(!e.message().contains("r-secret"), "{}", e.message());
        }
    }
}
