//! The simulator core's state: one running fake per registry unit, each
//! with its faults, quota and outage, plus the scripted failures and the
//! shutdown token.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::faults::Faults;
use super::kit::{ScaAuto, TargetInfo, lock};
use super::outage::Outage;
use super::quota::{Quota, QuotaState, Refusal};
use super::stats::SimStats;
use super::unit::SimUnit;

/// One provider's fake, under its name and path prefix.
pub(crate) struct Slot {
    pub name: &'static str,
    pub prefix: &'static str,
    pub unit: Arc<dyn SimUnit>,
    faults: Mutex<Faults>,
    /// `None` without a quota: calls then skip the bookkeeping.
    quota: Mutex<Option<QuotaState>>,
    /// A watch, so a call held by a black hole learns when it ends.
    outage: watch::Sender<Option<Outage>>,
}

impl Slot {
    pub fn new(name: &'static str, prefix: &'static str, unit: Arc<dyn SimUnit>) -> Self {
        Self {
            name,
            prefix,
            unit,
            faults: Mutex::default(),
            quota: Mutex::default(),
            outage: watch::Sender::new(None),
        }
    }
}

/// Everything the server shares. Each fake keeps its own state behind its
/// own mutexes; no lock is held across an await.
pub(crate) struct Sim {
    slots: Vec<Slot>,
    /// Scripted failures: the next decision calls whose path contains the
    /// fragment get this status (a demo's "decision that meets transient failures").
    scripted: Mutex<Vec<Scripted>>,
    /// Stops the server and releases requests held by a timeout fault.
    pub shutdown: CancellationToken,
}

struct Scripted {
    index: usize,
    path_fragment: String,
    remaining: u32,
    status: u16,
}

impl Sim {
    pub fn new(
        slots: Vec<Slot>,
        faults: &BTreeMap<String, Faults>,
        quotas: &BTreeMap<String, Quota>,
    ) -> std::io::Result<Self> {
        let invalid = |msg: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, msg);
        let sim = Self {
            slots,
            scripted: Mutex::default(),
            shutdown: CancellationToken::new(),
        };
        for (name, unit_faults) in faults {
            let index = sim
                .index(name)
                .ok_or_else(|| invalid(format!("simulator faults: unknown provider {name:?}")))?;
            unit_faults
                .validate()
                .map_err(|e| invalid(format!("simulator faults for {name}: {e}")))?;
            sim.set_faults(index, *unit_faults);
        }
        for (name, quota) in quotas {
            let index = sim
                .index(name)
                .ok_or_else(|| invalid(format!("simulator quota: unknown provider {name:?}")))?;
            sim.set_quota(index, quota.clone());
        }
        Ok(sim)
    }

    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// The place of the unit named `name`; the URL spelling (`-` for `_`)
    /// is accepted too.
    pub fn index(&self, name: &str) -> Option<usize> {
        let name = name.replace('-', "_");
        self.slots.iter().position(|slot| slot.name == name)
    }

    pub fn unit(&self, index: usize) -> &dyn SimUnit {
        &*self.slots[index].unit
    }

    pub fn fail_next(&self, index: usize, path_fragment: &str, calls: u32, status: u16) {
        lock(&self.scripted).push(Scripted {
            index,
            path_fragment: path_fragment.to_owned(),
            remaining: calls,
            status,
        });
    }

    /// The scripted failure status for this decision call, if one is due.
    pub fn scripted_failure(&self, index: usize, path: &str) -> Option<u16> {
        let mut scripted = lock(&self.scripted);
        let entry = scripted
            .iter_mut()
            .find(|s| s.index == index && s.remaining > 0 && path.contains(&s.path_fragment))?;
        entry.remaining -= 1;
        Some(entry.status)
    }

    pub fn faults(&self, index: usize) -> Faults {
        *lock(&self.slots[index].faults)
    }

    pub fn set_faults(&self, index: usize, faults: Faults) {
        *lock(&self.slots[index].faults) = faults;
    }

    /// Replaces the quota; its windows start empty.
    pub fn set_quota(&self, index: usize, quota: Quota) {
        *lock(&self.slots[index].quota) = (!quota.is_off()).then(|| QuotaState::new(quota));
    }

    /// The quota and the admitted calls in each of its windows now.
    pub fn quota(&self, index: usize) -> (Quota, BTreeMap<String, u64>) {
        match &mut *lock(&self.slots[index].quota) {
            Some(state) => (state.quota().clone(), state.used(Instant::now())),
            None => (Quota::default(), BTreeMap::new()),
        }
    }

    /// A read or decision arrives: admitted (also without a quota) or refused.
    pub fn arrive(&self, index: usize) -> Result<(), Refusal> {
        match &mut *lock(&self.slots[index].quota) {
            Some(state) => state.arrive(Instant::now()),
            None => Ok(()),
        }
    }

    pub fn set_outage(&self, index: usize, outage: Option<Outage>) {
        self.slots[index].outage.send_replace(outage);
    }

    /// The outage in force now, if any.
    pub fn outage(&self, index: usize) -> Option<Outage> {
        let outage = *self.slots[index].outage.borrow();
        outage.filter(|o| o.is_active(Instant::now()))
    }

    /// Notified on every change of the provider's outage.
    pub fn outage_changes(&self, index: usize) -> watch::Receiver<Option<Outage>> {
        self.slots[index].outage.subscribe()
    }

    pub fn stats(&self) -> SimStats {
        SimStats(
            self.slots
                .iter()
                .map(|slot| {
                    let mut stats = slot.unit.counters().snapshot();
                    if let Some(quota) = &*lock(&slot.quota) {
                        stats.max_in_window = quota.max_in_window();
                    }
                    (slot.name.to_owned(), stats)
                })
                .collect(),
        )
    }

    /// Asks every unit with a confirmation step to require one for `key`.
    pub fn require_confirmation(&self, key: &str, auto: ScaAuto) -> bool {
        let mut any = false;
        for slot in &self.slots {
            any |= slot.unit.require_confirmation(key, auto);
        }
        any
    }

    pub fn target(&self, index: usize, key: &str) -> Option<TargetInfo> {
        self.unit(index).target(key)
    }

    /// Clears targets, caches, confirmation state, counters and the
    /// quotas' windows. Tokens survive so a running worker is not forced
    /// through re-authentication by a test reset; faults, quotas and
    /// outages stay as set.
    pub fn reset(&self) {
        for slot in &self.slots {
            slot.unit.reset();
            slot.unit.counters().reset();
            if let Some(quota) = &mut *lock(&slot.quota) {
                quota.reset();
            }
        }
    }
}
