//! Standard Webhooks signatures carried in AMQP headers (CONTRACT v2
//! section 4.1): verifying a decision, and signing one for `sign`, the demo,
//! the bench and the tests.
//!
//! The signed bytes are `{webhook-id}.{webhook-timestamp}.{body}`. The
//! `webhook-signature` header holds space-separated entries `v1,<base64
//! HMAC-SHA256>` and `v1a,<base64 Ed25519 signature>`; a decision passes when
//! one entry verifies with one configured key. Entries of other versions are
//! skipped, as the reference libraries do, so a publisher can add a scheme
//! ahead of the worker.
//!
//! The work per message is bounded whatever a publisher sends: at most
//! [`MAX_ENTRIES`] entries, at most [`super::keys::MAX_KEYS`] keys, and at
//! most [`MAX_ED25519_CHECKS`] Ed25519 verifications (each costs tens of
//! microseconds, where an HMAC entry costs well under one).

use std::{borrow::Cow, time::Duration};

use base64::Engine;
use hmac::Mac;
use time::OffsetDateTime;

use super::{
    batch::Batcher,
    keys::{B64, HmacSha256, Keys, SigningKey, random_bytes},
};

pub const ID_HEADER: &str = "webhook-id";
pub const TIMESTAMP_HEADER: &str = "webhook-timestamp";
pub const SIGNATURE_HEADER: &str = "webhook-signature";

/// Entries in one `webhook-signature`: a rotation needs two or three; a
/// header with more is refused whole rather than read in part, so the
/// outcome never depends on where the valid entry sits.
pub const MAX_ENTRIES: usize = 16;

/// Longest `webhook-signature` in bytes: sixteen entries of about 92 bytes
/// each. The worker's retry and park copies carry the header only up to
/// this length, so a longer one is refused here, before any provider call,
/// rather than lost on the copy of a decision already applied once.
pub const MAX_SIGNATURE_LEN: usize = MAX_ENTRIES * 96;

/// Ed25519 verifications per message, over all entries and keys. Sixteen
/// `v1a` entries against sixteen public keys would be 256 verifications
/// (several milliseconds) bought with one publish; 32 covers any real
/// rotation (say three keys, signatures from two) with room to spare.
pub const MAX_ED25519_CHECKS: usize = 32;

/// How far ahead of its receipt a signature may be dated: clock skew
/// between publisher and worker, no more (a later date would stretch the
/// maximum age).
pub const MAX_FUTURE: Duration = Duration::from_secs(300);

const MAX_ID_LEN: usize = 64;

/// Twelve digits reach past the year 9999, the last `time` represents; a
/// longer timestamp is no date this worker can compare.
const MAX_TIMESTAMP_DIGITS: usize = 12;

/// The three header values as they arrived (`None` when absent or not a
/// string), borrowed from the delivery.
#[derive(Debug, Clone, Copy, Default)]
pub struct SignatureHeaders<'a> {
    pub id: Option<&'a str>,
    pub timestamp: Option<&'a str>,
    pub signature: Option<&'a str>,
}

/// A decision that passed: when it was signed, and which key vouched for
/// it (its 1-based position in `APPROVAL_AUTH__KEYS`, so the logs show
/// when the last decision under an old key went by).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    pub signed_at: OffsetDateTime,
    pub key: usize,
}

/// The outcome error kinds of CONTRACT section 5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// An authentic signature older than the maximum age.
    Stale,
    /// Everything else: no, malformed or unknown signature, a date ahead.
    Unauthenticated,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Stale => "stale",
            FailureKind::Unauthenticated => "unauthenticated",
        }
    }
}

/// Why a decision did not pass, in words an upstream team can act on.
/// Never holds key material, and never a header value: both come from
/// whoever published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct VerifyError {
    kind: FailureKind,
    message: Cow<'static, str>,
}

impl VerifyError {
    fn unauthenticated(message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            kind: FailureKind::Unauthenticated,
            message: message.into(),
        }
    }

    pub fn kind(&self) -> FailureKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

/// Verifies one decision. `received_at` is the receipt its age is measured
/// from: now for a delivery from upstream or a replay, the first receipt a
/// valid hop MAC vouches for on a retry copy (CONTRACT 4.1), so a decision
/// that was in time when it arrived stays in time through its retries.
///
/// A date more than [`MAX_FUTURE`] ahead is refused before any signature
/// is computed; staleness is judged only once a signature verified, so
/// `stale` always means "authentic, but too old" and an operator may
/// replay it under a raised maximum age.
pub fn verify(
    keys: &Keys,
    headers: SignatureHeaders<'_>,
    body: &[u8],
    received_at: OffsetDateTime,
    max_age: Duration,
) -> Result<Verified, VerifyError> {
    let claim = Claim::read(keys, headers, body, received_at)?;
    let key = match_hmac(keys, &claim.signed, claim.signature)
        .or_else(|| match_ed25519(keys, &claim.signed, claim.signature));
    claim.judge(key, max_age)
}

/// [`verify`], with the common Ed25519 case (one `v1a` entry, one Ed25519
/// key) checked in a batch with the signatures of the other deliveries
/// being verified at the same moment. The verdict is [`verify`]'s.
pub async fn verify_batched(
    batcher: &Batcher,
    keys: &Keys,
    headers: SignatureHeaders<'_>,
    body: &[u8],
    received_at: OffsetDateTime,
    max_age: Duration,
) -> Result<Verified, VerifyError> {
    let claim = Claim::read(keys, headers, body, received_at)?;
    let key = match match_hmac(keys, &claim.signed, claim.signature) {
        Some(key) => Some(key),
        None => match lone_ed25519(keys, claim.signature) {
            Some((position, key, signature)) => batcher
                .verify(claim.signed.to_vec(), signature, key)
                .await
                .then_some(position),
            None => match_ed25519(keys, &claim.signed, claim.signature),
        },
    };
    claim.judge(key, max_age)
}

/// What a delivery claims, once its headers were read and its date is not
/// too far ahead: everything but the signature check itself.
struct Claim<'a> {
    signed: Signed<'a>,
    signature: &'a str,
    signed_at: i64,
    signed_time: OffsetDateTime,
    received: i64,
}

impl<'a> Claim<'a> {
    fn read(
        keys: &Keys,
        headers: SignatureHeaders<'a>,
        body: &'a [u8],
        received_at: OffsetDateTime,
    ) -> Result<Self, VerifyError> {
        let id = headers
            .id
            .ok_or(VerifyError::unauthenticated("no webhook-id header"))?;
        if !valid_id(id) {
            return Err(VerifyError::unauthenticated(
                "webhook-id is not 1 to 64 characters of A-Z, a-z, 0-9, _ and -",
            ));
        }
        let timestamp = headers
            .timestamp
            .ok_or(VerifyError::unauthenticated("no webhook-timestamp header"))?;
        let (signed_at, signed_time) =
            parse_timestamp(timestamp).ok_or(VerifyError::unauthenticated(
                "webhook-timestamp is not Unix seconds (decimal digits, no sign, no leading zero)",
            ))?;
        let signature = headers
            .signature
            .ok_or(VerifyError::unauthenticated("no webhook-signature header"))?;
        // Both are times `time` represents (years -9999 to 9999), so no
        // difference of their Unix seconds overflows.
        let received = received_at.unix_timestamp();
        let ahead = signed_at - received;
        if ahead > secs(MAX_FUTURE) {
            return Err(VerifyError::unauthenticated(format!(
                "signed {ahead} s in the future, more than the {} s of clock skew allowed",
                MAX_FUTURE.as_secs()
            )));
        }
        if keys.is_empty() {
            return Err(VerifyError::unauthenticated(
                "no trusted key is configured (APPROVAL_AUTH__KEYS)",
            ));
        }
        if signature.len() > MAX_SIGNATURE_LEN {
            return Err(VerifyError::unauthenticated(format!(
                "webhook-signature is longer than {MAX_SIGNATURE_LEN} bytes"
            )));
        }
        if entries(signature).nth(MAX_ENTRIES).is_some() {
            return Err(VerifyError::unauthenticated(format!(
                "webhook-signature has more than {MAX_ENTRIES} entries"
            )));
        }
        Ok(Self {
            signed: Signed {
                id,
                timestamp,
                body,
            },
            signature,
            signed_at,
            signed_time,
            received,
        })
    }

    /// The verdict, given the position of the key that verified (if any).
    fn judge(self, key: Option<usize>, max_age: Duration) -> Result<Verified, VerifyError> {
        let key = key.ok_or(VerifyError::unauthenticated(
            "no signature entry verifies with a configured key",
        ))?;
        let age = self.received - self.signed_at;
        if age > secs(max_age) {
            return Err(VerifyError {
                kind: FailureKind::Stale,
                message: format!(
                    "signed {age} s before it was received, more than the maximum age of {} s",
                    max_age.as_secs()
                )
                .into(),
            });
        }
        Ok(Verified {
            signed_at: self.signed_time,
            key,
        })
    }
}

/// The parts of the signed bytes, hashed in turn rather than copied
/// together (a body is up to 64 KiB).
struct Signed<'a> {
    id: &'a str,
    timestamp: &'a str,
    body: &'a [u8],
}

impl Signed<'_> {
    fn feed(&self, mac: &mut HmacSha256) {
        mac.update(self.id.as_bytes());
        mac.update(b".");
        mac.update(self.timestamp.as_bytes());
        mac.update(b".");
        mac.update(self.body);
    }

    fn to_vec(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(self.id.len() + self.timestamp.len() + 2 + self.body.len());
        out.extend_from_slice(self.id.as_bytes());
        out.push(b'.');
        out.extend_from_slice(self.timestamp.as_bytes());
        out.push(b'.');
        out.extend_from_slice(self.body);
        out
    }
}

/// The non-empty entries of a `webhook-signature`, split at spaces.
fn entries(signature: &str) -> impl Iterator<Item = &str> {
    signature.split(' ').filter(|e| !e.is_empty())
}

/// The decoded signatures of one version. An entry that does not decode
/// to `N` bytes cannot verify and is skipped; decoding into a fixed
/// buffer refuses an oversized one without allocating.
fn decoded<'a, const N: usize>(
    signature: &'a str,
    version: &'a str,
) -> impl Iterator<Item = [u8; N]> + 'a {
    entries(signature).filter_map(move |entry| {
        let (v, b64) = entry.split_once(',')?;
        if v != version {
            return None;
        }
        // Room for the decoder's estimate of a correct entry, no more.
        let mut buf = [0u8; 68];
        let len = B64.decode_slice(b64, &mut buf).ok()?;
        <[u8; N]>::try_from(&buf[..len]).ok()
    })
}

/// The position of an HMAC key that made one of the `v1` entries. Each
/// key hashes the message once; each entry is checked against that state
/// with `verify_slice`, a constant-time comparison of the whole tag.
fn match_hmac(keys: &Keys, signed: &Signed<'_>, signature: &str) -> Option<usize> {
    if keys.hmac.is_empty() || decoded::<32>(signature, "v1").next().is_none() {
        return None;
    }
    keys.hmac.iter().find_map(|(position, key)| {
        let mut mac = key.clone();
        signed.feed(&mut mac);
        decoded::<32>(signature, "v1")
            .any(|tag| mac.clone().verify_slice(&tag).is_ok())
            .then_some(*position)
    })
}

/// The position of an Ed25519 key that made one of the `v1a` entries,
/// within [`MAX_ED25519_CHECKS`] verifications. RFC 8032 verification, as
/// the Standard Webhooks reference libraries do it (a non-canonical `s` is
/// refused): weak public keys are refused when the keys are parsed, which
/// is what forgery resistance needs, so `verify_strict`'s extra checks
/// against malleated signatures (a third of the cost of a verification on
/// the hot path, measured) buy nothing here: a signature is no identifier.
fn match_ed25519(keys: &Keys, signed: &Signed<'_>, signature: &str) -> Option<usize> {
    if keys.ed25519.is_empty() {
        return None;
    }
    let mut message = None;
    let mut checks = 0;
    for bytes in decoded::<64>(signature, "v1a") {
        let sig = ed25519_dalek::Signature::from_bytes(&bytes);
        let message: &Vec<u8> = message.get_or_insert_with(|| signed.to_vec());
        for (position, key) in &keys.ed25519 {
            if checks == MAX_ED25519_CHECKS {
                return None;
            }
            checks += 1;
            if ed25519_dalek::Verifier::verify(key, message, &sig).is_ok() {
                return Some(*position);
            }
        }
    }
    None
}

/// The one (entry, key) pair to check when there is one `v1a` entry that
/// decodes and one Ed25519 key: the case a batch takes. Any other number
/// of candidates takes [`match_ed25519`], with its bound and its order.
fn lone_ed25519(
    keys: &Keys,
    signature: &str,
) -> Option<(usize, ed25519_dalek::VerifyingKey, ed25519_dalek::Signature)> {
    let [(position, key)] = keys.ed25519.as_slice() else {
        return None;
    };
    let mut candidates = decoded::<64>(signature, "v1a");
    let bytes = candidates.next()?;
    if candidates.next().is_some() {
        return None;
    }
    Some((
        *position,
        *key,
        ed25519_dalek::Signature::from_bytes(&bytes),
    ))
}

/// Unix seconds as the reference libraries write them: decimal digits,
/// no sign, no leading zero, so the bytes signed are the bytes parsed.
/// `None` also past the year 9999.
fn parse_timestamp(s: &str) -> Option<(i64, OffsetDateTime)> {
    let canonical = (1..=MAX_TIMESTAMP_DIGITS).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_digit())
        && (s.len() == 1 || !s.starts_with('0'));
    if !canonical {
        return None;
    }
    let ts = s.parse().ok()?;
    Some((ts, OffsetDateTime::from_unix_timestamp(ts).ok()?))
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

impl Verified {
    /// Issue 14 item 2: where the broker stamps each message at ingress
    /// (RabbitMQ 3.12+ `message_interceptors.incoming.set_header_timestamp`,
    /// header `timestamp_in_ms`), the signature must be within
    /// [`MAX_FUTURE`] of that stamp either way: a decision signed long
    /// before it reached the broker was held back by someone.
    pub fn check_ingress(&self, stamped_at: OffsetDateTime) -> Result<(), VerifyError> {
        let apart = stamped_at.unix_timestamp() - self.signed_at.unix_timestamp();
        if apart.unsigned_abs() > MAX_FUTURE.as_secs() {
            let (n, when) = if apart > 0 {
                (apart, "before")
            } else {
                (-apart, "after")
            };
            return Err(VerifyError::unauthenticated(format!(
                "signed {n} s {when} the broker received it, more than the {} s allowed",
                MAX_FUTURE.as_secs()
            )));
        }
        Ok(())
    }
}

/// The three headers to publish with a body, as `sign` prints them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SignedHeaders {
    #[serde(rename = "webhook-id")]
    pub id: String,
    #[serde(rename = "webhook-timestamp")]
    pub timestamp: String,
    #[serde(rename = "webhook-signature")]
    pub signature: String,
}

impl SignedHeaders {
    pub fn as_headers(&self) -> SignatureHeaders<'_> {
        SignatureHeaders {
            id: Some(&self.id),
            timestamp: Some(&self.timestamp),
            signature: Some(&self.signature),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("no signing key given")]
    NoKeys,
    #[error("a webhook-id is 1 to 64 characters of A-Z, a-z, 0-9, _ and -")]
    BadId,
    #[error("a webhook-timestamp is Unix seconds from 0 to 253402300799 (year 9999)")]
    BadTimestamp,
}

/// Signs `body` with every key, one entry each, in the order given.
pub fn sign(
    keys: &[SigningKey],
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> Result<SignedHeaders, SignError> {
    if keys.is_empty() {
        return Err(SignError::NoKeys);
    }
    if !valid_id(id) {
        return Err(SignError::BadId);
    }
    if timestamp < 0 || OffsetDateTime::from_unix_timestamp(timestamp).is_err() {
        return Err(SignError::BadTimestamp);
    }
    let timestamp = timestamp.to_string();
    let signed = Signed {
        id,
        timestamp: &timestamp,
        body,
    };
    let mut message = None;
    let entries: Vec<String> = keys
        .iter()
        .map(|key| match key {
            SigningKey::Hmac(key) => {
                let mut mac = key.clone();
                signed.feed(&mut mac);
                format!("v1,{}", B64.encode(mac.finalize().into_bytes()))
            }
            SigningKey::Ed25519(key) => {
                let message: &Vec<u8> = message.get_or_insert_with(|| signed.to_vec());
                let signature = ed25519_dalek::Signer::sign(key, message);
                format!("v1a,{}", B64.encode(signature.to_bytes()))
            }
        })
        .collect();
    Ok(SignedHeaders {
        id: id.to_owned(),
        timestamp,
        signature: entries.join(" "),
    })
}

/// A fresh `webhook-id`: `msg_` and 128 random bits, within the pattern.
pub fn random_id() -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!("msg_{}", URL_SAFE_NO_PAD.encode(random_bytes::<16>()))
}

/// `[A-Za-z0-9_-]{1,64}`: never a `.`, which would let the id and the
/// timestamp trade bytes within the signed string.
fn valid_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::Signer;

    use super::*;
    use crate::authn::keys::{generate_ed25519, generate_secret};

    // Published vectors of the Standard Webhooks reference libraries
    // (github.com/standard-webhooks/standard-webhooks): the HMAC one from
    // libraries/python/tests/test_webhooks.py (test_sign_function), the
    // Ed25519 one from libraries/go/webhook_asymmetric_test.go
    // (TestAsymmetricWebhookSign). Both sign the same message.
    const VECTOR_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const VECTOR_TS: i64 = 1_614_265_330;
    const VECTOR_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const VECTOR_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const VECTOR_V1: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
    const VECTOR_SEED: &str = "whsk_VEVTVFNJR05JTkdLRVlET05PVFVTRVRISVNGT1JBTlk=";
    /// The seed's public key (derived with Python's `cryptography`).
    const VECTOR_PUBLIC: &str = "whpk_ZlN4eg7dSSqi0moX9hQUk3orrOouK3QVQSlJa248c/g=";
    const VECTOR_V1A: &str = "v1a,tQ9V2XOqn7jL/DQenEFpqIugdBVtiMmER5mhSkXBNwM0mkATuDe6KYYUuxqtaiHeYGb7KaaBRdM5WqyeFiL8Ag==";

    const DAY: Duration = Duration::from_secs(86_400);

    /// Every test below verifies both ways, [`super::verify`] and
    /// [`verify_batched`], and requires the same verdict of both.
    fn verify(
        keys: &Keys,
        headers: SignatureHeaders<'_>,
        body: &[u8],
        received_at: OffsetDateTime,
        max_age: Duration,
    ) -> Result<Verified, VerifyError> {
        let single = super::verify(keys, headers, body, received_at, max_age);
        let batched = runtime().block_on(verify_batched(
            &Batcher::default(),
            keys,
            headers,
            body,
            received_at,
            max_age,
        ));
        assert_eq!(single, batched, "verify and verify_batched disagree");
        single
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    fn at(ts: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(ts).unwrap()
    }

    fn keys(list: &[&str]) -> Keys {
        Keys::parse(list).unwrap()
    }

    fn headers<'a>(id: &'a str, ts: &'a str, sig: &'a str) -> SignatureHeaders<'a> {
        SignatureHeaders {
            id: Some(id),
            timestamp: Some(ts),
            signature: Some(sig),
        }
    }

    fn check(keys: &Keys, sig: &str, body: &[u8]) -> Result<Verified, VerifyError> {
        verify(
            keys,
            headers(VECTOR_ID, "1614265330", sig),
            body,
            at(VECTOR_TS),
            DAY,
        )
    }

    fn unauthenticated(result: Result<Verified, VerifyError>) -> String {
        let e = result.expect_err("passed, but must not");
        assert_eq!(e.kind(), FailureKind::Unauthenticated, "{e}");
        e.to_string()
    }

    /// A well-formed signature nobody made: 64 bytes as an Ed25519 entry.
    fn bogus_v1a(n: u8) -> String {
        format!("v1a,{}", B64.encode([n; 64]))
    }

    #[test]
    fn the_spec_hmac_vector_signs_and_verifies() {
        let signing = SigningKey::parse_all([VECTOR_SECRET]).unwrap();
        let signed = sign(&signing, VECTOR_ID, VECTOR_TS, VECTOR_BODY).unwrap();
        assert_eq!(signed.signature, VECTOR_V1);
        assert_eq!(signed.timestamp, "1614265330");
        let verified = check(&keys(&[VECTOR_SECRET]), VECTOR_V1, VECTOR_BODY).unwrap();
        assert_eq!(verified.signed_at, at(VECTOR_TS));
        assert_eq!(verified.key, 1);
    }

    #[test]
    fn the_spec_ed25519_vector_signs_and_verifies() {
        let signing = SigningKey::parse_all([VECTOR_SEED]).unwrap();
        let signed = sign(&signing, VECTOR_ID, VECTOR_TS, VECTOR_BODY).unwrap();
        assert_eq!(signed.signature, VECTOR_V1A);
        let verified = check(
            &keys(&[VECTOR_SECRET, VECTOR_PUBLIC]),
            VECTOR_V1A,
            VECTOR_BODY,
        );
        assert_eq!(verified.unwrap().key, 2);
    }

    #[test]
    fn a_generated_ed25519_pair_round_trips_and_a_foreign_one_fails() {
        use secrecy::ExposeSecret;
        let (seed, public) = generate_ed25519();
        let signing = SigningKey::parse_all([seed.expose_secret()]).unwrap();
        let signed = sign(&signing, "msg_1", VECTOR_TS, b"{}").unwrap();
        let now = at(VECTOR_TS + 1);
        verify(&keys(&[&public]), signed.as_headers(), b"{}", now, DAY).unwrap();
        let (_, other) = generate_ed25519();
        unauthenticated(verify(
            &keys(&[&other]),
            signed.as_headers(),
            b"{}",
            now,
            DAY,
        ));
    }

    #[test]
    fn several_keys_give_several_entries_each_verifying_alone() {
        let signing = SigningKey::parse_all([VECTOR_SEED, VECTOR_SECRET]).unwrap();
        let signed = sign(&signing, VECTOR_ID, VECTOR_TS, VECTOR_BODY).unwrap();
        assert_eq!(signed.signature, format!("{VECTOR_V1A} {VECTOR_V1}"));
        for key in [VECTOR_PUBLIC, VECTOR_SECRET] {
            check(&keys(&[key]), &signed.signature, VECTOR_BODY).unwrap();
        }
    }

    #[test]
    fn unsigned_is_unauthenticated() {
        let k = keys(&[VECTOR_SECRET]);
        let mut h = headers(VECTOR_ID, "1614265330", VECTOR_V1);
        h.signature = None;
        let e = unauthenticated(verify(&k, h, VECTOR_BODY, at(VECTOR_TS), DAY));
        assert!(e.contains("webhook-signature"), "{e}");
        unauthenticated(check(&k, "", VECTOR_BODY));
        unauthenticated(check(&k, "   ", VECTOR_BODY));
    }

    #[test]
    fn a_signature_by_an_unknown_key_is_unauthenticated() {
        use secrecy::ExposeSecret;
        let other = generate_secret();
        let e = unauthenticated(check(
            &keys(&[other.expose_secret()]),
            VECTOR_V1,
            VECTOR_BODY,
        ));
        assert!(e.contains("no signature entry verifies"), "{e}");
        unauthenticated(check(&keys(&[VECTOR_SECRET]), VECTOR_V1A, VECTOR_BODY));
    }

    #[test]
    fn no_configured_key_lets_nothing_pass() {
        let e = unauthenticated(check(&Keys::default(), VECTOR_V1, VECTOR_BODY));
        assert!(e.contains("no trusted key"), "{e}");
    }

    #[test]
    fn a_body_changed_by_one_byte_fails_either_scheme() {
        let both = keys(&[VECTOR_SECRET, VECTOR_PUBLIC]);
        let changed = br#"{"test": 2432232315}"#;
        unauthenticated(check(&both, VECTOR_V1, changed));
        unauthenticated(check(&both, VECTOR_V1A, changed));
        // The id and the timestamp are signed too.
        let h = headers("msg_p5jXN8AQM9LWM0D4loKWxJeK", "1614265330", VECTOR_V1);
        unauthenticated(verify(&both, h, VECTOR_BODY, at(VECTOR_TS), DAY));
        let h = headers(VECTOR_ID, "1614265331", VECTOR_V1A);
        unauthenticated(verify(&both, h, VECTOR_BODY, at(VECTOR_TS), DAY));
    }

    #[test]
    fn two_entries_pass_when_only_the_second_verifies() {
        let both = keys(&[VECTOR_SECRET, VECTOR_PUBLIC]);
        let bad_v1 = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=";
        check(&both, &format!("{bad_v1} {VECTOR_V1}"), VECTOR_BODY).unwrap();
        check(
            &both,
            &format!("{} {VECTOR_V1A}", bogus_v1a(7)),
            VECTOR_BODY,
        )
        .unwrap();
        check(&both, &format!("{bad_v1}  {VECTOR_V1A}"), VECTOR_BODY).unwrap();
        // Unknown versions are skipped, not fatal.
        check(&both, &format!("v2,abc v1b,xyz {VECTOR_V1}"), VECTOR_BODY).unwrap();
    }

    #[test]
    fn the_key_that_verified_is_reported() {
        use secrecy::ExposeSecret;
        let other = generate_secret();
        let k = keys(&[other.expose_secret(), VECTOR_PUBLIC, VECTOR_SECRET]);
        assert_eq!(check(&k, VECTOR_V1, VECTOR_BODY).unwrap().key, 3);
        assert_eq!(check(&k, VECTOR_V1A, VECTOR_BODY).unwrap().key, 2);
    }

    #[test]
    fn older_than_the_maximum_age_is_stale_only_when_authentic() {
        let k = keys(&[VECTOR_SECRET]);
        let h = headers(VECTOR_ID, "1614265330", VECTOR_V1);
        let limit = at(VECTOR_TS + 86_400);
        verify(&k, h, VECTOR_BODY, limit, DAY).unwrap();
        let late = limit + time::Duration::seconds(1);
        let e = verify(&k, h, VECTOR_BODY, late, DAY).unwrap_err();
        assert_eq!(e.kind(), FailureKind::Stale, "{e}");
        assert!(e.message().contains("86401 s"), "{e}");
        // An old date on a forged signature is no authentic old decision.
        let forged = headers(
            VECTOR_ID,
            "1614265330",
            "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
        );
        unauthenticated(verify(&k, forged, VECTOR_BODY, late, DAY));
    }

    #[test]
    fn more_than_300_s_ahead_is_unauthenticated() {
        let k = keys(&[VECTOR_SECRET]);
        let h = headers(VECTOR_ID, "1614265330", VECTOR_V1);
        verify(&k, h, VECTOR_BODY, at(VECTOR_TS - 300), DAY).unwrap();
        let e = unauthenticated(verify(&k, h, VECTOR_BODY, at(VECTOR_TS - 301), DAY));
        assert!(e.contains("future"), "{e}");
    }

    #[test]
    fn malformed_headers_are_unauthenticated_and_never_echoed() {
        let k = keys(&[VECTOR_SECRET]);
        let ok = headers(VECTOR_ID, "1614265330", VECTOR_V1);
        let long_id = "a".repeat(65);
        let cases: Vec<(SignatureHeaders<'_>, &str)> = vec![
            (SignatureHeaders { id: None, ..ok }, "webhook-id"),
            (SignatureHeaders { id: Some(""), ..ok }, "webhook-id"),
            (
                SignatureHeaders {
                    id: Some("msg.1"),
                    ..ok
                },
                "webhook-id",
            ),
            (
                SignatureHeaders {
                    id: Some("msg 1"),
                    ..ok
                },
                "webhook-id",
            ),
            (
                SignatureHeaders {
                    id: Some(&long_id),
                    ..ok
                },
                "webhook-id",
            ),
            (
                SignatureHeaders {
                    timestamp: None,
                    ..ok
                },
                "webhook-timestamp",
            ),
            (
                SignatureHeaders {
                    timestamp: Some("hello"),
                    ..ok
                },
                "webhook-timestamp",
            ),
            (
                SignatureHeaders {
                    timestamp: Some("-1614265330"),
                    ..ok
                },
                "webhook-timestamp",
            ),
            (
                SignatureHeaders {
                    timestamp: Some("01614265330"),
                    ..ok
                },
                "webhook-timestamp",
            ),
            (
                SignatureHeaders {
                    timestamp: Some("1614265330.0"),
                    ..ok
                },
                "webhook-timestamp",
            ),
            (
                SignatureHeaders {
                    timestamp: Some(" 1614265330"),
                    ..ok
                },
                "webhook-timestamp",
            ),
            (
                SignatureHeaders {
                    timestamp: Some("9999999999999"),
                    ..ok
                },
                "webhook-timestamp",
            ),
            (
                SignatureHeaders {
                    timestamp: Some("999999999999"),
                    ..ok
                },
                "webhook-timestamp",
            ),
            (
                SignatureHeaders {
                    timestamp: Some(""),
                    ..ok
                },
                "webhook-timestamp",
            ),
        ];
        for (h, expected) in cases {
            let e = unauthenticated(verify(&k, h, VECTOR_BODY, at(VECTOR_TS), DAY));
            assert!(e.contains(expected), "{h:?}: {e}");
            assert!(
                !e.contains("1614265330") && !e.contains("msg"),
                "{h:?}: {e} echoes a header"
            );
        }
        for sig in [
            "v1",
            "v1,",
            "v1a,",
            "v1,!!!!",
            "v1g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            "v1a,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            ",",
        ] {
            unauthenticated(check(&k, sig, VECTOR_BODY));
        }
    }

    #[test]
    fn a_truncated_or_altered_tag_fails_so_the_compare_is_whole() {
        let k = keys(&[VECTOR_SECRET]);
        let tag = B64.decode(&VECTOR_V1[3..]).unwrap();
        let truncated = format!("v1,{}", B64.encode(&tag[..16]));
        unauthenticated(check(&k, &truncated, VECTOR_BODY));
        let mut last = tag.clone();
        last[31] ^= 1;
        unauthenticated(check(&k, &format!("v1,{}", B64.encode(&last)), VECTOR_BODY));
        let longer = [tag.as_slice(), &[0]].concat();
        unauthenticated(check(
            &k,
            &format!("v1,{}", B64.encode(&longer)),
            VECTOR_BODY,
        ));
    }

    #[test]
    fn more_than_sixteen_entries_are_refused_whole() {
        let k = keys(&[VECTOR_SECRET]);
        let filler = vec!["v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc="; MAX_ENTRIES - 1];
        check(
            &k,
            &format!("{} {VECTOR_V1}", filler.join(" ")),
            VECTOR_BODY,
        )
        .unwrap();
        let e = unauthenticated(check(
            &k,
            &format!("{VECTOR_V1} {} v2,x", filler.join(" ")),
            VECTOR_BODY,
        ));
        assert!(e.contains("16"), "{e}");
    }

    #[test]
    fn a_signature_longer_than_a_copy_carries_is_refused() {
        let k = keys(&[VECTOR_SECRET]);
        let longest = format!(
            "{VECTOR_V1}{}",
            " ".repeat(MAX_SIGNATURE_LEN - VECTOR_V1.len())
        );
        check(&k, &longest, VECTOR_BODY).unwrap();
        let e = unauthenticated(check(&k, &format!("{longest} "), VECTOR_BODY));
        assert!(e.contains("longer than"), "{e}");
    }

    #[test]
    fn ed25519_checks_per_message_are_bounded() {
        use secrecy::ExposeSecret;
        let (_, a) = generate_ed25519();
        let (_, b) = generate_ed25519();
        // The right key last: each bogus entry costs three checks.
        let k = keys(&[&a, &b, VECTOR_PUBLIC]);
        let entries = |bogus: u8| {
            let mut e: Vec<String> = (0..bogus).map(bogus_v1a).collect();
            e.push(VECTOR_V1A.to_owned());
            e.join(" ")
        };
        // 9 x 3 + 3 = 30 checks: within the bound.
        check(&k, &entries(9), VECTOR_BODY).unwrap();
        // 11 x 3 + 3 = 36: the valid entry is never reached.
        unauthenticated(check(&k, &entries(11), VECTOR_BODY));
        // HMAC entries are cheap and do not spend the Ed25519 budget.
        let secret = generate_secret();
        let k = keys(&[secret.expose_secret(), VECTOR_SECRET]);
        let mut e: Vec<String> = (0..15)
            .map(|n| format!("v1,{}", B64.encode([n; 32])))
            .collect();
        e.push(VECTOR_V1.to_owned());
        check(&k, &e.join(" "), VECTOR_BODY).unwrap();
    }

    #[test]
    fn the_ingress_stamp_must_be_within_300_s_of_the_signature() {
        let v = check(&keys(&[VECTOR_SECRET]), VECTOR_V1, VECTOR_BODY).unwrap();
        v.check_ingress(at(VECTOR_TS + 300)).unwrap();
        v.check_ingress(at(VECTOR_TS - 300)).unwrap();
        let e = v.check_ingress(at(VECTOR_TS + 301)).unwrap_err();
        assert_eq!(e.kind(), FailureKind::Unauthenticated);
        assert!(v.check_ingress(at(VECTOR_TS - 301)).is_err());
    }

    #[test]
    fn sign_refuses_what_verify_would() {
        let signing = SigningKey::parse_all([VECTOR_SECRET]).unwrap();
        assert_eq!(sign(&[], "msg_1", VECTOR_TS, b"{}"), Err(SignError::NoKeys));
        assert_eq!(
            sign(&signing, "msg.1", VECTOR_TS, b"{}"),
            Err(SignError::BadId)
        );
        assert_eq!(sign(&signing, "", VECTOR_TS, b"{}"), Err(SignError::BadId));
        assert_eq!(
            sign(&signing, "msg_1", -1, b"{}"),
            Err(SignError::BadTimestamp)
        );
        assert_eq!(
            sign(&signing, "msg_1", 253_402_300_800, b"{}"),
            Err(SignError::BadTimestamp)
        );
    }

    #[test]
    fn random_ids_match_the_pattern_and_differ() {
        let a = random_id();
        assert!(valid_id(&a), "{a}");
        assert_ne!(a, random_id());
    }

    #[test]
    fn ed25519_signatures_match_the_library_directly() {
        use secrecy::ExposeSecret;
        let (seed, _) = generate_ed25519();
        let Ok(SigningKey::Ed25519(key)) = SigningKey::parse(seed.expose_secret()) else {
            panic!("seed does not parse");
        };
        let signing = SigningKey::parse_all([seed.expose_secret()]).unwrap();
        let signed = sign(&signing, "msg_2", VECTOR_TS, b"{\"a\":1}").unwrap();
        let expected = key.sign(b"msg_2.1614265330.{\"a\":1}");
        assert_eq!(
            signed.signature,
            format!("v1a,{}", B64.encode(expected.to_bytes()))
        );
    }

    #[test]
    fn concurrent_decisions_in_one_batch_get_the_verdicts_verify_gives() {
        use secrecy::ExposeSecret;
        let (seed, public) = generate_ed25519();
        let secret = generate_secret();
        let k = keys(&[secret.expose_secret(), &public]);
        let signing = SigningKey::parse_all([seed.expose_secret()]).unwrap();
        let hmac = SigningKey::parse_all([secret.expose_secret()]).unwrap();
        let (_, foreign) = generate_ed25519();
        let foreign = keys(&[&foreign]);
        let now = at(VECTOR_TS + 10);
        // Valid Ed25519 and HMAC, a changed body, a foreign signature, a
        // stale one, one with two entries (the single path), in turn.
        let cases: Vec<(SignedHeaders, Vec<u8>)> = (0..96)
            .map(|i| {
                let body = format!("{{\"n\":{i}}}").into_bytes();
                let id = format!("msg_{i}");
                let ts = if i % 6 == 4 {
                    VECTOR_TS - 100_000
                } else {
                    VECTOR_TS
                };
                let mut signed = match i % 6 {
                    1 => sign(&hmac, &id, ts, &body).unwrap(),
                    _ => sign(&signing, &id, ts, &body).unwrap(),
                };
                match i % 6 {
                    2 => return (signed, format!("{{\"n\":{}}}", i + 1).into_bytes()),
                    3 => signed.signature = bogus_v1a(i as u8),
                    5 => signed.signature = format!("{} {}", bogus_v1a(1), signed.signature),
                    _ => {}
                }
                (signed, body)
            })
            .collect();
        let batcher = Batcher::default();
        let batched = runtime().block_on(futures_util::future::join_all(cases.iter().map(
            |(signed, body)| verify_batched(&batcher, &k, signed.as_headers(), body, now, DAY),
        )));
        for (i, ((signed, body), got)) in cases.iter().zip(batched).enumerate() {
            let expected = super::verify(&k, signed.as_headers(), body, now, DAY);
            assert_eq!(got, expected, "decision {i}");
            let kind = expected.as_ref().err().map(VerifyError::kind);
            let wanted = match i % 6 {
                0 | 1 | 5 => None,
                4 => Some(FailureKind::Stale),
                _ => Some(FailureKind::Unauthenticated),
            };
            assert_eq!(kind, wanted, "decision {i}");
            // No key of another upstream vouches for any of them.
            unauthenticated(super::verify(&foreign, signed.as_headers(), body, now, DAY));
        }
    }
}
