//! In-process tests: each starts its own simulator on a free port and talks
//! to it over HTTP like the worker does.

mod control;
mod faults;
mod flexpay;
mod ledger_v1;
mod ledger_v2;
mod moneypipe;
mod qonto;

use reqwest::{Client, Response};
use serde_json::Value;

use super::{SimConfig, SimHandle, start};

async fn sim_with(config: SimConfig) -> SimHandle {
    start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("simulator starts")
}

async fn sim() -> SimHandle {
    sim_with(SimConfig::default()).await
}

fn client() -> Client {
    Client::new()
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Status and JSON body of a response.
async fn parts(response: Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}
