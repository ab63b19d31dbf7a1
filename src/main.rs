//! The `approval-worker` binary: parses the command line and wires the parts.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use approval_worker::{
    admin, bench,
    broker::{self, Topology},
    deadletters, demo,
    providers::Registry,
    settings::Settings,
    sim, telemetry,
    worker::Worker,
};

/// Every decision spawns tasks (ours, and lapin's per acknowledgement) whose
/// cache-line-aligned allocations glibc serves through `posix_memalign`,
/// splitting and consolidating its bins: a quarter of the worker's CPU went
/// to glibc malloc. mimalloc serves them from size classes (about 20 % less
/// CPU per decision in `bench`); its `no_thp` build keeps transparent huge
/// pages from inflating the resident set.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "approval-worker",
    version,
    about = "Applies review decisions from RabbitMQ at payment providers and publishes outcome events"
)]
struct Cli {
    /// A configuration file layered over config/default.toml (env vars still win).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker until SIGTERM/SIGINT.
    Run,
    /// Validate configuration and reach the broker.
    Check,
    /// Serve a stateful simulator of all five provider APIs.
    Simulate {
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Address to listen on (0.0.0.0 in a container).
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
    },
    /// Run the whole loop on the local broker against the in-process simulator.
    Demo,
    /// Measure throughput, latency and memory beside the broker's ceiling; prints one JSON line.
    Bench {
        #[arg(long, default_value_t = 20_000)]
        decisions: usize,
        #[arg(long, default_value_t = 50)]
        provider_latency_ms: u64,
        /// Spread decisions over these providers (comma-separated; default all five).
        #[arg(long, value_delimiter = ',')]
        providers: Vec<String>,
        /// Prefetch for both the ceiling loop and the worker (default: APPROVAL_AMQP__PREFETCH).
        #[arg(long)]
        prefetch: Option<u16>,
        /// Rounds of ceiling, worker and latency phases; figures are medians.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Inspect or replay the parking lot (P.dead).
    #[command(subcommand)]
    DeadLetters(DeadLetters),
}

#[derive(Subcommand)]
enum DeadLetters {
    /// Print parked decisions with their error kind, reason and attempts, without removing them.
    List(FilterArgs),
    /// Move parked decisions back to P.decisions with fresh attempt counters.
    Replay(FilterArgs),
}

#[derive(clap::Args)]
struct FilterArgs {
    /// At most this many messages.
    #[arg(long)]
    limit: Option<usize>,
    /// Only this provider's decisions.
    #[arg(long)]
    provider: Option<String>,
    /// Only this error kind (invalid, provider_disabled, exhausted, ...).
    #[arg(long)]
    kind: Option<String>,
}

impl From<FilterArgs> for deadletters::Filter {
    fn from(a: FilterArgs) -> Self {
        Self {
            limit: a.limit,
            provider: a.provider,
            kind: a.kind,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("approval-worker: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("approval-worker: could not start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Run => run(settings).await,
            Command::Check => check(settings).await,
            Command::DeadLetters(cmd) => dead_letters(settings, cmd).await,
            Command::Simulate { port, host } => simulate(host, port).await,
            Command::Bench {
                decisions,
                provider_latency_ms,
                providers,
                prefetch,
                rounds,
            } => {
                let options = bench::BenchOptions {
                    decisions,
                    providers,
                    provider_latency_ms,
                    prefetch,
                    rounds,
                };
                match bench::run(cli.config.as_deref(), options).await {
                    Ok(figures) => {
                        println!("{figures}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("bench: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Command::Demo => match demo::run(cli.config.as_deref()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("demo: {e}");
                    ExitCode::FAILURE
                }
            },
        }
    })
}

async fn run(settings: Settings) -> ExitCode {
    telemetry::init(&settings.log);
    let registry = match Registry::from_settings(&settings) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "configuration rejected");
            eprintln!("approval-worker: {e}");
            return ExitCode::from(2);
        }
    };
    for (name, enabled) in registry.names() {
        tracing::info!(provider = name, enabled, "provider");
    }
    let admin = match tokio::net::TcpListener::bind(&settings.admin.bind).await {
        Ok(l) => l,
        Err(e) => {
            let bind = &settings.admin.bind;
            tracing::error!(error = %e, bind, "admin endpoint cannot listen");
            eprintln!("approval-worker: APPROVAL_ADMIN__BIND={bind} cannot be bound: {e}");
            return ExitCode::from(2);
        }
    };
    admin::metrics_handle();
    let shutdown = CancellationToken::new();
    if let Err(e) = signals(shutdown.clone()) {
        eprintln!("approval-worker: could not install signal handlers: {e}");
        return ExitCode::FAILURE;
    }
    tracing::info!(bind = %settings.admin.bind, "admin endpoint: /healthz /readyz /metrics");
    let worker = Worker::new(settings, registry, shutdown);
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(admin::serve(admin, worker.health(), admin_stop.clone()));
    // On a runtime thread, not the one blocked in `block_on`: each delivery
    // task is then spawned onto the thread that received it, instead of
    // through the global queue with a wake-up of another thread.
    let outcome = tokio::spawn(worker.run()).await;
    admin_stop.cancel();
    let _ = admin_task.await;
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "the worker task failed");
            eprintln!("approval-worker: the worker task failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One cancellation signal for the whole process. Handlers are installed
/// before this returns, so a SIGTERM right after start is not lost.
fn signals(shutdown: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        shutdown.cancel();
    });
    Ok(())
}

async fn check(settings: Settings) -> ExitCode {
    let registry = match Registry::from_settings(&settings) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("check failed: {e}");
            return ExitCode::from(2);
        }
    };
    println!("configuration: ok");
    for (name, enabled) in registry.names() {
        println!(
            "provider {name}: {}",
            if enabled {
                "enabled"
            } else {
                "disabled (no credentials; its decisions are parked)"
            }
        );
    }
    let url = settings.amqp_url_redacted();
    let conn = match tokio::time::timeout(
        std::time::Duration::from_millis(settings.worker.connect_timeout_ms.max(1000)),
        broker::connect(&settings.amqp.url, "approval-worker check"),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            eprintln!("check failed: broker {url} is not reachable: {e}");
            return ExitCode::FAILURE;
        }
        Err(_) => {
            eprintln!("check failed: broker {url} did not answer in time");
            return ExitCode::FAILURE;
        }
    };
    let topology = Topology::new(&settings.amqp.prefix, settings.amqp.delivery_limit);
    let result = async {
        let ch = conn.create_channel().await?;
        topology.declare(&ch).await
    }
    .await;
    let _ = conn.close(200, "check done".into()).await;
    match result {
        Ok(()) => {
            println!(
                "broker {url}: ok (topology {}.* declared)",
                topology.prefix()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("check failed: topology could not be declared on {url}: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn dead_letters(settings: Settings, cmd: DeadLetters) -> ExitCode {
    let (filter, replay): (deadletters::Filter, bool) = match cmd {
        DeadLetters::List(args) => (args.into(), false),
        DeadLetters::Replay(args) => (args.into(), true),
    };
    let url = settings.amqp_url_redacted();
    let conn = match broker::connect(&settings.amqp.url, "approval-worker dead-letters").await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dead-letters: broker {url} is not reachable: {e}");
            return ExitCode::FAILURE;
        }
    };
    let topology = Topology::new(&settings.amqp.prefix, settings.amqp.delivery_limit);
    let result = async {
        let channel = conn.create_channel().await?;
        topology.declare(&channel).await?;
        if replay {
            let publisher = broker::Publisher::new(conn.create_channel().await?).await?;
            deadletters::replay(&channel, &publisher, &topology, &filter).await
        } else {
            deadletters::list(&channel, &topology, &filter).await
        }
    }
    .await;
    let _ = conn.close(200, "dead-letters done".into()).await;
    match result {
        Ok(items) => {
            for s in &items {
                println!(
                    "{}\t{}\t{}\tkind={}\tattempts={}\tfirst_received_at={}\treason={}",
                    s.decision_id.as_deref().unwrap_or("-"),
                    s.provider.as_deref().unwrap_or("-"),
                    s.action.as_deref().unwrap_or("-"),
                    s.kind,
                    s.attempts,
                    s.first_received_at.as_deref().unwrap_or("-"),
                    s.reason,
                );
            }
            let verb = if replay { "replayed to" } else { "parked in" };
            println!(
                "{} decision(s) {verb} {}",
                items.len(),
                if replay {
                    topology.decisions()
                } else {
                    topology.dead()
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dead-letters: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn simulate(host: std::net::IpAddr, port: u16) -> ExitCode {
    let bind = std::net::SocketAddr::new(host, port);
    let config = sim::SimConfig::default();
    let handle = match sim::start(config, bind).await {
        Ok(h) => h,
        Err(e) => {
            eprintln!("simulate: cannot listen on {bind}: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "provider simulator on {} (stats: {}/_sim/stats)",
        handle.root_url(),
        handle.root_url()
    );
    println!("point a worker at it with:");
    for (k, v) in handle.worker_env() {
        if v.contains('\n') {
            // The PEM spans lines; its hex form is one line the loader accepts.
            let hex: String = v.bytes().map(|b| format!("{b:02x}")).collect();
            println!("  {k}={hex}");
        } else {
            println!("  {k}={v}");
        }
    }
    let stop = CancellationToken::new();
    if signals(stop.clone()).is_ok() {
        stop.cancelled().await;
    }
    handle.shutdown();
    ExitCode::SUCCESS
}
