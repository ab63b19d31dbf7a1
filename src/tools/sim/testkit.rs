//! Helpers for in-process simulator tests, here and in each provider's
//! `tests.rs`: each test starts its own simulator on a free port and talks
//! to it over HTTP like the worker does.

use std::sync::Arc;

use reqwest::Response;
use serde_json::Value;

use super::{SimConfig, SimHandle, samples, start};
use crate::decision::{self, Decision};
use crate::providers::{CallContext, Client, Lookup, Observed, Registry, Reply};
use crate::retry::CallError;
use crate::settings::Settings;

pub(crate) async fn sim_with(config: SimConfig) -> SimHandle {
    start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("simulator starts")
}

pub(crate) async fn sim() -> SimHandle {
    sim_with(SimConfig::default()).await
}

pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::new()
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

/// The worker's clients from the registry, pointed at `sim` with the
/// credentials it accepts; `extra` adds settings. Core tests drive the fakes
/// through them so they hold for every unit without naming one.
pub(crate) fn clients(sim: &SimHandle, extra: &[(&str, &str)]) -> Registry {
    let mut vars = sim.worker_env();
    vars.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    let settings = Settings::load_from(None, vars).expect("simulator settings load");
    Registry::from_settings(&settings).expect("every unit builds against the simulator")
}

/// A fresh sample decision for `unit` and the key the fake files its target
/// under.
pub(crate) fn sample(unit: &str, action: &str) -> (Decision, String) {
    let value = samples::decision(unit, action, &new_id());
    let key = samples::target_key(&value);
    let decision = decision::parse(value.to_string().as_bytes()).expect("samples are valid");
    (decision, key)
}

fn client_of<'r>(clients: &'r Registry, unit: &str) -> &'r Arc<dyn Client> {
    match clients.lookup(unit) {
        Lookup::Enabled(provider) => provider,
        _ => panic!("{unit} is not enabled against the simulator"),
    }
}

/// One decision call by the worker's client, under idempotency key `key`.
pub(crate) async fn apply(
    clients: &Registry,
    decision: &Decision,
    key: &str,
) -> Result<Reply, CallError> {
    let ctx = CallContext {
        idempotency_key: key.to_owned(),
        attempt: 1,
        confirmation_token: None,
    };
    client_of(clients, &decision.provider)
        .apply(decision, &ctx)
        .await
}

/// The target's state read by the worker's client.
pub(crate) async fn read_state(
    clients: &Registry,
    decision: &Decision,
) -> Result<Observed, CallError> {
    client_of(clients, &decision.provider)
        .read_state(decision)
        .await
}

/// The settings the simulator's `worker_env` gives `unit`: its base URL
/// (the root plus `path`) and exactly `credentials` (keys after
/// `APPROVAL_PROVIDERS__<UNIT>__`), the ones its fake accepts.
pub(crate) async fn assert_worker_env(unit: &str, path: &str, credentials: &[(&str, &str)]) {
    let sim = sim().await;
    let prefix = format!("APPROVAL_PROVIDERS__{}__", unit.to_uppercase());
    let mut ours: Vec<(String, String)> = sim
        .worker_env()
        .into_iter()
        .filter(|(key, _)| key.starts_with(&prefix))
        .collect();
    ours.sort();
    let base_url = (
        format!("{prefix}BASE_URL"),
        format!("{}{path}", sim.root_url()),
    );
    let mut expected: Vec<(String, String)> = credentials
        .iter()
        .map(|(key, value)| (format!("{prefix}{key}"), (*value).to_owned()))
        .chain([base_url])
        .collect();
    expected.sort();
    assert_eq!(ours, expected);
}
