//! approval-worker: applies review decisions from RabbitMQ at payment
//! providers, and publishes outcome events.
//!
//! Layers, each using only those below it: `worker` (the flow of one
//! decision) → `providers` (one module per provider behind one trait) →
//! `retry` (error classes, backoff) → `decision`, `outcome` (messages).
//! Beside them: `broker` (RabbitMQ), `settings`, `telemetry`, and the
//! binary's `commands`.

pub mod admin;
pub mod bench;
pub mod broker;
pub mod capture;
pub mod commands;
pub mod decision;
pub mod demo;
pub mod jws;
pub mod locks;
pub mod outcome;
pub mod providers;
pub mod readiness;
pub mod retry;
pub mod settings;
mod shutdown;
pub mod sim;
pub mod telemetry;
pub mod worker;
