//! `approval-worker simulate`: the provider simulator as a server, with the
//! environment a worker needs to use it.

use std::{
    net::{IpAddr, SocketAddr},
    process::ExitCode,
    time::Duration,
};

use tokio_util::sync::CancellationToken;

use crate::{
    shutdown,
    tools::sim::{self, QontoOptions, qonto_oauth},
};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Address to listen on (0.0.0.0 in a container).
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// A provider's quota, enforced with its rate-limit answer and
    /// Retry-After: PROVIDER=N/<duration>[,N/<duration>...], e.g.
    /// qonto=1000/10s,10000/10m (Qonto's documented one). Repeatable; also
    /// set at runtime with PUT /_sim/quota/{provider}.
    #[arg(long = "quota", value_name = "PROVIDER=WINDOWS")]
    quotas: Vec<String>,
    /// The OAuth client Qonto's simulated OAuth server knows.
    #[arg(
        long,
        env = "SIM_QONTO_OAUTH_CLIENT_ID",
        default_value = "sim-qonto-client"
    )]
    oauth_client_id: String,
    #[arg(
        long,
        env = "SIM_QONTO_OAUTH_CLIENT_SECRET",
        default_value = "sim-qonto-client-secret",
        hide_env_values = true
    )]
    oauth_client_secret: String,
    /// Seconds an issued access token lives (`expires_in`; at least 1).
    #[arg(long, env = "SIM_QONTO_OAUTH_TOKEN_LIFETIME_S", default_value_t = 3600)]
    oauth_token_lifetime_s: u64,
    /// Seconds a used refresh token still answers after its first use; a
    /// later use revokes its grant.
    #[arg(long, env = "SIM_QONTO_OAUTH_GRACE_S", default_value_t = 60)]
    oauth_grace_s: u64,
    /// A refresh token of a grant consented at start, to seed a worker's
    /// token store without a browser; repeat it (or comma-separate it) for
    /// independent grants.
    #[arg(
        long,
        env = "SIM_QONTO_OAUTH_SEED_REFRESH_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    oauth_seed_refresh_token: Vec<String>,
    /// Makes Qonto's API and OAuth server require this
    /// `X-Qonto-Staging-Token`, like the sandbox.
    #[arg(long, env = "SIM_QONTO_STAGING_TOKEN", hide_env_values = true)]
    qonto_staging_token: Option<String>,
}

/// `PROVIDER=WINDOWS` into the simulator's configuration.
fn quotas(specs: &[String]) -> Result<sim::SimConfig, String> {
    let mut config = sim::SimConfig::default();
    for spec in specs {
        let (provider, windows) = spec
            .split_once('=')
            .ok_or_else(|| format!("--quota {spec:?}: expected PROVIDER=N/<duration>,..."))?;
        let provider = provider.trim().replace('-', "_");
        if !sim::providers().contains(&provider.as_str()) {
            return Err(format!(
                "--quota: unknown provider {provider:?}; use one of {}",
                sim::providers().join(", ")
            ));
        }
        let quota: sim::Quota = windows
            .parse()
            .map_err(|e| format!("--quota {provider}: {e}"))?;
        config.quotas.insert(provider, quota);
    }
    Ok(config)
}

impl Args {
    fn qonto(&self) -> QontoOptions {
        QontoOptions {
            staging_token: self.qonto_staging_token.clone(),
            oauth: qonto_oauth::OAuthOptions {
                client_id: self.oauth_client_id.clone(),
                client_secret: self.oauth_client_secret.clone(),
                access_token_lifetime: Duration::from_secs(self.oauth_token_lifetime_s),
                grace_period: Duration::from_secs(self.oauth_grace_s),
                seed_refresh_tokens: self.oauth_seed_refresh_token.clone(),
                ..qonto_oauth::OAuthOptions::default()
            },
            ..QontoOptions::default()
        }
    }
}

pub async fn run(args: Args) -> ExitCode {
    let bind = SocketAddr::new(args.host, args.port);
    let config = match quotas(&args.quotas) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("simulate: {e}");
            return ExitCode::from(2);
        }
    };
    let quotas = config.quotas.clone();
    let qonto = args.qonto();
    let config = config.with(qonto.clone());
    let handle = match sim::start(config, bind).await {
        Ok(h) => h,
        Err(e) => {
            eprintln!("simulate: cannot serve on {bind}: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "provider simulator on {} (stats: {}/_sim/stats)",
        handle.root_url(),
        handle.root_url()
    );
    for (provider, quota) in &quotas {
        println!("{provider}: quota {quota}");
    }
    println!("point a worker at it with:");
    for (k, v) in handle.worker_env() {
        print_var(&k, &v);
    }
    println!("Qonto by OAuth instead (its OAuth server; add a token store):");
    for (k, v) in qonto_oauth::worker_env(&handle.base_url("qonto"), &qonto.oauth) {
        print_var(&k, &v);
    }
    if let Some(seed) = qonto.oauth.seed_refresh_tokens.first() {
        print_var("APPROVAL_PROVIDERS__QONTO__OAUTH__REFRESH_TOKEN", seed);
    }
    let stop = CancellationToken::new();
    if shutdown::cancel_on_signal(stop.clone()).is_ok() {
        stop.cancelled().await;
    }
    handle.shutdown();
    ExitCode::SUCCESS
}

fn print_var(key: &str, value: &str) {
    if value.contains('\n') {
        // The PEM spans lines; its hex form is one line the loader accepts.
        println!("  {key}={}", hex::encode(value));
    } else {
        println!("  {key}={value}");
    }
}
