//! Helpers for in-process simulator tests, here and in each provider's
//! `tests.rs`: each test starts its own simulator on a free port and talks
//! to it over HTTP like the worker does.

use reqwest::{Client, Response};
use serde_json::Value;

use super::{SimConfig, SimHandle, start};

pub(crate) async fn sim_with(config: SimConfig) -> SimHandle {
    start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("simulator starts")
}

pub(crate) async fn sim() -> SimHandle {
    sim_with(SimConfig::default()).await
}

pub(crate) fn client() -> Client {
    Client::new()
}

pub(crate) fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Status and JSON body of a response.
pub(crate) async fn parts(response: Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}
