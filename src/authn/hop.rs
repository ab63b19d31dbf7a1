//! The hop MAC (CONTRACT v2 section 3, issue 14 item 4): the worker's own
//! `x-approval-*` headers on a copy it republishes (retry tiers, parking,
//! replay) are trusted only under an HMAC-SHA256 the worker made over them
//! and the body, with a key upstream never sees. Anyone can publish into a
//! retry queue or the parking lot through the default exchange; without
//! the key they cannot make a copy whose attempts or first receipt count.
//!
//! The MAC covers the body and a list of `(name, value)` pairs, values in
//! their canonical string form (integers in decimal), so the broker layer
//! decides which headers are carried and how AMQP types map to strings.
//! Pass every `x-approval-*` header the copy carries except
//! [`HEADER`] itself; passing the three `webhook-*` headers too ties the
//! vouched-for state to the original signature as well as to the body.
//!
//! The encoding is unambiguous: a version tag, the pair count, each name
//! and value with its length, then the body with its length, pairs sorted
//! by name then value so the order a table iterates in does not matter.

use std::fmt;

use base64::Engine;
use hmac::{KeyInit, Mac};

use super::keys::{B64, HmacSha256, KeyError, parse_secret, random_bytes};

/// The header carrying the MAC, base64.
pub const HEADER: &str = "x-approval-hop";

/// Changes whenever the encoding does, so a MAC of one never verifies
/// as another.
const TAG: &[u8] = b"approval-worker hop v1\n";

/// `APPROVAL_AUTH__HOP_KEY`: a `whsec_` secret (24 to 64 bytes, the same
/// format as an upstream HMAC key and made the same way, with
/// `approval-worker sign --generate hmac`), or [`HopKey::random`].
#[derive(Clone)]
pub struct HopKey(HmacSha256);

impl HopKey {
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        parse_secret(s).map(HopKey)
    }

    /// A key for this process alone: its copies are trusted by itself
    /// only, so replicas sharing queues need a configured key (a copy
    /// another replica consumes is then a first receipt, never more).
    pub fn random() -> Self {
        // One SHA-256 block: the most key HMAC uses without hashing it.
        let mut bytes = random_bytes::<64>();
        let mac = HmacSha256::new(&bytes.into());
        bytes.fill(0);
        HopKey(mac)
    }
}

impl fmt::Debug for HopKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HopKey([REDACTED])")
    }
}

/// The `x-approval-hop` value for a copy with this body and these headers.
pub fn hop_mac<N, V>(key: &HopKey, body: &[u8], headers: &[(N, V)]) -> String
where
    N: AsRef<str>,
    V: AsRef<str>,
{
    B64.encode(keyed(key, body, headers).finalize().into_bytes())
}

/// Whether `mac` is the hop MAC of this body and these headers, compared
/// in constant time.
pub fn verify_hop<N, V>(key: &HopKey, body: &[u8], headers: &[(N, V)], mac: &str) -> bool
where
    N: AsRef<str>,
    V: AsRef<str>,
{
    // Room for the decoder's estimate of a correct MAC; a longer value
    // fails to decode and so fails.
    let mut tag = [0u8; 36];
    let Ok(len) = B64.decode_slice(mac, &mut tag) else {
        return false;
    };
    keyed(key, body, headers).verify_slice(&tag[..len]).is_ok()
}

fn keyed<N, V>(key: &HopKey, body: &[u8], headers: &[(N, V)]) -> HmacSha256
where
    N: AsRef<str>,
    V: AsRef<str>,
{
    let mut sorted: Vec<(&str, &str)> = headers
        .iter()
        .map(|(n, v)| (n.as_ref(), v.as_ref()))
        .collect();
    sorted.sort_unstable();
    let mut mac = key.0.clone();
    mac.update(TAG);
    mac.update(&len(sorted.len()));
    for (name, value) in sorted {
        mac.update(&len(name.len()));
        mac.update(name.as_bytes());
        mac.update(&len(value.len()));
        mac.update(value.as_bytes());
    }
    mac.update(&len(body.len()));
    mac.update(body);
    mac
}

fn len(n: usize) -> [u8; 8] {
    (n as u64).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const BODY: &[u8] = br#"{"decision_id":"d-1","provider":"qonto","action":"approve"}"#;

    fn carried() -> Vec<(&'static str, &'static str)> {
        vec![
            ("x-approval-attempts", "2"),
            ("x-approval-first-received-at", "2026-12-01T10:00:00Z"),
            ("webhook-id", "msg_1"),
        ]
    }

    #[test]
    fn a_copy_verifies_under_its_key_in_any_header_order() {
        let key = HopKey::parse(KEY).unwrap();
        let mac = hop_mac(&key, BODY, &carried());
        assert!(verify_hop(&key, BODY, &carried(), &mac));
        let mut reversed = carried();
        reversed.reverse();
        assert!(verify_hop(&key, BODY, &reversed, &mac));
        assert_eq!(mac, hop_mac(&key, BODY, &reversed));
    }

    #[test]
    fn changing_the_body_or_any_carried_header_breaks_it() {
        let key = HopKey::parse(KEY).unwrap();
        let mac = hop_mac(&key, BODY, &carried());
        let mut body = BODY.to_vec();
        body[2] ^= 1;
        assert!(!verify_hop(&key, &body, &carried(), &mac));
        for i in 0..carried().len() {
            let mut changed = carried();
            let value = format!("{}0", changed[i].1);
            changed[i].1 = Box::leak(value.into_boxed_str());
            assert!(!verify_hop(&key, BODY, &changed, &mac), "{i} changed");
            let mut dropped = carried();
            dropped.remove(i);
            assert!(!verify_hop(&key, BODY, &dropped, &mac), "{i} dropped");
        }
        let mut added = carried();
        added.push(("x-approval-error-kind", "exhausted"));
        assert!(!verify_hop(&key, BODY, &added, &mac));
    }

    #[test]
    fn boundaries_between_names_values_and_body_are_unambiguous() {
        let key = HopKey::parse(KEY).unwrap();
        let a = hop_mac(&key, b"", &[("x-approval-a", "bc")]);
        assert_ne!(a, hop_mac(&key, b"", &[("x-approval-ab", "c")]));
        assert_ne!(a, hop_mac(&key, b"c", &[("x-approval-a", "b")]));
        let none: [(&str, &str); 0] = [];
        assert_ne!(
            hop_mac(&key, b"", &[("", "")]),
            hop_mac(&key, b"", &none),
            "an empty pair is still a pair"
        );
    }

    #[test]
    fn another_key_or_a_bad_mac_fails() {
        let key = HopKey::parse(KEY).unwrap();
        let mac = hop_mac(&key, BODY, &carried());
        assert!(!verify_hop(&HopKey::random(), BODY, &carried(), &mac));
        let tag = B64.decode(&mac).unwrap();
        for bad in [
            String::new(),
            "not base64!".to_owned(),
            B64.encode(&tag[..16]),
            B64.encode([tag.as_slice(), &[0]].concat()),
        ] {
            assert!(!verify_hop(&key, BODY, &carried(), &bad), "{bad:?}");
        }
    }

    #[test]
    fn random_keys_differ_and_keys_do_not_print() {
        let a = HopKey::random();
        let mac = hop_mac(&a, BODY, &carried());
        assert!(verify_hop(&a, BODY, &carried(), &mac));
        assert!(!verify_hop(&HopKey::random(), BODY, &carried(), &mac));
        assert_eq!(format!("{a:?}"), "HopKey([REDACTED])");
        assert!(HopKey::parse("whsec_c2hvcnQ=").is_err());
        assert!(HopKey::parse("whpk_ZlN4eg7dSSqi0moX9hQUk3orrOouK3QVQSlJa248c/g=").is_err());
    }
}
