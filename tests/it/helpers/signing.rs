//! How the tests sign what they publish, as an upstream service would
//! (CONTRACT v2 section 4.1). Test keys only: they guard nothing.

use approval_worker::authn::{SigningKey, sign, webhook::random_id};
use lapin::types::{AMQPValue, FieldTable, LongString};

/// The publisher's Ed25519 key and the public half the worker trusts.
pub const ED25519_SEED: &str = "whsk_P+5hm5y24jQs0YhMHM2P/uqDY/f8JabrXV4kDpn/Hf0=";
pub const ED25519_PUBLIC: &str = "whpk_BpiT3zSnLIHzIWo1P0Oa4IqJHq29NzGorDkuW3BP0Lw=";
/// A shared HMAC secret the worker trusts too.
pub const HMAC_SECRET: &str = "whsec_fLOAxV7LSou7d+iOLN4EYPlz4EMy0GDz8VZOa2+o/1I=";
/// The workers' hop key.
pub const HOP_KEY: &str = "whsec_KKYZlksKBAydWDS68oRLpxGX/i6Tmrlc+bThdbMktPU=";

/// `APPROVAL_AUTH__KEYS` for a worker that trusts both test keys.
pub fn trusted_keys() -> String {
    format!("{ED25519_PUBLIC},{HMAC_SECRET}")
}

/// Adds the three signature headers for `body`, signed now with `key`.
pub fn sign_into(headers: &mut FieldTable, key: &str, body: &[u8]) {
    sign_at(
        headers,
        key,
        body,
        time::OffsetDateTime::now_utc().unix_timestamp(),
    );
}

/// As [`sign_into`], dated `timestamp` (Unix seconds).
pub fn sign_at(headers: &mut FieldTable, key: &str, body: &[u8], timestamp: i64) {
    let key = SigningKey::parse(key).expect("a test signing key");
    let signed = sign(&[key], &random_id(), timestamp, body).expect("signs");
    for (name, value) in [
        ("webhook-id", signed.id),
        ("webhook-timestamp", signed.timestamp),
        ("webhook-signature", signed.signature),
    ] {
        headers.insert(
            name.into(),
            AMQPValue::LongString(LongString::from(value.into_bytes())),
        );
    }
}
