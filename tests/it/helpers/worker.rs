//! The worker under test: in this test process, or the real binary with its
//! output captured (for signals, exit codes, logs and the other commands).

use std::{
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use approval_worker::{
    providers::Registry, readiness::Readiness, settings::Settings, worker::Worker,
};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio_util::sync::CancellationToken;

use super::wait::DEADLINE;

/// A worker running in this test process.
pub struct InProcessWorker {
    shutdown: CancellationToken,
    handle: Option<tokio::task::JoinHandle<()>>,
    readiness: Arc<Readiness>,
}

impl InProcessWorker {
    pub fn start(env: Vec<(String, String)>) -> Self {
        let settings = Settings::load_from(None, env).expect("test settings are valid");
        let registry = Registry::from_settings(&settings).expect("providers build");
        let shutdown = CancellationToken::new();
        let worker = Worker::new(settings, registry, shutdown.clone());
        let readiness = worker.health();
        let handle = tokio::spawn(worker.run());
        Self {
            shutdown,
            handle: Some(handle),
            readiness,
        }
    }

    /// The broker node its session consumes from (password masked).
    pub fn broker_node(&self) -> Option<String> {
        self.readiness.broker_node()
    }

    /// Asks for a graceful stop and waits for it, within the deadline.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let handle = self.handle.take().expect("started");
        tokio::time::timeout(DEADLINE, handle)
            .await
            .expect("worker stops within the deadline")
            .unwrap();
    }
}

impl Drop for InProcessWorker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The real binary running one command, with its output captured; killed
/// when dropped.
pub struct Process {
    child: tokio::process::Child,
    output: Arc<Mutex<String>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Process {
    /// Runs `approval-worker <args>` with exactly `env` (and `PATH`).
    pub fn spawn(args: &[&str], env: &[(String, String)]) -> Self {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_approval-worker"))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().cloned())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the binary starts");
        let output = Arc::new(Mutex::new(String::new()));
        let streams: [Box<dyn AsyncRead + Unpin + Send>; 2] = [
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        let readers = streams
            .into_iter()
            .map(|stream| {
                let sink = output.clone();
                tokio::spawn(async move {
                    let mut lines = BufReader::new(stream).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let mut s = sink.lock().unwrap();
                        s.push_str(&line);
                        s.push('\n');
                    }
                })
            })
            .collect();
        Self {
            child,
            output,
            readers,
        }
    }

    /// Its process id, to read its `/proc` entries.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// Its stdout and stderr so far, line by line.
    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Its JSON log lines so far (`APPROVAL_LOG__FORMAT=json`), parsed;
    /// any other line is skipped.
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.output()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Sends a signal (`libc::SIGTERM`, `libc::SIGKILL`).
    pub fn signal(&self, sig: libc::c_int) {
        let pid = self.child.id().expect("running");
        let pid = libc::pid_t::try_from(pid).expect("a pid fits pid_t");
        // SAFETY: kill(2) takes plain integers; `pid` is our own child, not
        // yet reaped (`wait` reaps it), so it names no other process.
        let sent = unsafe { libc::kill(pid, sig) };
        assert_eq!(
            sent,
            0,
            "kill({pid}, {sig}): {}",
            std::io::Error::last_os_error()
        );
    }

    /// Waits for the exit and for the last line of output.
    pub async fn wait(&mut self, deadline: Duration) -> ExitStatus {
        let status = tokio::time::timeout(deadline, self.child.wait())
            .await
            .expect("process exits within the deadline")
            .unwrap();
        for reader in self.readers.drain(..) {
            let _ = tokio::time::timeout(deadline, reader).await;
        }
        status
    }
}
