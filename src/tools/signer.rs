//! The demo's and the bench's upstream: a fresh Ed25519 key per run, whose
//! public half the worker under test trusts, and the AMQP headers that
//! sign a body with it (CONTRACT v2 section 4.1).

use lapin::types::{AMQPValue, FieldTable, LongString};
use secrecy::ExposeSecret;

use crate::authn::{SigningKey, keys, sign, webhook::random_id};

pub struct Signer {
    key: SigningKey,
    /// What the worker is given to verify with: the public key, or the
    /// shared secret itself for HMAC.
    trusted: String,
}

impl Signer {
    /// Ed25519 (`v1a` entries), as the project recommends.
    pub fn generate() -> Self {
        let (seed, public) = keys::generate_ed25519();
        let key = SigningKey::parse(seed.expose_secret()).expect("a generated seed parses");
        Self {
            key,
            trusted: public,
        }
    }

    /// HMAC-SHA256 (`v1` entries).
    pub fn generate_hmac() -> Self {
        let secret = keys::generate_secret();
        let key = SigningKey::parse(secret.expose_secret()).expect("a generated secret parses");
        Self {
            key,
            trusted: secret.expose_secret().to_owned(),
        }
    }

    /// `APPROVAL_AUTH__KEYS` for a worker that trusts this signer.
    pub fn trusted(&self) -> (String, String) {
        ("APPROVAL_AUTH__KEYS".to_owned(), self.trusted.clone())
    }

    /// The three signature headers for `body`, signed now.
    pub fn headers(&self, body: &[u8]) -> FieldTable {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let signed = sign(std::slice::from_ref(&self.key), &random_id(), now, body)
            .expect("a generated id and the current time are valid");
        let mut table = FieldTable::default();
        for (name, value) in [
            ("webhook-id", signed.id),
            ("webhook-timestamp", signed.timestamp),
            ("webhook-signature", signed.signature),
        ] {
            table.insert(
                name.into(),
                AMQPValue::LongString(LongString::from(value.into_bytes())),
            );
        }
        table
    }
}
