//! Test helpers, one module per concern. Tests start from
//! [`app::spawn_app`], which wires the others together.

pub mod app;
pub mod broker;
pub mod mock;
pub mod qonto;
pub mod signing;
pub mod wait;
pub mod worker;
