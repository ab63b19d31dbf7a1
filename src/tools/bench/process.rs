//! The worker under measurement: the real `run` command as a child process,
//! so its memory and CPU are its own.

use std::{path::Path, process::Stdio, time::Duration};

use super::BenchError;

pub(super) fn spawn_worker(
    config: Option<&Path>,
    prefix: &str,
    prefetch: u16,
    sim_env: &[(String, String)],
) -> Result<tokio::process::Child, BenchError> {
    let exe = std::env::current_exe()
        .map_err(|e| BenchError::Setup(format!("cannot find own binary: {e}")))?;
    let mut cmd = tokio::process::Command::new(exe);
    if let Some(path) = config {
        cmd.arg("--config").arg(path);
    }
    cmd.arg("run")
        .envs(sim_env.iter().cloned())
        .env("APPROVAL_AMQP__PREFIX", prefix)
        .env("APPROVAL_AMQP__PREFETCH", prefetch.to_string())
        // Real providers are reached over TLS, where ALPN settles on HTTP/2
        // when they offer it; the simulator is plain HTTP and cannot
        // negotiate, so the worker is told to speak HTTP/2 to it.
        .env("APPROVAL_WORKER__HTTP2_PRIOR_KNOWLEDGE", "true")
        .env("APPROVAL_ADMIN__BIND", "127.0.0.1:0")
        .env("APPROVAL_LOG__LEVEL", "error")
        .env("APPROVAL_LOG__FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    cmd.spawn()
        .map_err(|e| BenchError::Setup(format!("cannot start the worker: {e}")))
}

pub(super) async fn terminate(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id().and_then(|pid| libc::pid_t::try_from(pid).ok()) {
        // SAFETY: kill(2) takes plain integers; `pid` is our own child, not
        // yet reaped (`child.wait()` below reaps it), so it names no other
        // process.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Usage {
    pub(super) peak_rss_kib: u64,
    pub(super) cpu_us: u64,
}

/// Peak RSS (VmHWM) and CPU time (utime + stime) of a live process, from /proc.
pub(super) fn process_usage(pid: u32) -> Option<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let peak_rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf(3) only reads a configuration value.
    let ticks_per_s = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .ok()
        .filter(|&t| t > 0)?;
    let cpu_us = (utime + stime) * 1_000_000 / ticks_per_s;
    Some(Usage {
        peak_rss_kib,
        cpu_us,
    })
}
