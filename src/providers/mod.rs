//! The provider boundary: one small trait, one folder per provider, and a
//! registry keyed by the `provider` field of a decision.
//!
//! Adding a provider: write `providers/<name>/` (`mod.rs` the client with a
//! `UNIT`, `sim.rs` its simulator half, `tests.rs`) and add its `mod` line
//! and one line to [`REGISTRY`]. The worker, the simulator, `demo`, `bench`
//! and the tests all read the registry. Providers never touch the broker.

use std::{collections::BTreeMap, sync::Arc};

use crate::settings::{ProviderSections, Settings, SettingsError};

pub(crate) mod auth;
mod contract;
pub(crate) mod http;

pub(crate) mod flexpay;
pub(crate) mod ledger_v1;
pub(crate) mod ledger_v2;
pub(crate) mod moneypipe;
pub(crate) mod qonto;

pub(crate) use contract::{
    Bound, CallContext, Client, ConfirmationState, Observed, Reply, Unit, Verdict,
};

/// One line per provider, in the order demos and reports list them.
pub(crate) const REGISTRY: &[Unit] = &[
    qonto::UNIT,
    ledger_v1::UNIT,
    ledger_v2::UNIT,
    moneypipe::UNIT,
    flexpay::UNIT,
];

pub(crate) enum Lookup<'a> {
    Enabled(&'a Arc<dyn Client>),
    Disabled,
    Unknown,
}

/// Every known provider, enabled or not.
#[derive(Clone)]
pub struct Registry {
    providers: BTreeMap<&'static str, Option<Arc<dyn Client>>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.names()).finish()
    }
}

impl Registry {
    pub fn from_settings(settings: &Settings) -> Result<Self, SettingsError> {
        let http = http::Http::from_settings(&settings.worker)?;
        Self::build(&settings.providers, &http)
    }

    pub(crate) fn build(
        sections: &ProviderSections,
        http: &http::Http,
    ) -> Result<Self, SettingsError> {
        let mut providers = BTreeMap::new();
        for unit in REGISTRY {
            providers.insert(unit.name, (unit.build)(sections, http)?);
        }
        Ok(Self { providers })
    }

    pub(crate) fn lookup(&self, name: &str) -> Lookup<'_> {
        match self.providers.get(name) {
            Some(Some(p)) => Lookup::Enabled(p),
            Some(None) => Lookup::Disabled,
            None => Lookup::Unknown,
        }
    }

    /// What keeps enabled providers from being called now, as
    /// `provider: problem` lines (for `/readyz`).
    pub fn problems(&self) -> Vec<String> {
        self.providers
            .iter()
            .filter_map(|(name, p)| Some(format!("{name}: {}", p.as_ref()?.problem()?)))
            .collect()
    }

    pub(crate) fn names(&self) -> impl Iterator<Item = (&'static str, bool)> + '_ {
        self.providers.iter().map(|(n, p)| (*n, p.is_some()))
    }
}
