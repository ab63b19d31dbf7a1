//! `approval-worker simulate`: the provider simulator as a server, with the
//! environment a worker needs to use it.

use std::{
    net::{IpAddr, SocketAddr},
    process::ExitCode,
};

use tokio_util::sync::CancellationToken;

use crate::{shutdown, tools::sim};

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
    for (provider, quota) in &quotas {
        println!("{provider}: quota {quota}");
    }
    println!("point a worker at it with:");
    for (k, v) in handle.worker_env() {
        if v.contains('\n') {
            // The PEM spans lines; its hex form is one line the loader accepts.
            println!("  {k}={}", hex::encode(v));
        } else {
            println!("  {k}={v}");
        }
    }
    let stop = CancellationToken::new();
    if shutdown::cancel_on_signal(stop.clone()).is_ok() {
        stop.cancelled().await;
    }
    handle.shutdown();
    ExitCode::SUCCESS
}
