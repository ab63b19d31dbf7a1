//! Per-target ordering: two decisions for the same target never run at once
//! in this worker; the later one waits for the earlier to settle. And
//! per-provider shares of the prefetch window, so one provider's slowness
//! cannot hold every delivery slot.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard, OwnedSemaphorePermit, Semaphore};

/// A semaphore per provider, made on first use.
pub(crate) type Semaphores = Mutex<HashMap<&'static str, Arc<Semaphore>>>;

/// `provider`'s semaphore in `map`, made with `permits` on first use. A
/// poisoned map is still whole (a panic cannot leave an entry half made),
/// so it is used rather than panicking every later call.
pub(crate) fn per_provider(
    map: &Semaphores,
    provider: &'static str,
    permits: usize,
) -> Arc<Semaphore> {
    map.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(provider)
        .or_insert_with(|| Arc::new(Semaphore::new(permits)))
        .clone()
}

/// At most `share` deliveries per provider at once.
pub struct ProviderShares {
    share: usize,
    map: Semaphores,
}

impl ProviderShares {
    pub fn new(share: usize) -> Self {
        Self {
            share,
            map: Mutex::default(),
        }
    }

    /// A place among `provider`'s deliveries, waiting at most `wait`:
    /// `None` when it stayed full, so the caller can move the decision
    /// aside instead of holding its delivery slot longer.
    pub async fn acquire(
        &self,
        provider: &'static str,
        wait: Duration,
    ) -> Option<OwnedSemaphorePermit> {
        let slots = per_provider(&self.map, provider, self.share);
        tokio::time::timeout(wait, slots.acquire_owned())
            .await
            .ok()?
            .ok()
    }
}

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
    async fn a_full_share_answers_none_after_the_wait_and_frees_on_drop() {
        let shares = ProviderShares::new(2);
        let wait = Duration::from_millis(20);
        let a = shares.acquire("slow", wait).await.expect("first place");
        let _b = shares.acquire("slow", wait).await.expect("second place");
        assert!(shares.acquire("slow", wait).await.is_none(), "full");
        assert!(
            shares.acquire("other", wait).await.is_some(),
            "another provider's share is its own"
        );
        drop(a);
        assert!(shares.acquire("slow", wait).await.is_some());
    }

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
