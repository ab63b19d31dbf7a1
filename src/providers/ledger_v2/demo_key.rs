//! The demo API user's key, apart from the client's signing code so the
//! fake can verify with it without importing the client.

/// Throwaway P-256 key for the simulator and the `demo` command only.
///
/// It is public, so it protects nothing: never register its public key with a
/// real Ledger workspace. The simulator verifies Ledger v2 signatures with its
/// public half, and `SimHandle::worker_env` hands this PEM to the worker.
pub const DEMO_SIGNING_KEY_PEM: &str = "-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIFsg5itIFqngrRsCZPJprXcfAvii0RCu8RFgS3UZZYDnoAoGCCqGSM49
AwEHoUQDQgAE8u2GmfKd7mISYOrvmx4I2BHCcvNFNIeJQOGoxFmFjN4W0/chcYbf
VH41Aga7/MJLRX/ALF4ujNHwWzIPJXor4Q==
-----END EC PRIVATE KEY-----
";
