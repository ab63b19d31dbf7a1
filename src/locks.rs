//! Per-target ordering: two decisions for the same target never run at once
//! in this worker; the later one waits for the earlier to settle.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

#[derive(Default, Clone)]
pub struct TargetLocks {
    map: Arc<Mutex<HashMap<String, Arc<AsyncMutex<()>>>>>,
}

pub struct TargetGuard {
    key: String,
    guard: Option<OwnedMutexGuard<()>>,
    map: Arc<Mutex<HashMap<String, Arc<AsyncMutex<()>>>>>,
}

impl TargetLocks {
    pub async fn lock(&self, key: String) -> TargetGuard {
        let slot = {
            let mut map = self.map.lock().expect("target lock map poisoned");
            map.entry(key.clone()).or_default().clone()
        };
        let guard = slot.lock_owned().await;
        TargetGuard {
            key,
            guard: Some(guard),
            map: self.map.clone(),
        }
    }
}

impl Drop for TargetGuard {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = self.map.lock().expect("target lock map poisoned");
        // Only the map holds the slot: nobody waits, so forget the key and
        // keep the map as small as the set of targets in flight.
        if map
            .get(&self.key)
            .is_some_and(|slot| Arc::strong_count(slot) == 1)
        {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn same_target_waits_other_targets_do_not() {
        let locks = TargetLocks::default();
        let first = locks.lock("a".into()).await;
        let _other = tokio::time::timeout(Duration::from_secs(1), locks.lock("b".into()))
            .await
            .expect("another target is not blocked");
        let locks2 = locks.clone();
        let mut waiter = tokio::spawn(async move { locks2.lock("a".into()).await });
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut waiter)
                .await
                .is_err(),
            "second decision for the same target must wait"
        );
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("released")
            .unwrap();
        drop(second);
        drop(_other);
        // Settled targets leave the map.
        assert!(locks.map.lock().unwrap().is_empty());
    }
}
