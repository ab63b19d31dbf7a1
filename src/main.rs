//! The `approval-worker` binary: parses the command line, loads the
//! settings, installs logging and hands over to the command.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use approval_worker::{
    commands::{check, dead_letters, qonto_oauth, run, sign, simulate},
    settings::Settings,
    telemetry,
    tools::{bench, demo},
};

/// Every decision spawns tasks (ours, and lapin's per acknowledgement) whose
/// cache-line-aligned allocations glibc serves through `posix_memalign`,
/// splitting and consolidating its bins, a large share of the worker's CPU.
/// mimalloc serves them from size classes; its `no_thp` build keeps
/// transparent huge pages from inflating the resident set. Figures: the
/// README's Performance section.
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
    Simulate(simulate::Args),
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
        /// How decisions are signed (and verified by the worker).
        #[arg(long, value_enum, default_value = "ed25519")]
        auth: bench::BenchAuth,
        /// Then drain this many Qonto decisions (20000 when no number is
        /// given) against the simulator enforcing Qonto's quota
        /// (1000/10s,10000/10m), with the worker's default Qonto limit:
        /// takes at least 11.5 minutes at 20000.
        #[arg(long, value_name = "DECISIONS", num_args = 0..=1, default_missing_value = "20000")]
        qonto_quota: Option<usize>,
        /// Then measure the worker with unsigned, HMAC-signed and
        /// Ed25519-signed decisions in turn, rounds interleaved, and report
        /// each mode's throughput as a share of unsigned.
        #[arg(long)]
        compare_auth: bool,
    },
    /// Print the signature headers (webhook-id, -timestamp, -signature) for a decision body on stdin.
    Sign(sign::Args),
    /// Inspect or replay the parking lot (P.dead).
    #[command(subcommand)]
    DeadLetters(dead_letters::DeadLetters),
    /// Qonto OAuth: log in once (authorization-code flow) or show the token store's state.
    #[command(subcommand, name = "qonto-oauth")]
    QontoOAuth(qonto_oauth::QontoOAuth),
}

impl Command {
    /// `log.level` is the worker's. The other commands print a report on
    /// stdout and log on stderr only what needs attention; the demo only
    /// errors, as its worker's warnings are the failures it provokes on
    /// purpose. Their report names any broker failure, so lapin's
    /// "Connection error" line would only repeat it (and lapin also logs one
    /// when a connection closes with channels open). `RUST_LOG` overrides.
    fn log_level<'a>(&self, settings: &'a Settings) -> &'a str {
        match self {
            Command::Run => &settings.log.level,
            Command::Demo => "error,lapin::channels=off",
            _ => "warn,lapin::channels=off",
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
    telemetry::init(cli.command.log_level(&settings), settings.log.format);
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
            Command::Run => run::run(settings).await,
            Command::Check => check::run(settings).await,
            Command::DeadLetters(cmd) => dead_letters::run(settings, cmd).await,
            Command::QontoOAuth(cmd) => qonto_oauth::run(settings, cmd).await,
            Command::Simulate(args) => simulate::run(args).await,
            Command::Sign(args) => sign::run(args),
            Command::Bench {
                decisions,
                provider_latency_ms,
                providers,
                prefetch,
                rounds,
                auth,
                qonto_quota,
                compare_auth,
            } => {
                let options = bench::BenchOptions {
                    decisions,
                    providers,
                    provider_latency_ms,
                    prefetch,
                    rounds,
                    auth,
                    qonto_quota,
                    compare_auth,
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
