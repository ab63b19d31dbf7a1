//! The integration tests, in one binary (one build, one link) with a module
//! per concern. They talk to the local RabbitMQ; providers are wiremock or
//! the project's simulator. Each test starts from `helpers::app::spawn_app`.
//! Tests that take the broker away live in `tests/zz_*.rs` and run alone.

mod helpers;

mod admin;
mod authn;
mod broker_safety;
mod budget;
mod faults;
mod inputs;
mod isolation;
mod isolation_sim;
mod limits;
mod nodes;
mod parking;
mod process;
mod providers_e2e;
mod qonto;
mod qonto_oauth;
mod recovery;
mod topology;
