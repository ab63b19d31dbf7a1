//! Tools around the worker, apart from its core: the provider simulator, the
//! demo, the benchmark and the outcome capture they share.

pub mod bench;
pub mod capture;
pub mod demo;
pub mod signer;
pub mod sim;
