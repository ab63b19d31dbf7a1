//! Readiness as the admin endpoint reports it: connected to the broker,
//! topology declared and consuming, and not draining.

use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Default)]
pub struct Readiness {
    connected: AtomicBool,
    consuming: AtomicBool,
    draining: AtomicBool,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
            && self.consuming.load(Ordering::SeqCst)
            && !self.draining.load(Ordering::SeqCst)
    }

    /// The session declared its topology and consumes decisions.
    pub(crate) fn consuming(&self) {
        self.set(true, true);
    }

    /// No session: lost, or stopped.
    pub(crate) fn disconnected(&self) {
        self.set(false, false);
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
        r.consuming();
        assert!(r.ready());
        r.disconnected();
        assert!(!r.ready());
        r.consuming();
        r.start_draining();
        assert!(!r.ready());
        r.consuming();
        assert!(!r.ready(), "a drain is never undone");
    }
}
