//! The OAuth server driven over HTTP like a worker drives it; time moves by
//! the injected clock, never by waiting.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use reqwest::{RequestBuilder, Response};
use serde_json::{Value, json};

use super::super::Options;
use super::{Clock, OAuthOptions, login};
use crate::tools::sim::testkit::{new_id, sim_with};
use crate::tools::sim::{Faults, ProviderStats, SimConfig, SimHandle};

const REDIRECT: &str = "http://127.0.0.1:8765/callback";
const SCOPE: &str = "request_review.write organization.read offline_access";

struct Server {
    sim: SimHandle,
    clock: Clock,
    oauth: OAuthOptions,
    staging: Option<String>,
}

async fn server_with(staging: Option<&str>) -> Server {
    let clock = Clock::default();
    let oauth = OAuthOptions {
        clock: clock.clone(),
        ..OAuthOptions::default()
    };
    let sim = sim_with(SimConfig::default().with(Options {
        oauth: oauth.clone(),
        staging_token: staging.map(str::to_owned),
        ..Options::default()
    }))
    .await;
    Server {
        sim,
        clock,
        oauth,
        staging: staging.map(str::to_owned),
    }
}

async fn server() -> Server {
    server_with(None).await
}

/// Never follows the redirect: the test reads it.
fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn parts(response: Response) -> (u16, Value) {
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn query_value(location: &str, name: &str) -> Option<String> {
    let query = location.split_once('?')?.1;
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query).ok()?;
    pairs.into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.sim.base_url("qonto"))
    }

    fn staged(&self, request: RequestBuilder) -> RequestBuilder {
        match &self.staging {
            Some(token) => request.header("X-Qonto-Staging-Token", token),
            None => request,
        }
    }

    fn stats(&self) -> ProviderStats {
        self.sim.stats().provider("qonto").unwrap().clone()
    }

    async fn authorize(&self, params: &[(&str, &str)]) -> Response {
        self.staged(http().get(self.url("/oauth2/auth")).query(params))
            .send()
            .await
            .unwrap()
    }

    /// A code for the default client, `REDIRECT` and `SCOPE`.
    async fn code(&self) -> String {
        let response = self
            .authorize(&[
                ("response_type", "code"),
                ("client_id", &self.oauth.client_id),
                ("redirect_uri", REDIRECT),
                ("scope", SCOPE),
                ("state", "state-1234"),
            ])
            .await;
        assert_eq!(response.status().as_u16(), 302);
        let location = response.headers()["location"].to_str().unwrap().to_owned();
        query_value(&location, "code").unwrap()
    }

    /// A token call authenticated in the form (client_secret_post).
    async fn token(&self, grant: &[(&str, &str)]) -> (u16, Value) {
        let mut form = grant.to_vec();
        form.push(("client_id", &self.oauth.client_id));
        form.push(("client_secret", &self.oauth.client_secret));
        self.token_raw(&form, None).await
    }

    async fn token_raw(&self, form: &[(&str, &str)], basic: Option<&str>) -> (u16, Value) {
        let mut request = self.staged(http().post(self.url("/oauth2/token")).form(form));
        if let Some(credentials) = basic {
            request = request.header("Authorization", format!("Basic {credentials}"));
        }
        parts(request.send().await.unwrap()).await
    }

    async fn exchange(&self, code: &str) -> (u16, Value) {
        self.token(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", REDIRECT),
        ])
        .await
    }

    async fn refresh(&self, refresh_token: &Value) -> (u16, Value) {
        let token = refresh_token.as_str().expect("a refresh token");
        self.token(&[("grant_type", "refresh_token"), ("refresh_token", token)])
            .await
    }

    /// A fresh grant's first pair.
    async fn pair(&self) -> Value {
        let (status, pair) = self.exchange(&self.code().await).await;
        assert_eq!(status, 200, "{pair}");
        pair
    }

    /// Declines a new request at the API with this bearer token.
    async fn api(&self, access_token: &Value) -> (u16, Value) {
        let url = self.url(&format!("/v2/requests/transfers/{}/decline", new_id()));
        let request = http()
            .post(url)
            .bearer_auth(access_token.as_str().expect("an access token"))
            .header("X-Qonto-Idempotency-Key", new_id())
            .json(&json!({"declined_note": "no"}));
        parts(self.staged(request).send().await.unwrap()).await
    }
}

fn assert_invalid_grant((status, body): (u16, Value)) {
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "invalid_grant", "{body}");
}

fn assert_api_refused((status, body): (u16, Value)) {
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["errors"][0]["code"], "authorization_token_invalid");
}

#[tokio::test]
async fn consent_redirects_with_the_state_and_the_code_works_once() {
    let s = server().await;
    let state = "a b&c=d/é+%";
    let response = s
        .authorize(&[
            ("response_type", "code"),
            ("client_id", "sim-qonto-client"),
            ("redirect_uri", REDIRECT),
            ("scope", SCOPE),
            ("state", state),
        ])
        .await;
    assert_eq!(response.status().as_u16(), 302);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    assert!(
        location.starts_with(&format!("{REDIRECT}?code=")),
        "{location}"
    );
    assert_eq!(query_value(&location, "state").as_deref(), Some(state));
    let code = query_value(&location, "code").unwrap();

    let (status, pair) = s.exchange(&code).await;
    assert_eq!(status, 200, "{pair}");
    assert_eq!(pair["token_type"], "bearer");
    assert_eq!(pair["expires_in"], 3600);
    assert_eq!(pair["scope"], SCOPE);
    assert!(
        pair["refresh_token"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
    );
    assert_eq!(s.api(&pair["access_token"]).await.0, 200);

    assert_invalid_grant(s.exchange(&code).await);
    let stats = s.stats();
    assert_eq!(stats.count("oauth.authorizations"), 1);
    assert_eq!(stats.count("oauth.code_exchanges"), 1);
    assert_eq!(stats.count("oauth.invalid_grants"), 1);
    assert_eq!(stats.token_issued, 1);
}

#[tokio::test]
async fn a_code_is_bound_to_its_redirect_uri_and_client() {
    let s = server().await;
    let code = s.code().await;
    assert_invalid_grant(
        s.token(&[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", "http://127.0.0.1:8765/other"),
        ])
        .await,
    );
    // The refusal did not consume it.
    assert_eq!(s.exchange(&code).await.0, 200);

    // A redirect URI with its own query keeps it.
    let response = s
        .authorize(&[
            ("response_type", "code"),
            ("client_id", "sim-qonto-client"),
            ("redirect_uri", "http://127.0.0.1:8765/cb?tenant=1"),
            ("state", "s1234567"),
        ])
        .await;
    let location = response.headers()["location"].to_str().unwrap();
    assert!(
        location.starts_with("http://127.0.0.1:8765/cb?tenant=1&code="),
        "{location}"
    );
}

#[tokio::test]
async fn a_code_expires_after_ten_minutes() {
    let s = server().await;
    let code = s.code().await;
    s.clock.advance(Duration::from_secs(10 * 60));
    assert_invalid_grant(s.exchange(&code).await);
}

#[tokio::test]
async fn bad_authorization_requests_answer_400_without_a_redirect() {
    let s = server().await;
    let base = [
        ("response_type", "code"),
        ("client_id", "sim-qonto-client"),
        ("redirect_uri", REDIRECT),
        ("state", "s1234567"),
    ];
    let with = |name: &str, value: &'static str| -> Vec<(&str, &str)> {
        base.iter()
            .map(|&(k, v)| if k == name { (k, value) } else { (k, v) })
            .collect()
    };
    let cases: [(Vec<(&str, &str)>, &str); 5] = [
        (with("client_id", "someone-else"), "invalid_client"),
        (with("state", ""), "invalid_request"),
        (with("redirect_uri", "not-a-url"), "invalid_request"),
        (with("response_type", "token"), "unsupported_response_type"),
        (
            base.iter().copied().chain([("state", "again")]).collect(),
            "invalid_request",
        ),
    ];
    for (params, error) in cases {
        let response = s.authorize(&params).await;
        assert!(response.headers().get("location").is_none());
        let (status, body) = parts(response).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some(error)),
            "{params:?}"
        );
    }
    assert_eq!(s.stats().count("oauth.authorizations"), 0);
}

#[tokio::test]
async fn the_client_authenticates_by_form_or_by_basic() {
    let s = server().await;
    let basic = |id: &str, secret: &str| STANDARD.encode(format!("{id}:{secret}"));
    let code = s.code().await;
    let grant = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", REDIRECT),
    ];

    // Wrong secret, either way: 401 invalid_client, the code unspent.
    let (status, body) = s
        .token_raw(&grant, Some(&basic("sim-qonto-client", "wrong")))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_client"))
    );
    let mut form = grant.to_vec();
    form.extend([
        ("client_id", "sim-qonto-client"),
        ("client_secret", "wrong"),
    ]);
    let (status, body) = s.token_raw(&form, None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_client"))
    );
    let (status, body) = s.token_raw(&grant, None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_client"))
    );
    // Both methods at once is refused.
    let mut both = grant.to_vec();
    both.push(("client_secret", "sim-qonto-client-secret"));
    let credentials = basic("sim-qonto-client", "sim-qonto-client-secret");
    assert_eq!(s.token_raw(&both, Some(&credentials)).await.0, 400);

    // HTTP Basic exchanges the code; the form refreshes.
    let (status, pair) = s.token_raw(&grant, Some(&credentials)).await;
    assert_eq!(status, 200, "{pair}");
    assert_eq!(s.refresh(&pair["refresh_token"]).await.0, 200);
    assert_eq!(s.stats().count("oauth.invalid_grants"), 0);
}

#[tokio::test]
async fn each_refresh_rotates_the_refresh_token() {
    let s = server().await;
    let first = s.pair().await;
    let (status, second) = s.refresh(&first["refresh_token"]).await;
    assert_eq!(status, 200, "{second}");
    assert_ne!(second["refresh_token"], first["refresh_token"]);
    assert_ne!(second["access_token"], first["access_token"]);
    let (status, third) = s.refresh(&second["refresh_token"]).await;
    assert_eq!(status, 200, "{third}");
    assert_eq!(s.api(&third["access_token"]).await.0, 200);
    // The older access tokens stay valid until they expire.
    assert_eq!(s.api(&first["access_token"]).await.0, 200);

    let stats = s.stats();
    assert_eq!(stats.count("oauth.refreshes"), 2);
    assert_eq!(stats.count("oauth.grace_reuses"), 0);
    assert_eq!(stats.count("oauth.revocations"), 0);
}

#[tokio::test]
async fn a_reuse_within_the_grace_returns_a_pair_and_revokes_nothing() {
    let s = server().await;
    let first = s.pair().await;
    let (_, second) = s.refresh(&first["refresh_token"]).await;
    s.clock.advance(Duration::from_secs(59));
    let (status, again) = s.refresh(&first["refresh_token"]).await;
    assert_eq!(status, 200, "{again}");
    assert_ne!(again["refresh_token"], second["refresh_token"]);

    for pair in [&first, &second, &again] {
        assert_eq!(s.api(&pair["access_token"]).await.0, 200);
    }
    assert_eq!(s.refresh(&second["refresh_token"]).await.0, 200);
    assert_eq!(s.refresh(&again["refresh_token"]).await.0, 200);
    let stats = s.stats();
    assert_eq!(stats.count("oauth.refreshes"), 3);
    assert_eq!(stats.count("oauth.grace_reuses"), 1);
    assert_eq!(stats.count("oauth.revocations"), 0);
    assert_eq!(stats.count("oauth.invalid_grants"), 0);
}

#[tokio::test]
async fn a_reuse_after_the_grace_revokes_the_whole_grant() {
    let s = server().await;
    let other = s.pair().await;
    let first = s.pair().await;
    let (_, second) = s.refresh(&first["refresh_token"]).await;
    s.clock.advance(Duration::from_secs(60));
    assert_invalid_grant(s.refresh(&first["refresh_token"]).await);

    // Every token of the grant is dead, at the API and the token endpoint.
    assert_api_refused(s.api(&first["access_token"]).await);
    assert_api_refused(s.api(&second["access_token"]).await);
    assert_invalid_grant(s.refresh(&second["refresh_token"]).await);
    assert_invalid_grant(s.refresh(&first["refresh_token"]).await);
    // Another grant of the same client lives on.
    assert_eq!(s.api(&other["access_token"]).await.0, 200);
    assert_eq!(s.refresh(&other["refresh_token"]).await.0, 200);

    let stats = s.stats();
    assert_eq!(stats.count("oauth.revocations"), 1);
    assert_eq!(stats.count("oauth.invalid_grants"), 3);
    assert_eq!(stats.count("oauth.api_401s"), 2);
}

#[tokio::test]
async fn an_expired_access_token_is_refused_and_its_refresh_token_still_works() {
    let s = server().await;
    let pair = s.pair().await;
    s.clock.advance(Duration::from_secs(3599));
    assert_eq!(s.api(&pair["access_token"]).await.0, 200);
    s.clock.advance(Duration::from_secs(1));
    assert_api_refused(s.api(&pair["access_token"]).await);
    assert_api_refused(s.api(&json!("ory_at_never-issued")).await);
    assert_eq!(s.stats().count("oauth.api_401s"), 2);

    let (status, fresh) = s.refresh(&pair["refresh_token"]).await;
    assert_eq!(status, 200, "{fresh}");
    assert_eq!(s.api(&fresh["access_token"]).await.0, 200);
    // Refresh tokens last 90 days.
    s.clock.advance(Duration::from_secs(90 * 24 * 3600));
    assert_invalid_grant(s.refresh(&fresh["refresh_token"]).await);
}

#[tokio::test]
async fn the_access_token_lifetime_and_grace_are_configurable() {
    let clock = Clock::default();
    let oauth = OAuthOptions {
        access_token_lifetime: Duration::from_secs(2),
        grace_period: Duration::from_secs(5),
        clock: clock.clone(),
        ..OAuthOptions::default()
    };
    let sim = sim_with(SimConfig::default().with(Options {
        oauth: oauth.clone(),
        ..Options::default()
    }))
    .await;
    let s = Server {
        sim,
        clock,
        oauth,
        staging: None,
    };
    let first = s.pair().await;
    assert_eq!(first["expires_in"], 2);
    s.clock.advance(Duration::from_secs(2));
    assert_api_refused(s.api(&first["access_token"]).await);
    assert_eq!(s.refresh(&first["refresh_token"]).await.0, 200);
    s.clock.advance(Duration::from_secs(5));
    assert_invalid_grant(s.refresh(&first["refresh_token"]).await);
    assert_eq!(s.stats().count("oauth.revocations"), 1);

    for (lifetime, id) in [
        (Duration::from_millis(999), "c"),
        (Duration::from_secs(1), ""),
    ] {
        let options = Options {
            oauth: OAuthOptions {
                access_token_lifetime: lifetime,
                client_id: id.into(),
                ..OAuthOptions::default()
            },
            ..Options::default()
        };
        let started = crate::tools::sim::start(
            SimConfig::default().with(options),
            "127.0.0.1:0".parse().unwrap(),
        )
        .await;
        assert!(started.is_err(), "{lifetime:?} {id:?}");
    }
}

#[tokio::test]
async fn without_offline_access_no_refresh_token_is_issued() {
    let s = server().await;
    let response = s
        .authorize(&[
            ("response_type", "code"),
            ("client_id", "sim-qonto-client"),
            ("redirect_uri", REDIRECT),
            ("scope", "request_review.write"),
            ("state", "s1234567"),
        ])
        .await;
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let (status, pair) = s.exchange(&query_value(&location, "code").unwrap()).await;
    assert_eq!(status, 200, "{pair}");
    assert!(pair.get("refresh_token").is_none(), "{pair}");
}

#[tokio::test]
async fn bad_token_requests_get_clear_errors() {
    let s = server().await;
    assert_invalid_grant(s.refresh(&json!("ory_rt_never-issued")).await);
    let (status, body) = s.token(&[("grant_type", "password")]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );
    let (status, body) = s.token(&[("grant_type", "refresh_token")]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
    let (status, body) = s
        .token(&[
            ("grant_type", "refresh_token"),
            ("grant_type", "refresh_token"),
        ])
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );

    let response = http()
        .post(s.url("/oauth2/token"))
        .json(&json!({"grant_type": "refresh_token"}))
        .send()
        .await
        .unwrap();
    let (status, body) = parts(response).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
}

#[tokio::test]
async fn a_staging_token_is_required_everywhere_once_configured() {
    let s = server_with(Some("stg-token")).await;
    let pair = s.pair().await;
    assert_eq!(s.api(&pair["access_token"]).await.0, 200);

    // Without it, or with a wrong one: refused before anything else.
    let url = |path: &str| s.url(path);
    let response = http()
        .get(url("/oauth2/auth"))
        .query(&[
            ("response_type", "code"),
            ("client_id", "sim-qonto-client"),
            ("redirect_uri", REDIRECT),
            ("state", "s1234567"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 403);
    let response = http()
        .post(url("/oauth2/token"))
        .header("X-Qonto-Staging-Token", "wrong")
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", pair["refresh_token"].as_str().unwrap()),
            ("client_id", "sim-qonto-client"),
            ("client_secret", "sim-qonto-client-secret"),
        ])
        .send()
        .await
        .unwrap();
    let (status, body) = parts(response).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("access_denied"))
    );
    let response = http()
        .post(url(&format!("/v2/requests/transfers/{}/decline", new_id())))
        .header("Authorization", "sim-qonto:sim-qonto-secret")
        .header("X-Qonto-Idempotency-Key", new_id())
        .json(&json!({"declined_note": "no"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 403);
    // The refused calls spent nothing: the refresh token is unused.
    assert_eq!(s.refresh(&pair["refresh_token"]).await.0, 200);
    assert_eq!(s.stats().count("oauth.refreshes"), 1);

    let env = s.sim.worker_env();
    assert!(env.contains(&(
        "APPROVAL_PROVIDERS__QONTO__STAGING_TOKEN".into(),
        "stg-token".into()
    )));
}

#[tokio::test]
async fn grants_survive_a_reset_and_token_calls_are_faulted_only_on_request() {
    let s = server().await;
    let pair = s.pair().await;
    s.sim.reset();
    assert_eq!(s.api(&pair["access_token"]).await.0, 200);

    s.sim.set_faults(
        "qonto",
        Faults {
            error_rate: 1.0,
            ..Faults::default()
        },
    );
    let (status, fresh) = s.refresh(&pair["refresh_token"]).await;
    assert_eq!(status, 200, "{fresh}");
    s.sim.set_faults(
        "qonto",
        Faults {
            error_rate: 1.0,
            include_auth: true,
            ..Faults::default()
        },
    );
    assert_eq!(s.refresh(&fresh["refresh_token"]).await.0, 503);
    assert_eq!(s.stats().count("oauth.refreshes"), 1);
}

#[tokio::test]
async fn login_plays_consent_and_exchange_for_tools() {
    let s = server_with(Some("stg")).await;
    let base_url = s.sim.base_url("qonto");
    let pair = login(&base_url, &s.oauth, Some("stg"), SCOPE)
        .await
        .unwrap();
    assert!(pair.refresh_token.is_some());
    assert_eq!(pair.expires_in, 3600);
    assert_eq!(s.api(&json!(pair.access_token)).await.0, 200);
    assert!(login(&base_url, &s.oauth, None, SCOPE).await.is_err());

    let env = super::worker_env(&base_url, &s.oauth);
    let value = |key: &str| {
        env.iter()
            .find(|(k, _)| k == &format!("APPROVAL_PROVIDERS__QONTO__OAUTH__{key}"))
            .map(|(_, v)| v.clone())
    };
    assert_eq!(value("TOKEN_URL"), Some(format!("{base_url}/oauth2/token")));
    assert_eq!(value("AUTH_URL"), Some(format!("{base_url}/oauth2/auth")));
    assert_eq!(value("CLIENT_ID").as_deref(), Some("sim-qonto-client"));
}

#[tokio::test]
async fn seeded_refresh_tokens_start_their_own_grants() {
    let clock = Clock::default();
    let oauth = OAuthOptions {
        clock: clock.clone(),
        seed_refresh_tokens: vec!["seed-a".into(), "seed-b".into()],
        ..OAuthOptions::default()
    };
    let sim = sim_with(SimConfig::default().with(Options {
        oauth: oauth.clone(),
        ..Options::default()
    }))
    .await;
    let s = Server {
        sim,
        clock,
        oauth,
        staging: None,
    };
    let (status, a) = s.refresh(&json!("seed-a")).await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(a["scope"], super::SEED_SCOPE);
    assert_eq!(s.api(&a["access_token"]).await.0, 200);
    let (_, b) = s.refresh(&json!("seed-b")).await;
    // A seed is a refresh token like any other: reused late, its grant dies
    // and the other seed's grant lives on.
    s.clock.advance(Duration::from_secs(61));
    assert_invalid_grant(s.refresh(&json!("seed-a")).await);
    assert_api_refused(s.api(&a["access_token"]).await);
    assert_eq!(s.api(&b["access_token"]).await.0, 200);
    assert_eq!(s.stats().count("oauth.authorizations"), 0);

    let twice = OAuthOptions {
        seed_refresh_tokens: vec!["same".into(), "same".into()],
        ..OAuthOptions::default()
    };
    let started = crate::tools::sim::start(
        SimConfig::default().with(Options {
            oauth: twice,
            ..Options::default()
        }),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await;
    assert!(started.is_err());
}
