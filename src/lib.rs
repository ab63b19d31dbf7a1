//! approval-worker: applies review decisions from RabbitMQ at payment
//! providers, and publishes outcome events.
//!
//! Layers, each using only those below it: `worker` (the flow of one
//! decision) → `providers` (one module per provider behind one trait) →
//! `retry` (error classes, backoff) → `decision`, `outcome` (messages).
//! Beside them: `broker` (RabbitMQ), `settings`, `telemetry`, and the
//! binary's `commands`; apart, in `tools`: the provider simulator, `demo`,
//! `bench` and the outcome capture.

pub mod admin;
pub mod broker;
pub mod commands;
pub mod decision;
pub mod locks;
pub mod outcome;
pub mod providers;
pub mod readiness;
pub mod retry;
pub mod settings;
mod shutdown;
pub mod telemetry;
pub mod tools;
pub mod worker;

// The tools keep their short paths for the binary and the integration tests.
pub use tools::{bench, demo, sim};
