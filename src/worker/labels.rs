//! Bounded metric label values: an unreadable message must not mint new
//! series, and a known value is a static string, so counting allocates
//! nothing.

use crate::{decision::Action, providers::Registry};

pub(super) fn provider(registry: &Registry, value: Option<&str>) -> &'static str {
    registry
        .names()
        .find(|(name, _)| Some(*name) == value)
        .map_or("unknown", |(name, _)| name)
}

pub(super) fn action(value: Option<&str>) -> &'static str {
    [Action::Approve, Action::Reject]
        .into_iter()
        .map(Action::as_str)
        .find(|a| Some(*a) == value)
        .unwrap_or("unknown")
}
