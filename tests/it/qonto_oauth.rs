//! Qonto OAuth end to end (issue 16): the real broker, real worker
//! processes (the binary, as replicas run it), the simulator's OAuth server
//! (Hydra semantics: rotation, 60 s grace, revocation on late reuse), file
//! and PostgreSQL token stores.
//!
//! The tests print their figures (`cargo test --test it qonto_oauth:: --
//! --nocapture`): refreshes, generations, revocations, grace reuses.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    time::{Duration, Instant},
};

use approval_worker::tools::sim::{
    self, Faults, QontoOptions, SimConfig, SimHandle, qonto_oauth::OAuthOptions, samples,
};
use serde_json::Value;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::helpers::{
    app::{App, TestApp, spawn_app},
    wait::{DEADLINE, wait_for},
    worker::Process,
};

const KEY: &str = "APPROVAL_PROVIDERS__QONTO__OAUTH__";
const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// How long a stream's decisions may take to be applied once published.
const SETTLE: Duration = Duration::from_secs(60);

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
        Self::with_faults(lifetime, Faults::default()).await
    }

    /// The same, Qonto's answers (and, with `include_auth`, its OAuth
    /// server's) meeting `faults`.
    async fn with_faults(lifetime: Duration, faults: Faults) -> Self {
        let seed = format!("it-seed-{}", uuid::Uuid::new_v4().simple());
        let options = OAuthOptions {
            access_token_lifetime: lifetime,
            seed_refresh_tokens: vec![seed.clone()],
            ..OAuthOptions::default()
        };
        let mut config = SimConfig::default().with(QontoOptions {
            oauth: options.clone(),
            ..QontoOptions::default()
        });
        config.faults.insert("qonto".to_owned(), faults);
        let sim = sim::start(config, "127.0.0.1:0".parse().unwrap())
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

    /// An app on this simulator whose Qonto client uses OAuth with `store`;
    /// its processes log JSON, which the tests read.
    fn app(&self, name: &str, store: &Store, seeded: bool) -> App {
        let mut app = App::without_providers(name)
            .env("APPROVAL_LOG__FORMAT", "json")
            .env("APPROVAL_LOG__LEVEL", "info");
        for (k, v) in self.sim.worker_env() {
            app = app.env(&k, v);
        }
        for (k, v) in sim::qonto_oauth::worker_env(&self.sim.base_url("qonto"), &self.options) {
            app = app.env(&k, v);
        }
        app = app.env(&format!("{KEY}TOKEN_STORE"), store.spec());
        if let Store::Postgres { grant, .. } = store {
            app = app.env(&format!("{KEY}GRANT_ID"), grant);
        }
        if seeded {
            app = app.env(&format!("{KEY}REFRESH_TOKEN"), &self.seed);
        }
        app
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

    /// What every test of a healthy chain ends with: the server rotated the
    /// chain exactly `generation` times (the seed's exchange is generation
    /// 1, each refresh one more), never answered a used refresh token, and
    /// never refused a bearer token.
    fn assert_one_refresh_per_rotation(&self, generation: u64) {
        let counts = self.oauth_counts();
        assert_eq!(self.count("oauth.revocations"), 0, "{counts}");
        assert_eq!(self.count("oauth.grace_reuses"), 0, "{counts}");
        assert_eq!(self.count("oauth.invalid_grants"), 0, "{counts}");
        assert_eq!(self.count("oauth.api_401s"), 0, "{counts}");
        assert_eq!(self.count("oauth.refreshes"), generation, "{counts}");
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A token store as the test reads it back (never a token).
#[derive(Debug)]
struct Stored {
    generation: u64,
    issued: OffsetDateTime,
    expires: OffsetDateTime,
    refreshed_by: String,
    revoked: bool,
}

impl Stored {
    /// When a worker with the default `REFRESH_AT` (0.8) refreshes it.
    fn due(&self) -> OffsetDateTime {
        self.issued + (self.expires - self.issued) * 0.8
    }
}

/// The token store the workers of one test share.
enum Store {
    File(PathBuf),
    /// One row of the shared table, under a grant id of this test only;
    /// deleted when the test ends, even on failure.
    Postgres {
        grant: String,
        client: tokio_postgres::Client,
    },
}

impl Store {
    fn file(world: &World) -> Self {
        Self::File(world.dir.join("qonto-oauth.json"))
    }

    async fn postgres() -> Self {
        let (client, connection) =
            tokio_postgres::connect("host=127.0.0.1 user=postgres", tokio_postgres::NoTls)
                .await
                .expect("PostgreSQL must run on 127.0.0.1:5432 (scripts/ensure-postgres)");
        tokio::spawn(connection);
        Self::Postgres {
            grant: format!("it-grant-{}", uuid::Uuid::new_v4().simple()),
            client,
        }
    }

    /// `..__OAUTH__TOKEN_STORE`.
    fn spec(&self) -> String {
        match self {
            Store::File(path) => format!("file:{}", path.display()),
            Store::Postgres { .. } => POSTGRES.to_owned(),
        }
    }

    /// The stored pair's metadata; `None` while the store holds none.
    async fn read(&self) -> Option<Stored> {
        match self {
            Store::File(path) => {
                let v: Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
                let at = |name: &str| {
                    OffsetDateTime::parse(
                        v[name].as_str()?,
                        &time::format_description::well_known::Rfc3339,
                    )
                    .ok()
                };
                Some(Stored {
                    generation: v["generation"].as_u64()?,
                    issued: at("access_issued_at")?,
                    expires: at("access_expires_at")?,
                    refreshed_by: v["refreshed_by"].as_str()?.to_owned(),
                    revoked: !v["revoked_at"].is_null(),
                })
            }
            Store::Postgres { grant, client } => {
                // Before the first worker created the table, it is empty too.
                let row = client
                    .query_opt(
                        "SELECT generation, access_issued_ms, access_expires_ms, refreshed_by, \
                         revoked_ms FROM approval_qonto_oauth WHERE grant_id = $1",
                        &[grant],
                    )
                    .await
                    .ok()??;
                let at = |ms: Option<i64>| {
                    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms?) * 1_000_000).ok()
                };
                Some(Stored {
                    generation: u64::try_from(row.get::<_, i64>(0)).ok()?,
                    issued: at(row.get(1))?,
                    expires: at(row.get(2))?,
                    refreshed_by: row.get::<_, Option<String>>(3).unwrap_or_default(),
                    revoked: row.get::<_, Option<i64>>(4).is_some(),
                })
            }
        }
    }

    /// Waits until the stored generation is past `generation`: a refresh
    /// was just written. Returns the new record; fails at once when the
    /// store records the grant revoked (no generation would follow).
    async fn wait_past(&self, generation: u64) -> Stored {
        let stored = wait_for(
            &format!("a stored generation past {generation}"),
            DEADLINE,
            || async {
                self.read()
                    .await
                    .filter(|s| s.generation > generation || s.revoked)
            },
        )
        .await;
        assert!(!stored.revoked, "the grant was revoked: {stored:?}");
        stored
    }

    /// The stored record, which must be there.
    async fn get(&self) -> Stored {
        self.read().await.expect("the store holds a pair")
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let Store::Postgres { grant, .. } = self else {
            return;
        };
        // Runs on panic too: a failed test must not leave its row behind.
        let grant = grant.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let Ok((client, connection)) =
                    tokio_postgres::connect("host=127.0.0.1 user=postgres", tokio_postgres::NoTls)
                        .await
                else {
                    return;
                };
                tokio::spawn(connection);
                let _ = client
                    .execute(
                        "DELETE FROM approval_qonto_oauth WHERE grant_id = $1",
                        &[&grant],
                    )
                    .await;
            });
        })
        .join();
    }
}

/// A worker process (the real binary) on this app, with an admin port of
/// its own so several run side by side.
fn replica(app: &TestApp) -> Process {
    let bind = format!("127.0.0.1:{}", crate::helpers::app::free_port());
    app.run_with(&["run"], &[("APPROVAL_ADMIN__BIND", &bind)])
}

/// Waits until `n` consumers take the decisions queue.
async fn wait_consumers(app: &TestApp, n: u32) {
    let queue = app.broker.topology.decisions();
    wait_for(&format!("{n} consumers"), DEADLINE, || async {
        (app.broker.queue_counts(&queue).await.1 >= n).then_some(())
    })
    .await;
}

/// Stops a process gracefully; it must exit 0.
async fn stop(mut p: Process) -> Process {
    p.signal(libc::SIGTERM);
    let status = p.wait(DEADLINE).await;
    assert!(status.success(), "{status}: {}", p.output());
    p
}

/// Kills a process at once, as a crash or an OOM kill would.
async fn kill(mut p: Process) -> Process {
    p.signal(libc::SIGKILL);
    p.wait(DEADLINE).await;
    p
}

/// The generations `p` refreshed (or seeded) itself, by its log, each with
/// when it said so.
fn refreshes_logged(p: &Process) -> Vec<(u64, OffsetDateTime)> {
    p.json_lines()
        .iter()
        .filter(|l| l["message"] == "Qonto OAuth token pair refreshed")
        .filter_map(|l| {
            let at = OffsetDateTime::parse(
                l["timestamp"].as_str()?,
                &time::format_description::well_known::Rfc3339,
            )
            .ok()?;
            Some((l["generation"].as_u64()?, at))
        })
        .collect()
}

fn refreshed(p: &Process) -> Vec<u64> {
    refreshes_logged(p).into_iter().map(|(g, _)| g).collect()
}

/// Waits until `p` logged its refresh of `generation` (after writing it).
async fn wait_refreshed(p: &Process, generation: u64) {
    wait_for(
        &format!("the refresh of generation {generation} in the log"),
        DEADLINE,
        || async { refreshed(p).contains(&generation).then_some(()) },
    )
    .await;
}

/// The decisions `p` applied, by its log.
fn applied(p: &Process) -> BTreeSet<String> {
    p.json_lines()
        .iter()
        .filter(|l| l["message"] == "applied")
        .filter_map(|l| l["span"]["decision_id"].as_str().map(str::to_owned))
        .collect()
}

/// One refresh per rotation, whoever made it: every generation from 1 to
/// `generation` was written by exactly one of `processes`, and none before
/// the pair it replaced had fallen due (0.8 of `lifetime` after the one
/// before; a second refresh of the same rotation, even with the newest
/// refresh token, would come at once).
fn assert_each_generation_once(processes: &[&Process], generation: u64, lifetime: Duration) {
    let mut all: Vec<(u64, OffsetDateTime)> =
        processes.iter().flat_map(|p| refreshes_logged(p)).collect();
    all.sort_unstable();
    let per_process: Vec<Vec<u64>> = processes.iter().map(|p| refreshed(p)).collect();
    assert_eq!(
        all.iter().map(|(g, _)| *g).collect::<Vec<_>>(),
        (1..=generation).collect::<Vec<_>>(),
        "generations refreshed per process: {per_process:?}"
    );
    // The log's time is taken a moment after the pair's issue time; the
    // slack covers that moment, far less than a rotation.
    let least = lifetime.mul_f64(0.8) - Duration::from_millis(500);
    for pair in all.windows(2) {
        let gap = pair[1].1 - pair[0].1;
        assert!(
            gap >= least,
            "generation {} came {gap} after {}, before the pair fell due",
            pair[1].0,
            pair[0].0
        );
    }
}

/// Publishes one Qonto approve every `every` until `stop`; returns their
/// decision ids.
async fn publish_until(
    app: &TestApp,
    tag: &str,
    every: Duration,
    stop: &CancellationToken,
) -> Vec<String> {
    let mut ids = Vec::new();
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return ids,
            _ = tick.tick() => {}
        }
        let id = format!("{tag}-{}", ids.len());
        app.broker
            .publish(&samples::decision("qonto", "approve", &id))
            .await;
        ids.push(id);
    }
}

/// Publishes one Qonto approve every `every` for `span`.
async fn publish_for(app: &TestApp, tag: &str, span: Duration, every: Duration) -> Vec<String> {
    let stop = CancellationToken::new();
    let (ids, ()) = tokio::join!(publish_until(app, tag, every, &stop), async {
        tokio::time::sleep(span).await; // the stream's length, not a synchronisation
        stop.cancel();
    });
    ids
}

/// Waits until each of `ids` is applied (`already_applied` counts: a
/// decision whose call landed just before a SIGKILL comes back once more),
/// then checks no other outcome came for them and Qonto decided each
/// target exactly once.
async fn all_applied(app: &TestApp, ids: &[String]) {
    let wanted: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
    wait_for(
        &format!("{} decisions applied", ids.len()),
        SETTLE,
        || async {
            let done: BTreeSet<String> = app
                .broker
                .outcomes()
                .iter()
                .filter(|o| matches!(o.status(), "applied" | "already_applied"))
                .map(|o| o.decision_id().to_owned())
                .collect();
            wanted.iter().all(|id| done.contains(*id)).then_some(())
        },
    )
    .await;
    let other: Vec<_> = app
        .broker
        .outcomes()
        .into_iter()
        .filter(|o| wanted.contains(o.decision_id()))
        .filter(|o| !matches!(o.status(), "applied" | "already_applied"))
        .collect();
    assert!(other.is_empty(), "{other:#?}");
}

fn assert_decided_once(world: &World, n: usize) {
    let qonto = world.sim.stats().provider("qonto").unwrap().clone();
    assert_eq!(qonto.state_changes, n as u64, "{qonto:?}");
    assert_eq!(qonto.double_state_changes, 0, "{qonto:?}");
    assert_eq!(qonto.conflicting_keys, 0, "{qonto:?}");
}

/// Access tokens of 3 s: a stream of approves over 30 s, to one worker
/// process on a `file:` store, is all applied across several refreshes,
/// with no revocation and no 401.
#[tokio::test]
async fn short_lived_tokens_a_stream_of_approves_is_all_applied_without_revocation() {
    let started = Instant::now();
    let world = World::new(Duration::from_secs(3)).await;
    let store = Store::file(&world);
    let app = spawn_app(world.app("oauth-stream", &store, true).without_worker()).await;
    let worker = replica(&app);
    app.broker.wait_consumer().await;
    let ids = publish_for(
        &app,
        "stream",
        Duration::from_secs(30),
        Duration::from_millis(250),
    )
    .await;
    all_applied(&app, &ids).await;
    let worker = stop(worker).await;
    let generation = store.get().await.generation;
    eprintln!(
        "short-lived tokens, one process, {} approves: generation {generation}, {}, {:.1} s",
        ids.len(),
        world.oauth_counts(),
        started.elapsed().as_secs_f64()
    );
    world.assert_one_refresh_per_rotation(generation);
    assert_each_generation_once(&[&worker], generation, Duration::from_secs(3));
    assert!(generation >= 10, "{}", world.oauth_counts());
    assert_decided_once(&world, ids.len());
}

/// Two worker processes, each its own token source, sharing one
/// `postgres://` store under load (both seeded, started together): every
/// approve is applied, split over both; no revocation, no refresh token
/// used twice, and each generation was refreshed by exactly one of them.
#[tokio::test]
async fn two_processes_sharing_a_postgres_store_under_load_refresh_once_per_rotation() {
    let started = Instant::now();
    // Some latency keeps several calls of each process in flight when its
    // token falls due, and the refresh holding the lock while the other
    // process comes for it.
    let faults = Faults {
        latency_ms: 50,
        include_auth: true,
        ..Faults::default()
    };
    let world = World::with_faults(Duration::from_secs(3), faults).await;
    let store = Store::postgres().await;
    let app = spawn_app(world.app("oauth-pg", &store, true).without_worker()).await;
    let (a, b) = (replica(&app), replica(&app));
    wait_consumers(&app, 2).await;
    let ids = publish_for(
        &app,
        "pg",
        Duration::from_secs(20),
        Duration::from_millis(20),
    )
    .await;
    all_applied(&app, &ids).await;
    let (a, b) = (stop(a).await, stop(b).await);
    let stored = store.get().await;
    let generation = stored.generation;
    let (by_a, by_b) = (applied(&a), applied(&b));
    eprintln!(
        "two processes on postgres, {} approves ({} by A, {} by B): generation {generation} \
         (A refreshed {:?}, B {:?}), {}, {:.1} s",
        ids.len(),
        by_a.len(),
        by_b.len(),
        refreshed(&a),
        refreshed(&b),
        world.oauth_counts(),
        started.elapsed().as_secs_f64()
    );
    assert!(!stored.revoked);
    world.assert_one_refresh_per_rotation(generation);
    assert_each_generation_once(&[&a, &b], generation, Duration::from_secs(3));
    assert!(generation >= 6, "{}", world.oauth_counts());
    assert!(
        !by_a.is_empty() && !by_b.is_empty(),
        "the stream is split over both"
    );
    assert_decided_once(&world, ids.len());
}

/// Two worker processes on one machine sharing a `file:` store race for the
/// same expiring token: each round waits until the stored token is due
/// (so both processes' cached copies are), then sends a burst that both
/// take a part of, while the OAuth server answers slowly (the winner holds
/// the lock for a while). Each round is one refresh, the first one the
/// seeding of the empty store.
#[tokio::test]
async fn two_processes_racing_on_a_file_store_refresh_once() {
    let started = Instant::now();
    let faults = Faults {
        latency_ms: 200,
        include_auth: true,
        ..Faults::default()
    };
    let world = World::with_faults(Duration::from_secs(4), faults).await;
    let store = Store::file(&world);
    let app = spawn_app(world.app("oauth-file-race", &store, true).without_worker()).await;
    let (a, b) = (replica(&app), replica(&app));
    wait_consumers(&app, 2).await;
    let rounds = 4;
    let mut all = Vec::new();
    for round in 0..rounds {
        if round > 0 {
            let due = store.get().await.due();
            wait_for("the stored token to fall due", DEADLINE, || async {
                (OffsetDateTime::now_utc() > due).then_some(())
            })
            .await;
        }
        let burst: Vec<String> = (0..10).map(|i| format!("race-{round}-{i}")).collect();
        for id in &burst {
            app.broker
                .publish(&samples::decision("qonto", "approve", id))
                .await;
        }
        all_applied(&app, &burst).await;
        let stored = store.get().await;
        let counts = world.oauth_counts();
        assert_eq!(stored.generation, round + 1, "round {round}: {counts}");
        assert_eq!(world.count("oauth.refreshes"), round + 1, "{counts}");
        let (by_a, by_b) = (applied(&a), applied(&b));
        assert!(
            burst.iter().any(|id| by_a.contains(id)) && burst.iter().any(|id| by_b.contains(id)),
            "round {round}: both processes needed the due token"
        );
        all.extend(burst);
    }
    let (a, b) = (stop(a).await, stop(b).await);
    let generation = store.get().await.generation;
    eprintln!(
        "two processes racing on a file store, {rounds} rounds of 10: generation {generation} \
         (A refreshed {:?}, B {:?}), {}, {:.1} s",
        refreshed(&a),
        refreshed(&b),
        world.oauth_counts(),
        started.elapsed().as_secs_f64()
    );
    world.assert_one_refresh_per_rotation(generation);
    assert_each_generation_once(&[&a, &b], generation, Duration::from_secs(4));
    assert_decided_once(&world, all.len());
}

/// A worker process SIGKILLed mid-run (approves still flowing) and started
/// again on the same store, twice: once within the 60 s grace of the
/// refresh token it last used (killed right after a refresh), once after
/// it (the OAuth server's clock moved 70 s on). Each new process takes the
/// stored pair, never the seed still configured nor a used refresh token:
/// no grace reuse, no revocation, every approve applied once.
async fn killed_mid_run_restarts_on_the_stored_pair(name: &str, postgres: bool) {
    const LIFETIME: Duration = Duration::from_secs(3);
    let started = Instant::now();
    let world = World::new(LIFETIME).await;
    let store = if postgres {
        Store::postgres().await
    } else {
        Store::file(&world)
    };
    let app = spawn_app(world.app(name, &store, true).without_worker()).await;
    let stop_publishing = CancellationToken::new();
    let publishing = publish_until(&app, name, Duration::from_millis(100), &stop_publishing);
    let control = async {
        let first = replica(&app);
        // Past the seeding and one refresh of its own, then right after the next.
        let seen = store.wait_past(1).await.generation;
        let within = store.wait_past(seen).await.generation;
        wait_refreshed(&first, within).await;
        let first = kill(first).await;
        let second = replica(&app);
        let second_from = store.wait_past(within).await.generation;
        let after = store.wait_past(second_from).await.generation;
        wait_refreshed(&second, after).await;
        let second = kill(second).await;
        world.options.clock.advance(Duration::from_secs(70));
        // The server's clock moved on but the worker's did not: the stored
        // access token, expired for the server now, must be expired for
        // the worker too, or it would spend it on a 401 (with an hour-long
        // token the two expire together).
        let expires = store.get().await.expires;
        wait_for("the stored access token to expire", DEADLINE, || async {
            (OffsetDateTime::now_utc() > expires).then_some(())
        })
        .await;
        let third = replica(&app);
        let third_from = store.wait_past(after).await.generation;
        store.wait_past(third_from).await;
        stop_publishing.cancel();
        (first, second, third, within, after)
    };
    let (ids, (first, second, third, within, after)) = tokio::join!(publishing, control);
    all_applied(&app, &ids).await;
    let third = stop(third).await;
    let stored = store.get().await;
    let generation = stored.generation;
    eprintln!(
        "{name}: {} approves, killed at generations {within} (within the grace) and {after} \
         (then 70 s on): generation {generation} (refreshed {:?}, {:?}, {:?}; last by {}), {}, \
         {:.1} s",
        ids.len(),
        refreshed(&first),
        refreshed(&second),
        refreshed(&third),
        stored.refreshed_by,
        world.oauth_counts(),
        started.elapsed().as_secs_f64()
    );
    assert!(!stored.revoked);
    world.assert_one_refresh_per_rotation(generation);
    assert_each_generation_once(&[&first, &second, &third], generation, LIFETIME);
    assert!(
        refreshed(&second).iter().all(|g| *g > within)
            && refreshed(&third).iter().all(|g| *g > after),
        "a restarted process starts from the stored generation"
    );
    assert_decided_once(&world, ids.len());
}

#[tokio::test]
async fn a_process_killed_mid_run_restarts_on_a_file_store_within_and_after_the_grace() {
    killed_mid_run_restarts_on_the_stored_pair("oauth-kill-file", false).await;
}

#[tokio::test]
async fn a_process_killed_mid_run_restarts_on_a_postgres_store_within_and_after_the_grace() {
    killed_mid_run_restarts_on_the_stored_pair("oauth-kill-pg", true).await;
}

/// A revoked grant: Qonto decisions are held (not parked, no call to
/// Qonto), `/readyz` names the problem, FlexPay is unaffected; then
/// `qonto-oauth login` end to end heals the running worker, the held
/// decisions are applied, and `status` shows the new generation without
/// any secret.
#[tokio::test]
async fn a_revoked_grant_holds_qonto_until_a_login_heals_it() {
    let started = Instant::now();
    let world = World::new(Duration::from_secs(3600)).await;
    let redirect = format!(
        "http://127.0.0.1:{}/callback",
        crate::helpers::app::free_port()
    );
    let app = spawn_app(
        world
            .app("oauth-revoked", &Store::file(&world), false)
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
    crate::helpers::qonto::write_token_file(&path, &stale);

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
    // `/status` agrees with `/readyz`, and says why.
    let status: serde_json::Value = reqwest::get(format!("{}/status", app.admin_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["ready"], false, "{status}");
    let problems = status["provider_problems"].to_string();
    assert!(problems.contains("revoked"), "{status}");
    assert!(!problems.contains("it-unknown-refresh"), "{status}");
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
    eprintln!(
        "revoked grant healed by a login: generation 2, {} oauth.code_exchanges={}, {:.1} s",
        world.oauth_counts(),
        world.count("oauth.code_exchanges"),
        started.elapsed().as_secs_f64()
    );
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
