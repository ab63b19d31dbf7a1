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
}

pub async fn run(args: Args) -> ExitCode {
    let bind = SocketAddr::new(args.host, args.port);
    let handle = match sim::start(sim::SimConfig::default(), bind).await {
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
