//! `approval-worker demo`: the whole loop on the local broker against the
//! in-process simulator, printed as a table. Nothing to configure.

use std::{
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use lapin::{BasicProperties, options::BasicPublishOptions};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::{
    broker::{self, Topology},
    providers::{REGISTRY, Registry},
    settings::Settings,
    tools::{
        capture,
        signer::Signer,
        sim::{self, QontoOptions, ScaAuto, SimConfig, qonto_oauth, samples},
    },
    worker::Worker,
};

const DEADLINE: Duration = Duration::from_secs(90);

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(
        "RabbitMQ is not reachable at {0}: start it with `docker compose up -d rabbitmq` or `rabbitmq-server -detached`"
    )]
    BrokerUnreachable(String),
    #[error("broker error during the demo: {0}")]
    Broker(#[from] lapin::Error),
    #[error("{0}")]
    Topology(#[from] crate::broker::TopologyError),
    #[error("{0}")]
    Setup(String),
    #[error("timed out: {0} decision(s) did not settle within {1:?}")]
    Timeout(usize, Duration),
}

struct Row {
    decision_id: String,
    provider: String,
    action: String,
    note: &'static str,
    published: Instant,
    events: Vec<(String, u64, Duration)>,
}

pub async fn run(config: Option<&Path>) -> Result<(), DemoError> {
    let base = Settings::load(config).map_err(|e| DemoError::Setup(e.to_string()))?;
    let url = base.amqp_url_redacted();
    let conn = tokio::time::timeout(
        Duration::from_secs(5),
        broker::Nodes::new(&base).connect("approval-worker demo"),
    )
    .await
    .map_err(|_| DemoError::BrokerUnreachable(url.clone()))?
    .map_err(|_| DemoError::BrokerUnreachable(url.clone()))?;

    let prefix = format!("demo-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let oauth = QontoOAuth::new(&prefix)?;
    let sim = sim::start(
        SimConfig::default().with(QontoOptions {
            oauth: oauth.options.clone(),
            ..QontoOptions::default()
        }),
        "127.0.0.1:0".parse().expect("static address"),
    )
    .await
    .map_err(|e| DemoError::Setup(format!("simulator could not start: {e}")))?;
    let signer = Signer::generate();
    let mut vars: Vec<(String, String)> = std::env::vars().collect();
    vars.extend(sim.worker_env());
    vars.extend(oauth.worker_env(&sim.base_url("qonto")));
    vars.push(signer.trusted());
    vars.extend([
        ("APPROVAL_AMQP__PREFIX".to_owned(), prefix.clone()),
        (
            "APPROVAL_RETRY__INITIAL_BACKOFF_MS".to_owned(),
            "200".to_owned(),
        ),
        (
            "APPROVAL_RETRY__MAX_BACKOFF_MS".to_owned(),
            "1000".to_owned(),
        ),
    ]);
    let settings =
        Settings::load_from(config, vars).map_err(|e| DemoError::Setup(e.to_string()))?;
    let registry =
        Registry::from_settings(&settings).map_err(|e| DemoError::Setup(e.to_string()))?;
    let topology = Topology::new(&prefix, settings.amqp.delivery_limit);
    let channel = conn.create_channel().await?;
    topology.declare(&channel).await?;
    let mut events = capture::outcomes(&channel, &topology).await?;

    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(Worker::new(settings, registry, shutdown.clone()).run());

    println!(
        "approval-worker demo: broker {url}, prefix {prefix}, simulator at {}",
        sim.root_url()
    );
    let mut rows = Vec::new();
    let mut publish =
        |body: Vec<u8>, provider: &str, action: &str, id: &str, note: &'static str| {
            rows.push(Row {
                decision_id: id.to_owned(),
                provider: provider.to_owned(),
                action: action.to_owned(),
                note,
                published: Instant::now(),
                events: Vec::new(),
            });
            let channel = channel.clone();
            let exchange = topology.decisions();
            let key = format!("{provider}.{action}");
            let signature = signer.headers(&body);
            async move {
                channel
                    .basic_publish(
                        exchange.into(),
                        key.into(),
                        BasicPublishOptions::default(),
                        &body,
                        BasicProperties::default()
                            .with_content_type("application/json".into())
                            .with_delivery_mode(2)
                            .with_headers(signature),
                    )
                    .await
                    .map(|_| ())
            }
        };
    for &provider in sim::providers() {
        for action in ["approve", "reject"] {
            let id = format!("demo-{provider}-{action}");
            let d = samples::decision(provider, action, &id);
            publish(d.to_string().into_bytes(), provider, action, &id, "").await?;
        }
    }
    // The special cases go to the first unit that offers each: a transient
    // failure where no confirmation step could hold the decision up, a
    // confirmation, a target the worker must refuse.
    let transient = REGISTRY
        .iter()
        .filter(|unit| !unit.sim.confirms())
        .find_map(|unit| {
            let flaky = samples::decision(unit.name, "reject", "demo-transient");
            let key = samples::target_key(&flaky);
            sim.fail_next_for(unit.name, &key, 2, 503)
                .then_some((unit.name, flaky))
        });
    if let Some((provider, flaky)) = transient {
        publish(
            flaky.to_string().into_bytes(),
            provider,
            "reject",
            "demo-transient",
            "2 x 503 first",
        )
        .await?;
    }
    if let Some(unit) = REGISTRY.iter().find(|unit| unit.sim.confirms()) {
        let sca = samples::decision(unit.name, "approve", "demo-sca");
        sim.require_sca(
            &samples::target_key(&sca),
            ScaAuto::Allow {
                after: Duration::from_secs(2),
            },
        );
        publish(
            sca.to_string().into_bytes(),
            unit.name,
            "approve",
            "demo-sca",
            "SCA, allowed after 2 s",
        )
        .await?;
    }
    if let Some(malformed) = samples::malformed("demo-malformed") {
        let provider = malformed["provider"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let action = malformed["action"].as_str().unwrap_or_default().to_owned();
        publish(
            malformed.to_string().into_bytes(),
            &provider,
            &action,
            "demo-malformed",
            "malformed target",
        )
        .await?;
    }

    let total = rows.len();
    let started = Instant::now();
    let mut settled = 0;
    while settled < total {
        let Ok(Some(event)) =
            tokio::time::timeout(DEADLINE.saturating_sub(started.elapsed()), events.recv()).await
        else {
            break;
        };
        let event: Value = serde_json::from_slice(&event).unwrap_or(Value::Null);
        let id = event["decision_id"].as_str().unwrap_or_default();
        let status = event["status"].as_str().unwrap_or_default().to_owned();
        let Some(row) = rows.iter_mut().find(|r| r.decision_id == id) else {
            continue;
        };
        row.events.push((
            status.clone(),
            event["attempts"].as_u64().unwrap_or(0),
            row.published.elapsed(),
        ));
        if status != "awaiting_confirmation" {
            settled += 1;
        }
        print!(
            "\r  {settled}/{total} settled ({:.1} s) ",
            started.elapsed().as_secs_f64()
        );
        let _ = std::io::stdout().flush();
    }
    println!();
    print_table(&rows);
    let stats = sim.stats();
    let doubles = stats.total().double_state_changes;
    println!("simulator: {doubles} double state changes (must be 0)");
    if let Some(qonto) = stats.provider("qonto") {
        println!("{}", oauth.summary(qonto));
    }

    shutdown.cancel();
    let _ = worker.await;
    topology.delete(&channel).await?;
    let _ = conn.close(200, "demo done".into()).await;
    sim.shutdown();
    println!("cleaned up {prefix}.*");
    if settled < total {
        return Err(DemoError::Timeout(total - settled, DEADLINE));
    }
    Ok(())
}

/// Qonto by OAuth, as the contract wants it for approve: the simulator's
/// OAuth server starts with one consented grant, whose refresh token seeds
/// a `file:` token store in a private temporary directory (removed on
/// drop). A build whose settings do not read `..__QONTO__OAUTH__*` ignores
/// these keys and stays on the simulator's API key; the summary says which.
struct QontoOAuth {
    options: qonto_oauth::OAuthOptions,
    seed: String,
    dir: PathBuf,
}

impl QontoOAuth {
    fn new(prefix: &str) -> Result<Self, DemoError> {
        let dir = std::env::temp_dir().join(format!("approval-{prefix}"));
        let setup = |e: std::io::Error| {
            DemoError::Setup(format!("token store directory {}: {e}", dir.display()))
        };
        std::fs::create_dir_all(&dir).map_err(setup)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(setup)?;
        }
        let seed = format!("demo-seed-{}", uuid::Uuid::new_v4().simple());
        let options = qonto_oauth::OAuthOptions {
            seed_refresh_tokens: vec![seed.clone()],
            ..qonto_oauth::OAuthOptions::default()
        };
        Ok(Self { options, seed, dir })
    }

    fn worker_env(&self, qonto_base_url: &str) -> Vec<(String, String)> {
        let key = |name: &str| format!("APPROVAL_PROVIDERS__QONTO__OAUTH__{name}");
        let store = format!("file:{}", self.dir.join("qonto-oauth.json").display());
        let mut env = qonto_oauth::worker_env(qonto_base_url, &self.options);
        env.extend([
            (key("TOKEN_STORE"), store),
            (key("REFRESH_TOKEN"), self.seed.clone()),
        ]);
        env
    }

    /// Which auth Qonto's calls used, read off the OAuth server's counters:
    /// the seeded grant's first refresh is the worker's first token.
    fn summary(&self, qonto: &sim::ProviderStats) -> String {
        let refreshes = qonto.count("oauth.refreshes");
        if refreshes == 0 {
            return "qonto: API key (this build does not read the OAuth settings)".to_owned();
        }
        format!(
            "qonto: OAuth (file: store in {}): {} refresh(es), the first turning the seed into the stored pair; {} grace reuse(s), {} revocation(s) (must be 0), {} call(s) refused 401",
            self.dir.display(),
            refreshes,
            qonto.count("oauth.grace_reuses"),
            qonto.count("oauth.revocations"),
            qonto.count("oauth.api_401s"),
        )
    }
}

impl Drop for QontoOAuth {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<24} {:<10} {:<8} {:<34} {:>8} {:>9}  note",
        "decision", "provider", "action", "status", "attempts", "time"
    );
    for r in rows {
        let status = r
            .events
            .iter()
            .map(|(s, _, _)| s.as_str())
            .collect::<Vec<_>>()
            .join(" -> ");
        let (attempts, time) = r
            .events
            .last()
            .map(|(_, a, t)| (a.to_string(), format!("{} ms", t.as_millis())))
            .unwrap_or_else(|| ("-".into(), "-".into()));
        println!(
            "{:<24} {:<10} {:<8} {:<34} {:>8} {:>9}  {}",
            r.decision_id,
            r.provider,
            r.action,
            if status.is_empty() {
                "(no outcome)"
            } else {
                &status
            },
            attempts,
            time,
            r.note
        );
    }
}
