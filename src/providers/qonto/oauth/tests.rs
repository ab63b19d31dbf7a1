//! The token source against a wiremock token endpoint and real file stores.

use std::{path::PathBuf, sync::Arc, time::Duration};

use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use time::OffsetDateTime;
use wiremock::{
    Mock, MockServer, Request, ResponseTemplate,
    matchers::{method, path},
};

use super::{
    BREAKER_401S, TokenSource,
    file::FileStore,
    refresh::TokenEndpoint,
    store::{Record, TokenStore},
};
use crate::{
    providers::http::Http,
    retry::{CREDENTIALS_UNUSABLE, ErrorClass},
};

struct Fixture {
    server: MockServer,
    dir: PathBuf,
    store: Arc<dyn TokenStore>,
}

impl Fixture {
    async fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("qonto-oauth-src-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let store: Arc<dyn TokenStore> = Arc::new(FileStore::new(dir.join("store.json")));
        Self {
            server: MockServer::start().await,
            dir,
            store,
        }
    }

    fn source(&self, seed: Option<&str>) -> Arc<TokenSource> {
        let endpoint = TokenEndpoint {
            http: Http::new(Duration::from_secs(5), Duration::from_secs(5)).unwrap(),
            url: format!("{}/oauth2/token", self.server.uri())
                .parse()
                .unwrap(),
            client_id: SecretString::from("cid"),
            client_secret: SecretString::from("csecret"),
            staging_token: None,
        };
        // Each source opens the file on its own, as another process would.
        let store: Arc<dyn TokenStore> = Arc::new(FileStore::new(self.dir.join("store.json")));
        TokenSource::with_store(store, endpoint, seed.map(SecretString::from), 0.8)
    }

    /// Stores a pair issued `age_s` ago that lives `ttl_s`.
    async fn put(&self, generation: u64, age_s: i64, ttl_s: i64) {
        let now = OffsetDateTime::now_utc();
        let record = Record {
            access_token: SecretString::from(format!("access-{generation}")),
            access_issued_at: now - time::Duration::seconds(age_s),
            access_expires_at: now - time::Duration::seconds(age_s)
                + time::Duration::seconds(ttl_s),
            refresh_token: SecretString::from(format!("refresh-{generation}")),
            generation,
            refreshed_at: now,
            refreshed_by: "elsewhere:1".to_owned(),
            revoked_at: None,
        };
        let mut locked = self.store.lock(Duration::from_secs(1)).await.unwrap();
        locked.write(record).await.unwrap();
        locked.release().await.unwrap();
    }

    async fn stored(&self) -> Record {
        self.store.load().await.unwrap().expect("a record")
    }

    /// The token endpoint issues `access-N`/`refresh-N`, counting up, after
    /// `delay`.
    async fn issue(&self, delay: Duration) {
        let n = std::sync::atomic::AtomicU32::new(100);
        Mock::given(method("POST"))
            .and(path("/oauth2/token"))
            .respond_with(move |_: &Request| {
                let i = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                ResponseTemplate::new(200)
                    .set_delay(delay)
                    .set_body_json(json!({
                        "access_token": format!("access-{i}"),
                        "token_type": "bearer",
                        "expires_in": 3600,
                        "refresh_token": format!("refresh-{i}"),
                        "scope": "offline_access"
                    }))
            })
            .mount(&self.server)
            .await;
    }

    async fn refreshes(&self) -> Vec<String> {
        self.server
            .received_requests()
            .await
            .unwrap()
            .iter()
            .map(|r| {
                let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&r.body).unwrap();
                form.into_iter()
                    .find(|(k, _)| k == "refresh_token")
                    .map(|(_, v)| v)
                    .unwrap_or_default()
            })
            .collect()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn a_fresh_token_is_used_without_any_refresh() {
    let f = Fixture::new().await;
    f.issue(Duration::ZERO).await;
    f.put(1, 10, 100).await;
    let source = f.source(None);
    for _ in 0..3 {
        assert_eq!(source.token().await.unwrap().expose_secret(), "access-1");
    }
    assert!(f.refreshes().await.is_empty());
}

#[tokio::test]
async fn past_the_share_the_pair_is_refreshed_once_and_stored_first() {
    let f = Fixture::new().await;
    f.issue(Duration::ZERO).await;
    // 85 % of its lifetime gone: due, not expired.
    f.put(4, 85, 100).await;
    let source = f.source(None);
    let token = source.token().await.unwrap();
    assert_eq!(token.expose_secret(), "access-100");
    assert_eq!(f.refreshes().await, ["refresh-4"]);
    let stored = f.stored().await;
    assert_eq!(stored.generation, 5);
    assert_eq!(stored.refresh_token.expose_secret(), "refresh-100");
    assert!(stored.refreshed_by.contains(':'), "{}", stored.refreshed_by);
    // And the new pair is used from then on.
    assert_eq!(source.token().await.unwrap().expose_secret(), "access-100");
    assert_eq!(f.refreshes().await.len(), 1);
}

/// Two sources (two processes' worth) find the same pair due at once: the
/// one that gets the lock second finds the new generation and uses it.
#[tokio::test]
async fn two_sources_racing_on_one_file_store_refresh_once() {
    let f = Fixture::new().await;
    f.issue(Duration::from_millis(300)).await;
    f.put(1, 90, 100).await;
    let (a, b) = (f.source(None), f.source(None));
    let (ta, tb) = tokio::join!(a.token(), b.token());
    let (ta, tb) = (ta.unwrap(), tb.unwrap());
    assert_eq!(f.refreshes().await, ["refresh-1"]);
    // Either may have returned the old, still valid token while the other
    // refreshed; the next call of each uses the stored new one.
    for t in [ta, tb] {
        assert!(
            ["access-1", "access-100"].contains(&t.expose_secret()),
            "{}",
            t.expose_secret()
        );
    }
    assert_eq!(a.token().await.unwrap().expose_secret(), "access-100");
    assert_eq!(b.token().await.unwrap().expose_secret(), "access-100");
    assert_eq!(f.stored().await.generation, 2);
}

/// With the old access token expired, nobody can go on with it: both wait,
/// and still only one refreshes.
#[tokio::test]
async fn two_sources_with_an_expired_token_refresh_once() {
    let f = Fixture::new().await;
    f.issue(Duration::from_millis(300)).await;
    f.put(1, 200, 100).await;
    let (a, b) = (f.source(None), f.source(None));
    let (ta, tb) = tokio::join!(a.token(), b.token());
    assert_eq!(ta.unwrap().expose_secret(), "access-100");
    assert_eq!(tb.unwrap().expose_secret(), "access-100");
    assert_eq!(f.refreshes().await, ["refresh-1"]);
}

#[tokio::test]
async fn an_empty_store_is_seeded_once_and_the_seed_never_reused() {
    let f = Fixture::new().await;
    f.issue(Duration::from_millis(200)).await;
    let (a, b) = (f.source(Some("seed-token")), f.source(Some("seed-token")));
    let (ta, tb) = tokio::join!(a.token(), b.token());
    assert_eq!(ta.unwrap().expose_secret(), "access-100");
    assert_eq!(tb.unwrap().expose_secret(), "access-100");
    assert_eq!(f.refreshes().await, ["seed-token"]);
    assert_eq!(f.stored().await.generation, 1);
    // A restart with the seed still configured uses the stored pair.
    let c = f.source(Some("seed-token"));
    assert_eq!(c.token().await.unwrap().expose_secret(), "access-100");
    assert_eq!(f.refreshes().await.len(), 1);
}

#[tokio::test]
async fn an_empty_store_without_a_seed_holds_calls_and_says_why() {
    let f = Fixture::new().await;
    let source = f.source(None);
    let e = source.token().await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Unavailable);
    assert_eq!(e.provider_code.as_deref(), Some(CREDENTIALS_UNUSABLE));
    assert!(source.problem().unwrap().contains("qonto-oauth login"));
}

/// `invalid_grant`: recorded in the store, reported, every call refused
/// without another token call; a login's new generation heals it.
#[tokio::test]
async fn a_revoked_grant_stops_calls_until_a_login_writes_a_new_pair() {
    let f = Fixture::new().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({
            "error": "invalid_grant", "error_description": "the refresh token was revoked"
        })))
        .mount(&f.server)
        .await;
    f.put(3, 95, 100).await;
    let source = f.source(None);
    // Due but valid: the failed refresh revokes; the token is not used.
    for _ in 0..5 {
        let e = source.token().await.unwrap_err();
        assert_eq!(e.class, ErrorClass::Unavailable, "{e}");
        assert_eq!(e.provider_code.as_deref(), Some(CREDENTIALS_UNUSABLE));
        assert!(!e.message.contains("refresh-3"), "{e}");
    }
    assert_eq!(f.refreshes().await.len(), 1, "no second refresh");
    assert!(f.stored().await.revoked_at.is_some());
    assert!(source.problem().unwrap().contains("revoked"));
    // Another process sees the revocation in the store, without calling.
    let other = f.source(None);
    assert_eq!(
        other.token().await.unwrap_err().class,
        ErrorClass::Unavailable
    );
    assert_eq!(f.refreshes().await.len(), 1);

    // A login writes generation 4; the periodic re-read picks it up.
    f.put(4, 0, 100).await;
    let healed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Ok(t) = source.token().await {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the login heals the source");
    assert_eq!(healed.expose_secret(), "access-4");
    assert_eq!(source.problem(), None);
}

/// A lost answer (503) is repeated with the same refresh token, inside
/// the grace period; the second answer's pair is stored.
#[tokio::test]
async fn a_lost_refresh_answer_is_repeated_with_the_same_token() {
    let f = Fixture::new().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .mount(&f.server)
        .await;
    f.issue(Duration::ZERO).await;
    f.put(2, 200, 100).await;
    let source = f.source(None);
    assert_eq!(source.token().await.unwrap().expose_secret(), "access-100");
    assert_eq!(f.refreshes().await, ["refresh-2", "refresh-2"]);
    assert_eq!(f.stored().await.generation, 3);
}

/// A token endpoint that keeps failing while the old token is still valid:
/// calls go on with the old token, and the refresh is tried again later,
/// not by the next call. (Retry-After past the retry span: one request.)
#[tokio::test]
async fn while_the_endpoint_fails_the_valid_token_is_used() {
    let f = Fixture::new().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503).insert_header("retry-after", "60"))
        .expect(1)
        .mount(&f.server)
        .await;
    f.put(2, 85, 100).await;
    let source = f.source(None);
    assert_eq!(source.token().await.unwrap().expose_secret(), "access-2");
    assert_eq!(source.token().await.unwrap().expose_secret(), "access-2");
    assert_eq!(f.refreshes().await, ["refresh-2"]);
    assert!(source.problem().is_none());
}

/// An expired token and a token endpoint down: every caller is told to
/// wait (not an attempt, not a grant problem), with ONE token request per
/// back-off, not one per queued caller.
#[tokio::test]
async fn an_expired_token_with_the_endpoint_down_waits_with_one_request() {
    let f = Fixture::new().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503).insert_header("retry-after", "60"))
        .expect(1)
        .mount(&f.server)
        .await;
    f.put(2, 200, 100).await;
    let source = f.source(None);
    let calls = (0..10).map(|_| {
        let source = source.clone();
        tokio::spawn(async move { source.token().await })
    });
    for call in calls {
        let e = call.await.unwrap().unwrap_err();
        assert_eq!(e.class, ErrorClass::Unavailable, "{e}");
        assert_eq!(e.provider_code, None, "{e}");
        let wait = e.retry_after.expect("a retry_after");
        assert!(
            wait > Duration::ZERO && wait <= super::REFRESH_BACKOFF,
            "{wait:?}"
        );
    }
    assert_eq!(f.refreshes().await, ["refresh-2"]);
    assert!(source.problem().is_none());
}

/// A seed refused with invalid_grant leaves the store empty; a re-read
/// must not send it again.
#[tokio::test]
async fn a_refused_seed_is_not_sent_again() {
    let f = Fixture::new().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({
            "error": "invalid_grant", "error_description": "unknown refresh token"
        })))
        .expect(1)
        .mount(&f.server)
        .await;
    let source = f.source(Some("seed-token"));
    let e = source.token().await.unwrap_err();
    assert_eq!(e.provider_code.as_deref(), Some(CREDENTIALS_UNUSABLE));
    // Past the re-read interval, as the watcher would call.
    source.current().last_read = Some(tokio::time::Instant::now() - super::UNUSABLE_REREAD);
    let e = source.token().await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Unavailable);
    assert!(source.problem().unwrap().contains("revoked"));
    assert_eq!(f.refreshes().await, ["seed-token"]);
}

/// The token endpoint refuses the client (invalid_client): calls are held
/// and the grant is not marked revoked.
#[tokio::test]
async fn a_refused_client_holds_calls() {
    let f = Fixture::new().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(401).set_body_json(json!({"error": "invalid_client"})))
        .mount(&f.server)
        .await;
    f.put(2, 85, 100).await;
    let source = f.source(None);
    let e = source.token().await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Unavailable);
    assert!(source.problem().unwrap().contains("refused the client"));
    assert!(f.stored().await.revoked_at.is_none(), "not a revocation");
}

#[tokio::test]
async fn repeated_401s_with_the_freshest_token_open_the_breaker() {
    let f = Fixture::new().await;
    f.put(1, 0, 100).await;
    let source = f.source(None);
    let token = source.token().await.unwrap();
    for i in 1..BREAKER_401S {
        assert!(source.rejected(&token).await.is_none(), "401 #{i}");
        assert!(source.token().await.is_ok(), "still closed after {i}");
    }
    assert!(source.rejected(&token).await.is_none());
    let e = source.token().await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Unavailable);
    assert!(e.retry_after.unwrap() > Duration::from_secs(20));
    assert!(source.problem().unwrap().contains("401"));
}

/// A 401 re-reads the store: a pair another process wrote is tried, and
/// it does not count towards the breaker.
#[tokio::test]
async fn a_401_rereads_the_store_for_a_newer_token() {
    let f = Fixture::new().await;
    f.put(1, 0, 100).await;
    let source = f.source(None);
    let old = source.token().await.unwrap();
    f.put(2, 0, 100).await;
    let fresh = source.rejected(&old).await.expect("the newer stored token");
    assert_eq!(fresh.expose_secret(), "access-2");
    assert_eq!(source.token().await.unwrap().expose_secret(), "access-2");
    assert!(f.refreshes().await.is_empty(), "a 401 never refreshes");
}

/// Every OAuth setting error names the key in its environment form, and
/// none quotes a secret.
#[test]
fn bad_oauth_settings_name_the_key() {
    let load = |vars: &[(&str, &str)]| {
        let settings = crate::settings::Settings::load_from(
            None,
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
        .and_then(|s| crate::providers::Registry::from_settings(&s).map(drop));
        settings.err().map(|e| e.to_string())
    };
    let id = ("APPROVAL_PROVIDERS__QONTO__OAUTH__CLIENT_ID", "cid");
    let secret = (
        "APPROVAL_PROVIDERS__QONTO__OAUTH__CLIENT_SECRET",
        "s3cret-value",
    );
    assert_eq!(load(&[id, secret]), None);
    for (vars, key) in [
        (vec![id], "APPROVAL_PROVIDERS__QONTO__OAUTH__CLIENT_SECRET"),
        (
            vec![
                id,
                (
                    "APPROVAL_PROVIDERS__QONTO__OAUTH__CLIENT_SECRET",
                    "REPLACE_ME",
                ),
            ],
            "APPROVAL_PROVIDERS__QONTO__OAUTH__CLIENT_SECRET",
        ),
        (
            vec![
                id,
                secret,
                ("APPROVAL_PROVIDERS__QONTO__OAUTH__TOKEN_STORE", "redis://x"),
            ],
            "APPROVAL_PROVIDERS__QONTO__OAUTH__TOKEN_STORE",
        ),
        (
            vec![
                id,
                secret,
                ("APPROVAL_PROVIDERS__QONTO__OAUTH__REFRESH_AT", "1.5"),
            ],
            "APPROVAL_PROVIDERS__QONTO__OAUTH__REFRESH_AT",
        ),
        (
            vec![
                id,
                secret,
                ("APPROVAL_PROVIDERS__QONTO__OAUTH__TOKEN_URL", "ftp://x"),
            ],
            "APPROVAL_PROVIDERS__QONTO__OAUTH__TOKEN_URL",
        ),
    ] {
        let e = load(&vars).unwrap_or_else(|| panic!("{vars:?} must fail"));
        assert!(
            e.starts_with(&format!("invalid configuration value for {key}: ")),
            "{e}"
        );
        assert!(!e.contains("s3cret-value"), "{e}");
    }
}
