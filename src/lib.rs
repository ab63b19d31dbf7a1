//! approval-worker: applies review decisions from RabbitMQ at payment
//! providers, and publishes outcome events.
//!
//! Layers, each using only those below it: `worker` (the flow of one
//! decision) → `providers` (one module per provider behind one trait) →
//! `retry` (error classes, backoff) → `decision`, `outcome` (messages).
//! Beside them: `broker` (RabbitMQ), `settings`, `telemetry`, and the
//! binary's `commands`; apart, in `tools`: the provider simulator, `demo`,
//! `bench` and the outcome capture.
//!
//! Public is only what the binary and the integration tests use; everything
//! else is `pub(crate)`, so the compiler reports what nothing uses.

pub(crate) mod admin;
pub mod authn;
pub mod broker;
pub mod commands;
pub mod decision;
pub(crate) mod isolation;
pub(crate) mod locks;
pub(crate) mod outcome;
pub mod providers;
pub mod readiness;
pub(crate) mod retry;
pub mod settings;
mod shutdown;
pub mod telemetry;
pub mod tools;
pub mod worker;
