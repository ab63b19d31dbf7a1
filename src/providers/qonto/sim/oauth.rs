//! Qonto's OAuth server (Ory Hydra; PROVIDERS.md section 1), served by the
//! Qonto half beside its API so a worker's whole token chain can be
//! exercised in seconds: an authorization endpoint that consents at once,
//! and a token endpoint for the `authorization_code` and `refresh_token`
//! grants with Hydra's rotation. Each refresh returns a new refresh token;
//! the used one answers again (with a fresh pair) for a grace period after
//! its first use, and a use after that revokes the whole grant, every
//! access and refresh token issued from the same authorization.
//!
//! Routes, relative to the base URL (`/qonto`): `GET /oauth2/auth`,
//! `POST /oauth2/token`. Answers are RFC 6749 JSON; the API half asks
//! [`Server::access_valid`] about bearer tokens.
//!
//! Time is read from a [`Clock`] the tests can move forward, so the 60 s
//! grace and hour-long tokens are tested without waiting.

// Handlers return a ready `Response` as their error: it is the natural early
// exit in axum, errors are the uncommon path, and boxing would only add noise.
#![allow(
    clippy::result_large_err,
    reason = "Response is the handlers' error type"
)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use serde_json::json;

use super::Sim;
use crate::tools::sim::kit::{Reply, header_str, json, lock, random_hex};
use crate::tools::sim::stats::Counters;

/// Qonto documents 10 min for a code and 90 days for a refresh token.
const CODE_LIFETIME: Duration = Duration::from_secs(10 * 60);
const REFRESH_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);

/// Maps that grow with every exchange are pruned of dead entries when their
/// size reaches a power of two from here on, so a long run with short-lived
/// tokens stays bounded without a background task.
const PRUNE_FROM: usize = 1024;

/// RFC 3986 unreserved characters stay as they are in a query value.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The OAuth client the server knows and its token timing; part of the
/// Qonto half's `Options`.
#[derive(Clone, Debug)]
pub struct OAuthOptions {
    pub client_id: String,
    pub client_secret: String,
    /// An access token's life (`expires_in`); whole seconds, at least one.
    pub access_token_lifetime: Duration,
    /// How long a used refresh token still answers after its first use.
    pub grace_period: Duration,
    /// The server's time (the API's bearer checks included).
    pub clock: Clock,
    /// Refresh tokens the server starts with, each of its own consented
    /// grant (scope [`SEED_SCOPE`]), so a compose stack or a demo can seed
    /// a worker's token store (`..__OAUTH__REFRESH_TOKEN`) without a browser.
    /// Each is an ordinary refresh token from then on: used once it
    /// rotates, reused after the grace it revokes its grant.
    pub seed_refresh_tokens: Vec<String>,
}

/// The contract's default scopes, which seeded grants hold.
pub const SEED_SCOPE: &str = "request_review.write organization.read offline_access";

impl Default for OAuthOptions {
    fn default() -> Self {
        Self {
            client_id: "sim-qonto-client".into(),
            client_secret: "sim-qonto-client-secret".into(),
            access_token_lifetime: Duration::from_secs(3600),
            grace_period: Duration::from_secs(60),
            clock: Clock::default(),
            seed_refresh_tokens: Vec::new(),
        }
    }
}

/// Real time plus an offset that only grows; clones share the offset, so a
/// test keeps one and moves the running server's time forward with it.
#[derive(Clone, Debug, Default)]
pub struct Clock(Arc<AtomicU64>);

impl Clock {
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |ms| {
                Some(ms.saturating_add(by))
            });
    }

    pub fn now(&self) -> Instant {
        let now = Instant::now();
        // An offset beyond what Instant holds only comes from a test asking
        // for "forever"; the far side of a day is just as final.
        let offset = Duration::from_millis(self.0.load(Ordering::Relaxed));
        now.checked_add(offset)
            .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
            .unwrap_or(now)
    }
}

/// One authorization: what every token issued from it shares, and dies with.
struct Grant {
    client_id: String,
    scope: String,
    revoked: bool,
}

struct Code {
    client_id: String,
    redirect_uri: String,
    scope: String,
    expires: Instant,
}

struct Refresh {
    grant: usize,
    expires: Instant,
    first_used: Option<Instant>,
}

struct Access {
    grant: usize,
    expires: Instant,
}

#[derive(Default)]
struct Chains {
    /// Indexed by grant number; grants are few (one per consent).
    grants: Vec<Grant>,
    codes: HashMap<String, Code>,
    refresh: HashMap<String, Refresh>,
    access: HashMap<String, Access>,
}

impl Chains {
    fn live(&self, grant: usize) -> bool {
        self.grants.get(grant).is_some_and(|g| !g.revoked)
    }

    fn prune(&mut self, now: Instant) {
        if self.access.len() >= PRUNE_FROM && self.access.len().is_power_of_two() {
            let grants = &self.grants;
            self.access
                .retain(|_, a| a.expires > now && grants.get(a.grant).is_some_and(|g| !g.revoked));
        }
        // A used refresh token is kept until it expires: its late reuse must
        // still revoke the grant. Only tokens that can no longer answer
        // anything but `invalid_grant` are dropped.
        if self.refresh.len() >= PRUNE_FROM && self.refresh.len().is_power_of_two() {
            let grants = &self.grants;
            self.refresh
                .retain(|_, r| r.expires > now && grants.get(r.grant).is_some_and(|g| !g.revoked));
        }
        if self.codes.len() >= PRUNE_FROM && self.codes.len().is_power_of_two() {
            self.codes.retain(|_, c| c.expires > now);
        }
    }
}

/// The running server: its options and every grant it made. It lives beside
/// the fake's targets, not among them, so a simulator reset keeps the grants
/// (as it keeps every fake's issued tokens).
pub(super) struct Server {
    options: OAuthOptions,
    chains: Mutex<Chains>,
}

impl Server {
    pub fn new(options: OAuthOptions) -> Result<Self, String> {
        if options.client_id.trim().is_empty() || options.client_secret.trim().is_empty() {
            return Err("the OAuth client id and secret must not be empty".into());
        }
        if options.access_token_lifetime < Duration::from_secs(1) {
            return Err("the OAuth access-token lifetime must be at least 1 s".into());
        }
        let mut chains = Chains::default();
        let now = options.clock.now();
        for seed in &options.seed_refresh_tokens {
            if seed.trim().is_empty() || chains.refresh.contains_key(seed) {
                return Err("OAuth seed refresh tokens must be non-empty and distinct".into());
            }
            chains.grants.push(Grant {
                client_id: options.client_id.clone(),
                scope: SEED_SCOPE.to_owned(),
                revoked: false,
            });
            let refresh = Refresh {
                grant: chains.grants.len() - 1,
                expires: now + REFRESH_LIFETIME,
                first_used: None,
            };
            chains.refresh.insert(seed.clone(), refresh);
        }
        Ok(Self {
            options,
            chains: Mutex::new(chains),
        })
    }

    /// Whether `token` is an access token of this server, unexpired, of a
    /// grant not revoked.
    pub fn access_valid(&self, token: &str) -> bool {
        let now = self.options.clock.now();
        let chains = lock(&self.chains);
        chains
            .access
            .get(token)
            .is_some_and(|a| a.expires > now && chains.live(a.grant))
    }

    /// The redirect for an authorization request, which the simulated user
    /// consents to at once.
    fn authorize(&self, params: &Params) -> Result<String, Response> {
        let response_type = params.required("response_type")?;
        let client_id = params.required("client_id")?;
        let redirect_uri = params.required("redirect_uri")?;
        let state = params.required("state")?;
        let scope = params.optional("scope").unwrap_or_default();
        if client_id != self.options.client_id {
            return Err(oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_client",
                "unknown client_id",
            ));
        }
        if response_type != "code" {
            return Err(oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_response_type",
                "only response_type=code is supported",
            ));
        }
        let is_http = redirect_uri.starts_with("http://") || redirect_uri.starts_with("https://");
        if !is_http || redirect_uri.contains('#') {
            return Err(oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "redirect_uri must be an absolute http(s) URL without a fragment",
            ));
        }

        let code = format!("ory_ac_{}", random_hex(24));
        let now = self.options.clock.now();
        let mut chains = lock(&self.chains);
        chains.prune(now);
        chains.codes.insert(
            code.clone(),
            Code {
                client_id: client_id.to_owned(),
                redirect_uri: redirect_uri.to_owned(),
                scope: scope.to_owned(),
                expires: now + CODE_LIFETIME,
            },
        );
        let separator = if redirect_uri.contains('?') { '&' } else { '?' };
        Ok(format!(
            "{redirect_uri}{separator}code={}&state={}",
            utf8_percent_encode(&code, QUERY_VALUE),
            utf8_percent_encode(state, QUERY_VALUE),
        ))
    }

    /// Authenticates the client by HTTP Basic (`client_secret_basic`) or by
    /// the form (`client_secret_post`, what Qonto documents); never both.
    fn authenticate(&self, headers: &HeaderMap, params: &Params) -> Result<String, Response> {
        let basic = header_str(headers, header::AUTHORIZATION.as_str())
            .and_then(|value| value.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
            .map(|(_, credentials)| credentials.trim());
        let (id, secret) = match basic {
            Some(credentials) => {
                if params.optional("client_secret").is_some() {
                    return Err(oauth_error(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        "the client authenticated both by HTTP Basic and in the body",
                    ));
                }
                let (id, secret) = decode_basic(credentials).ok_or_else(|| {
                    invalid_client("malformed HTTP Basic client credentials", true)
                })?;
                if params
                    .optional("client_id")
                    .is_some_and(|body_id| body_id != id)
                {
                    return Err(invalid_client("client_id differs from the Basic one", true));
                }
                (id, secret)
            }
            None => match (
                params.optional("client_id"),
                params.optional("client_secret"),
            ) {
                (Some(id), Some(secret)) => (id.to_owned(), secret.to_owned()),
                _ => return Err(invalid_client("client authentication is missing", false)),
            },
        };
        if id == self.options.client_id && secret == self.options.client_secret {
            Ok(id)
        } else {
            Err(invalid_client(
                "unknown client or wrong secret",
                basic.is_some(),
            ))
        }
    }

    fn token(&self, headers: &HeaderMap, params: &Params, counters: &Counters) -> Reply {
        let client_id = self.authenticate(headers, params)?;
        let invalid_grant = |detail: &str| {
            counters.bump_extra("oauth.invalid_grants");
            oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", detail)
        };
        let now = self.options.clock.now();
        let mut chains = lock(&self.chains);
        chains.prune(now);
        let grant = match params.required("grant_type")? {
            "authorization_code" => {
                let code = params.required("code")?;
                let redirect_uri = params.required("redirect_uri")?;
                let Some(stored) = chains.codes.get(code) else {
                    return Err(invalid_grant(
                        "the authorization code is unknown or was already used",
                    ));
                };
                if stored.expires <= now {
                    return Err(invalid_grant("the authorization code expired"));
                }
                if stored.client_id != client_id {
                    return Err(invalid_grant(
                        "the authorization code was issued to another client",
                    ));
                }
                if stored.redirect_uri != redirect_uri {
                    return Err(invalid_grant(
                        "redirect_uri differs from the authorization request's",
                    ));
                }
                let Some(code) = chains.codes.remove(code) else {
                    return Err(invalid_grant("the authorization code is unknown"));
                };
                chains.grants.push(Grant {
                    client_id,
                    scope: code.scope,
                    revoked: false,
                });
                counters.bump_extra("oauth.code_exchanges");
                chains.grants.len() - 1
            }
            "refresh_token" => {
                let token = params.required("refresh_token")?;
                let grace = self.options.grace_period;
                let Some(refresh) = chains.refresh.get(token) else {
                    return Err(invalid_grant("the refresh token is unknown"));
                };
                let (grant, expires, first_used) =
                    (refresh.grant, refresh.expires, refresh.first_used);
                let Some(owner) = chains.grants.get(grant) else {
                    return Err(invalid_grant("the refresh token is unknown"));
                };
                if owner.client_id != client_id {
                    return Err(invalid_grant(
                        "the refresh token was issued to another client",
                    ));
                }
                if owner.revoked {
                    return Err(invalid_grant("the grant was revoked"));
                }
                if expires <= now {
                    return Err(invalid_grant("the refresh token expired"));
                }
                match first_used {
                    None => {
                        if let Some(refresh) = chains.refresh.get_mut(token) {
                            refresh.first_used = Some(now);
                        }
                        counters.bump_extra("oauth.refreshes");
                    }
                    Some(at) if now.saturating_duration_since(at) < grace => {
                        counters.bump_extra("oauth.grace_reuses");
                    }
                    Some(_) => {
                        // Hydra reads a late reuse as a stolen token: the whole
                        // chain dies and a person must consent again.
                        if let Some(owner) = chains.grants.get_mut(grant) {
                            owner.revoked = true;
                        }
                        counters.bump_extra("oauth.revocations");
                        return Err(invalid_grant(
                            "the refresh token was already used; the grant is revoked",
                        ));
                    }
                }
                grant
            }
            _ => {
                return Err(oauth_error(
                    StatusCode::BAD_REQUEST,
                    "unsupported_grant_type",
                    "grant_type must be authorization_code or refresh_token",
                ));
            }
        };
        Ok(self.issue(&mut chains, grant, now, counters))
    }

    /// A new access token, and a refresh token when the grant holds offline
    /// access (Hydra issues one only then).
    fn issue(
        &self,
        chains: &mut Chains,
        grant: usize,
        now: Instant,
        counters: &Counters,
    ) -> Response {
        let lifetime = self.options.access_token_lifetime;
        let access_token = format!("ory_at_{}", random_hex(24));
        chains.access.insert(
            access_token.clone(),
            Access {
                grant,
                expires: now + lifetime,
            },
        );
        let scope = chains
            .grants
            .get(grant)
            .map(|g| g.scope.clone())
            .unwrap_or_default();
        let offline = scope
            .split(' ')
            .any(|s| s == "offline_access" || s == "offline");
        let mut body = json!({
            "access_token": access_token,
            "token_type": "bearer",
            "expires_in": lifetime.as_secs(),
            "scope": scope,
        });
        if offline {
            let refresh_token = format!("ory_rt_{}", random_hex(24));
            chains.refresh.insert(
                refresh_token.clone(),
                Refresh {
                    grant,
                    expires: now + REFRESH_LIFETIME,
                    first_used: None,
                },
            );
            body["refresh_token"] = refresh_token.into();
        }
        Counters::bump(&counters.token_issued);
        no_store(json(StatusCode::OK, &body))
    }
}

/// The worker settings (CONTRACT.md section 2) that point its OAuth client
/// at this server under the Qonto base URL `base_url`, with the client it
/// knows. A token store and a first pair (`..__OAUTH__REFRESH_TOKEN`, see
/// [`login`]) are the caller's.
pub fn worker_env(base_url: &str, options: &OAuthOptions) -> Vec<(String, String)> {
    let key = |name: &str| format!("APPROVAL_PROVIDERS__QONTO__OAUTH__{name}");
    vec![
        (key("CLIENT_ID"), options.client_id.clone()),
        (key("CLIENT_SECRET"), options.client_secret.clone()),
        (key("AUTH_URL"), format!("{base_url}/oauth2/auth")),
        (key("TOKEN_URL"), format!("{base_url}/oauth2/token")),
    ]
}

/// A pair as the token endpoint answers it.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct TokenPair {
    pub access_token: String,
    pub expires_in: u64,
    pub refresh_token: Option<String>,
    pub scope: String,
}

/// Plays an operator's consent and code exchange against the simulator at
/// `base_url` (its Qonto base URL): the first pair of a new grant with
/// `scope`, for demos and tests that seed a token store.
pub async fn login(
    base_url: &str,
    options: &OAuthOptions,
    staging_token: Option<&str>,
    scope: &str,
) -> Result<TokenPair, String> {
    const REDIRECT_URI: &str = "http://127.0.0.1:8765/callback";
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| format!("HTTP client: {e}"))?;
    let with_staging = |request: reqwest::RequestBuilder| match staging_token {
        Some(token) => request.header("X-Qonto-Staging-Token", token),
        None => request,
    };
    let state = random_hex(8);
    let consent = with_staging(client.get(format!("{base_url}/oauth2/auth")).query(&[
        ("response_type", "code"),
        ("client_id", options.client_id.as_str()),
        ("redirect_uri", REDIRECT_URI),
        ("scope", scope),
        ("state", state.as_str()),
    ]))
    .send()
    .await
    .map_err(|e| format!("authorization request: {e}"))?;
    let location = consent
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            format!(
                "authorization answered {} without a redirect",
                consent.status()
            )
        })?;
    let query = location.split_once('?').map(|(_, q)| q).unwrap_or_default();
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query)
        .map_err(|_| "the redirect's query is malformed".to_owned())?;
    let value = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    if value("state").as_deref() != Some(state.as_str()) {
        return Err("the redirect did not echo the state".into());
    }
    let code = value("code").ok_or("the redirect carries no code")?;
    let exchange = with_staging(client.post(format!("{base_url}/oauth2/token")).form(&[
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", REDIRECT_URI),
        ("client_id", options.client_id.as_str()),
        ("client_secret", options.client_secret.as_str()),
    ]))
    .send()
    .await
    .map_err(|e| format!("code exchange: {e}"))?;
    if !exchange.status().is_success() {
        return Err(format!("code exchange answered {}", exchange.status()));
    }
    exchange
        .json()
        .await
        .map_err(|e| format!("code exchange answer: {e}"))
}

/// `GET /oauth2/auth`.
pub(super) async fn auth_endpoint(
    State(sim): State<Arc<Sim>>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    headers: HeaderMap,
) -> Reply {
    staging(&sim, &headers)?;
    let Ok(Query(pairs)) = query else {
        return Err(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the query string is malformed",
        ));
    };
    let params = Params::new(pairs)?;
    let location = sim.config.oauth.authorize(&params)?;
    sim.counters.bump_extra("oauth.authorizations");
    let location = HeaderValue::try_from(location).map_err(|_| {
        oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "redirect_uri is not a valid header value",
        )
    })?;
    let mut response = Response::default();
    *response.status_mut() = StatusCode::FOUND;
    response.headers_mut().insert(header::LOCATION, location);
    Ok(response)
}

/// `POST /oauth2/token`, form-encoded.
pub(super) async fn token_endpoint(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    body: Bytes,
) -> Reply {
    staging(&sim, &headers)?;
    let form = header_str(&headers, header::CONTENT_TYPE.as_str()).is_some_and(|ct| {
        ct.trim_start()
            .starts_with("application/x-www-form-urlencoded")
    });
    if !form {
        return Err(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the body must be application/x-www-form-urlencoded",
        ));
    }
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).map_err(|_| {
        oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the form body is malformed",
        )
    })?;
    let params = Params::new(pairs)?;
    sim.config.oauth.token(&headers, &params, &sim.counters)
}

/// The sandbox's staging token, on the OAuth server as on the API.
fn staging(sim: &Sim, headers: &HeaderMap) -> Result<(), Response> {
    if super::staging_ok(sim, headers) {
        Ok(())
    } else {
        Err(oauth_error(
            StatusCode::FORBIDDEN,
            "access_denied",
            "X-Qonto-Staging-Token is missing or wrong",
        ))
    }
}

/// Request parameters; RFC 6749 forbids repeating one, and an empty value
/// counts as absent.
struct Params(HashMap<String, String>);

impl Params {
    fn new(pairs: Vec<(String, String)>) -> Result<Self, Response> {
        let mut map = HashMap::with_capacity(pairs.len());
        for (name, value) in pairs {
            if map.contains_key(&name) {
                return Err(oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    &format!("parameter {name} is repeated"),
                ));
            }
            map.insert(name, value);
        }
        Ok(Self(map))
    }

    fn optional(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn required(&self, name: &str) -> Result<&str, Response> {
        self.optional(name).ok_or_else(|| {
            oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &format!("parameter {name} is missing"),
            )
        })
    }
}

/// `base64(urlencode(id) ":" urlencode(secret))` (RFC 6749 section 2.3.1).
fn decode_basic(credentials: &str) -> Option<(String, String)> {
    let decoded = String::from_utf8(STANDARD.decode(credentials).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    let form_decode = |s: &str| {
        percent_decode_str(&s.replace('+', " "))
            .decode_utf8()
            .ok()
            .map(|s| s.into_owned())
    };
    Some((form_decode(id)?, form_decode(secret)?))
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    no_store(json(
        status,
        &json!({"error": error, "error_description": description}),
    ))
}

fn invalid_client(description: &str, basic: bool) -> Response {
    let mut response = oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", description);
    if basic {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"oauth\""),
        );
    }
    response
}

/// Token answers are never cached (RFC 6749 section 5.1).
fn no_store(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

#[cfg(test)]
mod tests;
