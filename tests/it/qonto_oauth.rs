//! Qonto OAuth end to end (issue 16): the real broker, the worker, the
//! simulator's OAuth server (Hydra semantics: rotation, 60 s grace,
//! revocation on late reuse), file and PostgreSQL token stores.

use std::{path::PathBuf, time::Duration};

use approval_worker::tools::sim::{
    self, QontoOptions, SimConfig, SimHandle, qonto_oauth::OAuthOptions, samples,
};

use crate::helpers::{
    app::{App, TestApp, spawn_app},
    wait::{DEADLINE, wait_for},
    worker::InProcessWorker,
};

const KEY: &str = "APPROVAL_PROVIDERS__QONTO__OAUTH__";

struct World {
    sim: SimHandle,
    options: OAuthOptions,
    seed: String,
    dir: PathBuf,
}

impl World {
    /// The simulator with an OAuth server issuing tokens of `lifetime`,
    /// started with one consented grant whose refresh token is the seed.
    async fn new(lifetime: Duration) -> Self {
        let seed = format!("it-seed-{}", uuid::Uuid::new_v4().simple());
        let options = OAuthOptions {
            access_token_lifetime: lifetime,
            seed_refresh_tokens: vec![seed.clone()],
            ..OAuthOptions::default()
        };
        let sim = sim::start(
            SimConfig::default().with(QontoOptions {
                oauth: options.clone(),
                ..QontoOptions::default()
            }),
            "127.0.0.1:0".parse().unwrap(),
        )
        .await
        .unwrap();
        let dir = std::env::temp_dir().join(format!("it-qonto-oauth-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        Self {
            sim,
            options,
            seed,
            dir,
        }
    }

    /// An app on this simulator whose Qonto client uses OAuth with `store`.
    fn app(&self, name: &str, store: &str, seeded: bool) -> App {
        let mut app = App::without_providers(name);
        for (k, v) in self.sim.worker_env() {
            app = app.env(&k, v);
        }
        for (k, v) in sim::qonto_oauth::worker_env(&self.sim.base_url("qonto"), &self.options) {
            app = app.env(&k, v);
        }
        app = app.env(&format!("{KEY}TOKEN_STORE"), store);
        if seeded {
            app = app.env(&format!("{KEY}REFRESH_TOKEN"), &self.seed);
        }
        app
    }

    fn file_store(&self) -> String {
        format!("file:{}", self.dir.join("qonto-oauth.json").display())
    }

    fn count(&self, name: &str) -> u64 {
        self.sim.stats().provider("qonto").unwrap().count(name)
    }

    fn oauth_counts(&self) -> String {
        [
            "oauth.refreshes",
            "oauth.grace_reuses",
            "oauth.revocations",
            "oauth.invalid_grants",
            "oauth.api_401s",
        ]
        .iter()
        .map(|n| format!("{n}={}", self.count(n)))
        .collect::<Vec<_>>()
        .join(" ")
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Publishes one Qonto approve every `every` for `span`; returns how many.
async fn stream(app: &TestApp, tag: &str, span: Duration, every: Duration) -> usize {
    let started = tokio::time::Instant::now();
    let mut n = 0;
    while started.elapsed() < span {
        let d = samples::decision("qonto", "approve", &format!("{tag}-{n}"));
        app.broker.publish(&d).await;
        n += 1;
        tokio::time::sleep(every).await;
    }
    n
}

async fn all_applied(app: &TestApp, n: usize) {
    let applied = app
        .broker
        .wait_outcomes_within(n, Duration::from_secs(60), |o| o.status() == "applied")
        .await;
    assert_eq!(applied.len(), n, "{:#?}", app.broker.outcomes());
}

/// Access tokens of 3 s: a stream of approves over 20 s is all applied,
/// across several refreshes, with no revocation and no 401.
#[tokio::test]
async fn short_lived_tokens_a_stream_of_approves_is_all_applied_without_revocation() {
    let world = World::new(Duration::from_secs(3)).await;
    let app = spawn_app(world.app("oauth-stream", &world.file_store(), true)).await;
    let n = stream(
        &app,
        "stream",
        Duration::from_secs(20),
        Duration::from_millis(250),
    )
    .await;
    all_applied(&app, n).await;
    let counts = world.oauth_counts();
    eprintln!("short-lived tokens, {n} approves: {counts}");
    assert!(world.count("oauth.refreshes") >= 6, "{counts}");
    assert_eq!(world.count("oauth.revocations"), 0, "{counts}");
    assert_eq!(world.count("oauth.grace_reuses"), 0, "{counts}");
    assert_eq!(world.count("oauth.api_401s"), 0, "{counts}");
    app.stop_worker().await;
}

/// Two workers (each its own token source) sharing one `postgres://`
/// store under load, one of them restarted mid-run: no revocation, no
/// refresh token used twice, and one refresh per generation.
#[tokio::test]
async fn two_workers_sharing_a_postgres_store_refresh_once_per_rotation() {
    let world = World::new(Duration::from_secs(3)).await;
    let grant = format!("it-grant-{}", uuid::Uuid::new_v4().simple());
    let url = "postgres://postgres@127.0.0.1:5432/postgres";
    let app = spawn_app(
        world
            .app("oauth-pg", url, true)
            .env(&format!("{KEY}GRANT_ID"), &grant),
    )
    .await;
    let mut env: Vec<(String, String)> = app_env(&app);
    env.push((format!("{KEY}GRANT_ID"), grant.clone()));
    let second = InProcessWorker::start(env.clone());
    let feed = stream(
        &app,
        "pg-a",
        Duration::from_secs(8),
        Duration::from_millis(100),
    )
    .await;
    // A restart of the second worker mid-run reuses the stored pair.
    second.stop().await;
    let second = InProcessWorker::start(env);
    let more = stream(
        &app,
        "pg-b",
        Duration::from_secs(8),
        Duration::from_millis(100),
    )
    .await;
    all_applied(&app, feed + more).await;
    second.stop().await;
    app.stop_worker().await;

    let (client, connection) =
        tokio_postgres::connect("host=127.0.0.1 user=postgres", tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT generation FROM approval_qonto_oauth WHERE grant_id = $1",
            &[&grant],
        )
        .await
        .unwrap();
    let generation: i64 = row.get(0);
    client
        .execute(
            "DELETE FROM approval_qonto_oauth WHERE grant_id = $1",
            &[&grant],
        )
        .await
        .unwrap();
    let counts = world.oauth_counts();
    eprintln!(
        "two workers on postgres, {} approves: generation {generation}, {counts}",
        feed + more
    );
    assert_eq!(world.count("oauth.revocations"), 0, "{counts}");
    assert_eq!(world.count("oauth.grace_reuses"), 0, "{counts}");
    // The seed's exchange is generation 1; each later refresh one more.
    assert_eq!(
        world.count("oauth.refreshes"),
        generation as u64,
        "{counts}"
    );
    assert!(generation >= 4, "{counts}");
}

fn app_env(app: &TestApp) -> Vec<(String, String)> {
    app.env()
}

/// A revoked grant: Qonto decisions are held (not parked, no call to
/// Qonto), `/readyz` names the problem, FlexPay is unaffected; then
/// `qonto-oauth login` end to end heals the running worker, the held
/// decisions are applied, and `status` shows the new generation without
/// any secret.
#[tokio::test]
async fn a_revoked_grant_holds_qonto_until_a_login_heals_it() {
    let world = World::new(Duration::from_secs(3600)).await;
    let redirect = format!("http://127.0.0.1:{}/callback", free_port());
    let app = spawn_app(
        world
            .app("oauth-revoked", &world.file_store(), false)
            .env(&format!("{KEY}REDIRECT_URI"), &redirect)
            .without_worker(),
    )
    .await;
    // A stored pair whose refresh token the server never issued and whose
    // access token expired: its refresh is answered invalid_grant.
    let stale = serde_json::json!({
        "access_token": "it-stale-access",
        "access_issued_at": "2026-01-01T00:00:00Z",
        "access_expires_at": "2026-01-01T01:00:00Z",
        "refresh_token": "it-unknown-refresh",
        "generation": 1,
        "refreshed_at": "2026-01-01T00:00:00Z",
        "refreshed_by": "it:1"
    });
    let path = world.dir.join("qonto-oauth.json");
    write_0600(&path, &stale);

    let mut worker = app.run(&["run"]);
    let ready = format!("{}/readyz", app.admin_url());
    for i in 0..3 {
        let d = samples::decision("qonto", "approve", &format!("revoked-q{i}"));
        app.broker.publish(&d).await;
    }
    let f = samples::decision("flexpay", "approve", "revoked-flexpay");
    app.broker.publish(&f).await;
    app.broker.outcome("revoked-flexpay", "applied").await;
    let body = wait_for("readiness to name the revoked grant", DEADLINE, || async {
        let r = reqwest::get(&ready).await.ok()?;
        let status = r.status().as_u16();
        let text = r.text().await.ok()?;
        (status == 503 && text.contains("revoked")).then_some(text)
    })
    .await;
    assert!(body.contains("qonto-oauth login"), "{body}");
    assert!(!body.contains("it-unknown-refresh"), "{body}");
    assert_eq!(
        world.count("oauth.invalid_grants"),
        1,
        "{}",
        world.oauth_counts()
    );
    let qonto = world.sim.stats().provider("qonto").unwrap().clone();
    assert_eq!(qonto.state_changes, 0, "no Qonto decision call");
    assert!(
        app.broker
            .outcomes()
            .iter()
            .all(|o| o.body["provider"] != "qonto"),
        "held, not settled: {:#?}",
        app.broker.outcomes()
    );
    let stored = std::fs::read_to_string(&path).unwrap();
    assert!(stored.contains("revoked_at"), "{stored}");

    // The operator logs in again.
    let mut login = app.run(&["qonto-oauth", "login", "--timeout-s", "30"]);
    let url = wait_for("the authorization URL", DEADLINE, || async {
        login
            .output()
            .lines()
            .find(|l| l.contains("/oauth2/auth?"))
            .map(str::to_owned)
    })
    .await;
    assert!(
        url.contains("state=") && url.contains("offline_access"),
        "{url}"
    );
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let consent = browser.get(url.trim()).send().await.unwrap();
    assert_eq!(consent.status().as_u16(), 302);
    let location = consent.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(&redirect), "{location}");
    let page = browser.get(&location).send().await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert!(login.wait(DEADLINE).await.success(), "{}", login.output());
    assert_eq!(world.count("oauth.code_exchanges"), 1);

    // The running worker picks the new generation up and applies the held decisions.
    for i in 0..3 {
        app.broker
            .outcome(&format!("revoked-q{i}"), "applied")
            .await;
    }
    wait_for("readiness back", DEADLINE, || async {
        let r = reqwest::get(&ready).await.ok()?;
        (r.status().as_u16() == 200).then_some(())
    })
    .await;
    assert_eq!(
        world.count("oauth.revocations"),
        0,
        "{}",
        world.oauth_counts()
    );

    let mut status = app.run(&["qonto-oauth", "status"]);
    assert!(status.wait(DEADLINE).await.success(), "{}", status.output());
    let text = status.output();
    assert!(text.contains("generation: 2"), "{text}");
    assert!(text.contains("state: usable"), "{text}");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for secret in [
        record["access_token"].as_str().unwrap(),
        record["refresh_token"].as_str().unwrap(),
        world.options.client_secret.as_str(),
    ] {
        assert!(!text.contains(secret), "status printed a secret: {text}");
    }
    worker.signal(libc::SIGTERM);
    assert!(worker.wait(DEADLINE).await.success(), "{}", worker.output());
    let logs = worker.output();
    assert_eq!(
        logs.matches("Qonto OAuth grant revoked").count(),
        1,
        "logged once: {logs}"
    );
    for secret in [
        "it-unknown-refresh",
        "it-stale-access",
        world.options.client_secret.as_str(),
    ] {
        assert!(!logs.contains(secret), "a log line holds a secret");
    }
}

fn write_0600(path: &std::path::Path, value: &serde_json::Value) {
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Two workers (two token sources, each with its own lock file handle, as
/// two processes on one machine) racing on one `file:` store: one refresh
/// per generation, none with a used refresh token.
#[tokio::test]
async fn two_workers_racing_on_a_file_store_refresh_once_per_rotation() {
    let world = World::new(Duration::from_secs(3)).await;
    let app = spawn_app(world.app("oauth-file-race", &world.file_store(), true)).await;
    let second = InProcessWorker::start(app.env());
    let n = stream(
        &app,
        "race",
        Duration::from_secs(10),
        Duration::from_millis(100),
    )
    .await;
    all_applied(&app, n).await;
    second.stop().await;
    app.stop_worker().await;
    let stored: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(world.dir.join("qonto-oauth.json")).unwrap())
            .unwrap();
    let generation = stored["generation"].as_u64().unwrap();
    let counts = world.oauth_counts();
    eprintln!("two workers on a file store, {n} approves: generation {generation}, {counts}");
    assert_eq!(world.count("oauth.refreshes"), generation, "{counts}");
    assert_eq!(world.count("oauth.grace_reuses"), 0, "{counts}");
    assert_eq!(world.count("oauth.revocations"), 0, "{counts}");
    assert!(generation >= 3, "{counts}");
}

/// A worker restarted after the 60 s grace of the refresh token it last
/// used (the server's clock moved on 70 s) takes the stored, newer pair:
/// no revocation.
#[tokio::test]
async fn a_restart_after_the_grace_window_uses_the_stored_pair() {
    let world = World::new(Duration::from_secs(3)).await;
    let app = spawn_app(world.app("oauth-restart", &world.file_store(), true)).await;
    let n = stream(
        &app,
        "before",
        Duration::from_secs(5),
        Duration::from_millis(200),
    )
    .await;
    all_applied(&app, n).await;
    app.stop_worker().await;
    let refreshes = world.count("oauth.refreshes");
    assert!(refreshes >= 2, "{}", world.oauth_counts());
    world.options.clock.advance(Duration::from_secs(70));
    // Until the stored access token is expired by the worker's clock too.
    let path = world.dir.join("qonto-oauth.json");
    wait_for("the stored access token to expire", DEADLINE, || async {
        let stored: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).ok()?).ok()?;
        let expires = time::OffsetDateTime::parse(
            stored["access_expires_at"].as_str()?,
            &time::format_description::well_known::Rfc3339,
        )
        .ok()?;
        (expires < time::OffsetDateTime::now_utc()).then_some(())
    })
    .await;
    app.start_worker().await;
    let d = samples::decision("qonto", "approve", "after-grace");
    app.broker.publish(&d).await;
    app.broker.outcome("after-grace", "applied").await;
    app.stop_worker().await;
    let counts = world.oauth_counts();
    eprintln!("restart after the grace window: {counts}");
    assert_eq!(world.count("oauth.revocations"), 0, "{counts}");
    assert_eq!(world.count("oauth.grace_reuses"), 0, "{counts}");
    assert_eq!(world.count("oauth.refreshes"), refreshes + 1, "{counts}");
}
