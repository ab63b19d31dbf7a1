//! One way to stand a worker up for a test, after zero-to-production's
//! `spawn_app`: a private broker namespace, the providers (Qonto on wiremock
//! or the project's simulator), the environment, and the worker.

use std::sync::Mutex;

use approval_worker::tools::sim::{self, Faults, SimConfig, SimHandle};
use wiremock::MockServer;

use super::{
    broker::{AMQP_URL, DELIVERY_LIMIT, TestBroker},
    qonto, signing,
    worker::{InProcessWorker, Process},
};

/// What a test needs: [`spawn_app`] builds it.
pub struct App {
    name: String,
    providers: Providers,
    env: Vec<(String, String)>,
    start_worker: bool,
    /// Simulator faults for one provider, instead of the app's.
    faults_for: Vec<(String, Faults)>,
}

enum Providers {
    None,
    Qonto(qonto::Auth),
    Simulator(Faults),
}

impl App {
    fn new(name: &str, providers: Providers) -> Self {
        Self {
            name: name.to_owned(),
            providers,
            env: Vec::new(),
            start_worker: true,
            faults_for: Vec::new(),
        }
    }

    /// Qonto on wiremock, authenticated with `auth`; no other provider.
    pub fn qonto(name: &str, auth: qonto::Auth) -> Self {
        Self::new(name, Providers::Qonto(auth))
    }

    /// Every provider on the simulator, each with `faults`.
    pub fn simulator(name: &str, faults: Faults) -> Self {
        Self::new(name, Providers::Simulator(faults))
    }

    /// No provider configured: every one is disabled.
    pub fn without_providers(name: &str) -> Self {
        Self::new(name, Providers::None)
    }

    /// On the simulator, `provider` gets `faults` instead of the app's.
    pub fn faults_for(mut self, provider: &str, faults: Faults) -> Self {
        self.faults_for.push((provider.to_owned(), faults));
        self
    }

    /// One more setting, overriding the defaults of [`worker_env`].
    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        self.env.push((key.to_owned(), value.to_string()));
        self
    }

    /// Leaves the worker to the test (the real binary, or started later).
    pub fn without_worker(mut self) -> Self {
        self.start_worker = false;
        self
    }
}

/// A test's world: dropped in field order, so the worker stops before the
/// providers and the broker namespace go.
pub struct TestApp {
    worker: Mutex<Option<InProcessWorker>>,
    qonto: Option<MockServer>,
    sim: Option<SimHandle>,
    /// The environment every worker of this test runs with.
    env: Vec<(String, String)>,
    pub broker: TestBroker,
}

/// Declares the broker namespace, starts the providers, builds the
/// environment and (unless told otherwise) starts an in-process worker and
/// waits until it consumes.
pub async fn spawn_app(app: App) -> TestApp {
    let broker = TestBroker::new(&app.name).await;
    let mut env = worker_env(&broker);
    let (mut qonto, mut sim) = (None, None);
    match app.providers {
        Providers::None => {}
        Providers::Qonto(auth) => {
            let server = MockServer::start().await;
            env.extend(qonto::env(&server.uri(), auth));
            qonto = Some(server);
        }
        Providers::Simulator(faults) => {
            let mut config = SimConfig::default();
            for p in sim::providers() {
                config.faults.insert(p.to_string(), faults);
            }
            config.faults.extend(app.faults_for);
            let handle = sim::start(config, "127.0.0.1:0".parse().unwrap())
                .await
                .unwrap();
            env.extend(handle.worker_env());
            sim = Some(handle);
        }
    }
    env.extend(app.env);
    let test_app = TestApp {
        worker: Mutex::default(),
        qonto,
        sim,
        env,
        broker,
    };
    if app.start_worker {
        test_app.start_worker().await;
    }
    test_app
}

impl TestApp {
    /// The mocked Qonto (panics unless the app was built with it).
    pub fn qonto(&self) -> &MockServer {
        self.qonto.as_ref().expect("an app with Qonto on wiremock")
    }

    /// The simulator (panics unless the app was built with it).
    pub fn sim(&self) -> &SimHandle {
        self.sim.as_ref().expect("an app on the simulator")
    }

    /// Starts an in-process worker and waits until it consumes.
    pub async fn start_worker(&self) {
        let previous = self
            .worker
            .lock()
            .unwrap()
            .replace(InProcessWorker::start(self.env.clone()));
        assert!(previous.is_none(), "one in-process worker per app");
        self.broker.wait_consumer().await;
    }

    /// The broker node the in-process worker consumes from, if it does.
    pub fn broker_node(&self) -> Option<String> {
        let worker = self.worker.lock().unwrap();
        worker.as_ref().and_then(|w| w.broker_node())
    }

    /// Stops the in-process worker gracefully, within the deadline.
    pub async fn stop_worker(&self) {
        let worker = self.worker.lock().unwrap().take();
        worker.expect("a worker runs").stop().await;
    }

    /// Runs the real binary with this app's environment.
    pub fn run(&self, args: &[&str]) -> Process {
        Process::spawn(args, &self.env)
    }

    /// Runs the real binary with this app's environment plus `extra`.
    pub fn run_with(&self, args: &[&str], extra: &[(&str, &str)]) -> Process {
        let mut env = self.env.clone();
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Process::spawn(args, &env)
    }

    /// The in-process or spawned worker's `/metrics` text.
    pub async fn metrics(&self) -> String {
        let url = format!("{}/metrics", self.admin_url());
        reqwest::get(url).await.unwrap().text().await.unwrap()
    }

    /// The admin endpoint's base URL.
    pub fn admin_url(&self) -> String {
        let bind = &self
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "APPROVAL_ADMIN__BIND")
            .expect("worker_env sets the admin address")
            .1;
        format!("http://{bind}")
    }
}

/// Settings pointing a worker at `broker`'s namespace, with short backoffs
/// so retries happen within a test's deadline.
fn worker_env(broker: &TestBroker) -> Vec<(String, String)> {
    [
        ("APPROVAL_AMQP__URL", AMQP_URL.to_owned()),
        ("APPROVAL_AMQP__PREFIX", broker.prefix.clone()),
        ("APPROVAL_AMQP__PREFETCH", "50".into()),
        ("APPROVAL_AMQP__DELIVERY_LIMIT", DELIVERY_LIMIT.to_string()),
        ("APPROVAL_AMQP__RECONNECT_INITIAL_MS", "100".into()),
        ("APPROVAL_AMQP__RECONNECT_MAX_MS", "1000".into()),
        ("APPROVAL_RETRY__INITIAL_BACKOFF_MS", "10".into()),
        ("APPROVAL_RETRY__MAX_BACKOFF_MS", "50".into()),
        ("APPROVAL_WORKER__HTTP_TIMEOUT_MS", "5000".into()),
        ("APPROVAL_WORKER__DRAIN_TIMEOUT_MS", "10000".into()),
        ("APPROVAL_ADMIN__BIND", format!("127.0.0.1:{}", free_port())),
        ("APPROVAL_AUTH__KEYS", signing::trusted_keys()),
        ("APPROVAL_AUTH__HOP_KEY", signing::HOP_KEY.to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// A port nobody listens on right now, for a process's admin endpoint.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The value of one series in Prometheus text, 0 when absent.
pub fn series(metrics: &str, name_and_labels: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let (series, _) = l.rsplit_once(' ').unwrap_or((l, ""));
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            let (want_name, want_labels) = name_and_labels
                .split_once('{')
                .unwrap_or((name_and_labels, ""));
            name == want_name
                && want_labels
                    .trim_end_matches('}')
                    .split(',')
                    .filter(|w| !w.is_empty())
                    .all(|w| labels.contains(w))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}
