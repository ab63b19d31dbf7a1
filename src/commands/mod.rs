//! The binary's subcommands, each with its arguments and its body in one
//! file. `demo` and `bench` live with the tools.

pub mod check;
pub mod dead_letters;
pub mod qonto_oauth;
pub mod run;
pub mod sign;
pub mod simulate;
