//! `approval-worker check`: validate the configuration, build every
//! provider, reach the broker and declare the topology. The report goes to
//! stdout; warnings met on the way (a partial credential set) to stderr.

use std::{process::ExitCode, time::Duration};

use crate::{
    broker::{self, Topology},
    providers::Registry,
    settings::Settings,
};

pub async fn run(settings: Settings) -> ExitCode {
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
        settings.worker.connect_timeout.max(Duration::from_secs(1)),
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
