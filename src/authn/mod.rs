//! Decision authenticity (CONTRACT v2 section 4.1): who may move money.
//!
//! Upstream signs each decision the Standard Webhooks way
//! (<https://www.standardwebhooks.com>), so a team can sign with the
//! reference library of its language; the worker verifies against every
//! trusted key at once, so keys can be rotated without a pause. Copies the
//! worker republishes carry its own bookkeeping, vouched for by the hop MAC
//! (CONTRACT section 3) under a key only the worker holds.
//!
//! Functions over bytes and strings: the broker layer reads the AMQP
//! headers and hands their values in, so nothing here knows about lapin.
//! Keys are parsed once, at start-up; verifying allocates only the signed
//! bytes an Ed25519 check needs contiguous. The one shared state is the
//! [`Batcher`], where concurrent deliveries pool their Ed25519 signatures
//! (batch.rs).

pub mod batch;
pub mod hop;
pub mod keys;
pub mod webhook;

pub use batch::Batcher;
pub use hop::{HopKey, hop_mac, verify_hop};
pub use keys::{KeyError, KeyProblem, Keys, SigningKey};
pub use webhook::{
    FailureKind, SignError, SignatureHeaders, SignedHeaders, Verified, VerifyError, sign, verify,
    verify_batched,
};
