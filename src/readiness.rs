//! Readiness as the admin endpoint reports it: connected to the broker,
//! topology declared and consuming, and not draining; which broker node
//! the session uses; and what keeps a provider from being called at all
//! (a revoked Qonto OAuth grant), which only an operator can fix.

use std::sync::{
    Mutex, OnceLock,
    atomic::{AtomicBool, Ordering},
};

use crate::providers::Registry;

#[derive(Debug, Default)]
pub struct Readiness {
    connected: AtomicBool,
    consuming: AtomicBool,
    draining: AtomicBool,
    /// The consuming session's node, password masked.
    node: Mutex<Option<String>>,
    /// Why the last session ended or could not start, until one consumes.
    problem: Mutex<Option<String>>,
    /// The providers whose problems are reported.
    providers: OnceLock<Registry>,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
            && self.consuming.load(Ordering::SeqCst)
            && !self.draining.load(Ordering::SeqCst)
    }

    /// The broker node in use (its URL with the password masked), while a
    /// session consumes.
    pub fn broker_node(&self) -> Option<String> {
        self.node.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Why the last session ended or could not start, while no session
    /// consumes (a topology mismatch names the queue here).
    pub fn problem(&self) -> Option<String> {
        self.problem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reports the problems of `registry`'s providers from now on.
    pub fn watch_providers(&self, registry: Registry) {
        let _ = self.providers.set(registry);
    }

    /// `provider: problem` lines, one per provider that cannot be called
    /// now for want of an operator (texts without secrets).
    pub fn provider_problems(&self) -> Vec<String> {
        self.providers
            .get()
            .map(Registry::problems)
            .unwrap_or_default()
    }

    /// Whether the process is draining for a stop.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// The session declared its topology on `node` (redacted) and consumes
    /// decisions.
    pub(crate) fn consuming(&self, node: &str) {
        *self.node.lock().unwrap_or_else(|e| e.into_inner()) = Some(node.to_owned());
        *self.problem.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.set(true, true);
    }

    /// No session: lost, or stopped.
    pub(crate) fn disconnected(&self) {
        *self.node.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.set(false, false);
    }

    /// The session was lost, or could not start, because of `problem`
    /// (a text without secrets: node URLs are redacted).
    pub(crate) fn lost(&self, problem: String) {
        *self.problem.lock().unwrap_or_else(|e| e.into_inner()) = Some(problem);
        self.disconnected();
    }

    fn set(&self, connected: bool, consuming: bool) {
        self.connected.store(connected, Ordering::SeqCst);
        self.consuming.store(consuming, Ordering::SeqCst);
        metrics::gauge!("approval_ready").set(if self.ready() { 1.0 } else { 0.0 });
    }

    /// Once set, readiness stays off until the process ends.
    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        metrics::gauge!("approval_ready").set(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_while_consuming_and_not_draining() {
        let r = Readiness::default();
        assert!(!r.ready());
        r.consuming("amqp://a");
        assert!(r.ready());
        r.disconnected();
        assert!(!r.ready());
        r.consuming("amqp://a");
        r.start_draining();
        assert!(!r.ready());
        r.consuming("amqp://a");
        assert!(!r.ready(), "a drain is never undone");
    }

    #[test]
    fn names_the_node_only_while_a_session_consumes() {
        let r = Readiness::default();
        assert_eq!(r.broker_node(), None);
        r.consuming("amqp://guest:***@a:5672/%2f");
        assert_eq!(
            r.broker_node().as_deref(),
            Some("amqp://guest:***@a:5672/%2f")
        );
        r.disconnected();
        assert_eq!(
            r.broker_node(),
            None,
            "no node in use once the session is lost"
        );
        r.consuming("amqp://guest:***@b:5672/%2f");
        assert_eq!(
            r.broker_node().as_deref(),
            Some("amqp://guest:***@b:5672/%2f")
        );
    }
}
