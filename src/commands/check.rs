//! `approval-worker check`: validate the configuration, build every
//! provider, reach every broker node, declare the topology there and make
//! sure the worker may publish everywhere it must. The report goes to
//! stdout; warnings met on the way (a partial credential set) and problems
//! to stderr.

use std::process::ExitCode;

use crate::{
    broker::{Nodes, Topology, probe},
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
    let mut problems = Vec::new();
    match crate::providers::qonto::oauth_config(&settings.providers) {
        Ok(Some(config)) => match crate::commands::qonto_oauth::check_store(&config).await {
            Ok(line) => println!("{line}"),
            Err(problem) => problems.push(problem),
        },
        Ok(None) => {}
        Err(e) => problems.push(e.to_string()),
    }
    let (verdict, warnings) = settings.auth_report();
    for warning in warnings {
        eprintln!("warning: {warning}");
    }
    match verdict {
        Ok(()) => println!(
            "authenticity: {} ({} trusted key(s))",
            settings.auth.mode.as_str(),
            settings.auth.keys.len()
        ),
        Err(problem) => problems.push(problem),
    }
    // Every node, not just the first that answers: a node the worker would
    // fail over to must work too.
    let nodes = Nodes::new(&settings);
    let topology = Topology::new(&settings.amqp.prefix, settings.amqp.delivery_limit);
    for i in 0..nodes.len() {
        let node = nodes.redacted(i);
        let conn = match nodes.connect_node(i, "approval-worker check").await {
            Ok(conn) => conn,
            Err(e) => {
                problems.push(format!("broker {node} is not reachable: {e}"));
                continue;
            }
        };
        // Every mismatched object at once (a v1 deployment has several),
        // and the probe only on a topology that is in place.
        let checked = match topology.declare_all(&conn).await {
            Ok(()) => probe::may_publish(&conn, &topology)
                .await
                .map_err(|e| format!("on {node}: {e}")),
            Err(e) => Err(format!("topology could not be declared on {node}: {e}")),
        };
        let _ = conn.close(200, "check done".into()).await;
        match checked {
            Ok(()) => println!(
                "broker {node}: ok (topology {}.* declared, publishing allowed)",
                topology.prefix()
            ),
            Err(problem) => problems.push(problem),
        }
    }
    if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("check failed: {}", problems.join("; "));
        ExitCode::FAILURE
    }
}
