//! The key formats of Standard Webhooks (spec, "Signature scheme"):
//! `whpk_` and `whsk_` for an Ed25519 public key and its 32-byte seed,
//! `whsec_` for an HMAC-SHA256 secret, each followed by standard base64.
//!
//! A key is parsed once into what verification uses directly (a decoded
//! curve point, an HMAC already keyed), so no decision pays for parsing.
//! Errors name the key's position in the list and the problem, never a
//! character of the key: an error line ends up in logs and CI output.

use std::fmt;

use base64::{
    Engine, alphabet,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig},
};
use hmac::{Hmac, KeyInit};
use rand::{RngCore, rngs::OsRng};
use secrecy::SecretString;
use sha2::Sha256;

pub(crate) type HmacSha256 = Hmac<Sha256>;

pub const PUBLIC_PREFIX: &str = "whpk_";
pub const SEED_PREFIX: &str = "whsk_";
pub const SECRET_PREFIX: &str = "whsec_";

/// Each signature entry is tried against each key of its type, so the key
/// count multiplies an attacker's cost per message (webhook.rs bounds the
/// entries); sixteen leaves room for any rotation.
pub const MAX_KEYS: usize = 16;

/// Standard Webhooks asks for at least 24 random bytes and at most 64
/// (512 bits): below that a secret can be searched for, above it HMAC
/// hashes the key first and a longer one adds nothing.
const MIN_SECRET_LEN: usize = 24;
const MAX_SECRET_LEN: usize = 64;

/// Standard base64 as the reference libraries write it. Padding is
/// optional on input because some encoders drop it; the engine still
/// refuses stray trailing bits, so one encoding maps to one value.
pub(crate) const B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// What is wrong with a key, and where it is in its list (1-based).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{problem}", position.map(|p| format!("key {p}: ")).unwrap_or_default())]
pub struct KeyError {
    position: Option<usize>,
    problem: KeyProblem,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyProblem {
    #[error(
        "unknown kind: expected whpk_<base64> (Ed25519 public key) or whsec_<base64> (HMAC-SHA256 secret)"
    )]
    UnknownVerifyPrefix,
    #[error(
        "unknown kind: expected whsk_<base64> (Ed25519 seed) or whsec_<base64> (HMAC-SHA256 secret)"
    )]
    UnknownSigningPrefix,
    #[error(
        "a whsk_ signing key does not belong here: give its public key (whpk_, printed by `approval-worker sign --generate ed25519`)"
    )]
    SigningKeyGiven,
    #[error("a whpk_ public key cannot sign: give the whsk_ seed it was made from")]
    PublicKeyGiven,
    #[error("not standard base64 after the prefix")]
    Base64,
    #[error("an Ed25519 key is 32 bytes, this one decodes to {0}")]
    Ed25519Length(usize),
    #[error("not a usable Ed25519 public key (not a curve point, or one of small order)")]
    Ed25519Point,
    #[error("an HMAC secret must decode to 24 to 64 bytes, this one decodes to {0}")]
    SecretLength(usize),
    #[error("{0} keys given, at most 16 are accepted")]
    TooMany(usize),
    #[error("expected whsec_<base64>, a secret of 24 to 64 bytes")]
    NotASecret,
}

impl KeyError {
    fn at(position: usize, problem: KeyProblem) -> Self {
        Self {
            position: Some(position),
            problem,
        }
    }

    pub fn problem(&self) -> &KeyProblem {
        &self.problem
    }
}

impl From<KeyProblem> for KeyError {
    fn from(problem: KeyProblem) -> Self {
        Self {
            position: None,
            problem,
        }
    }
}

/// The trusted upstream keys (`APPROVAL_AUTH__KEYS`), split by type so a
/// signature entry is only tried against keys that could have made it.
/// Each key keeps its 1-based position in the configured list, which
/// [`super::Verified`] reports so a rotation can be watched key by key.
#[derive(Clone, Default)]
pub struct Keys {
    pub(crate) ed25519: Vec<(usize, ed25519_dalek::VerifyingKey)>,
    pub(crate) hmac: Vec<(usize, HmacSha256)>,
}

impl Keys {
    /// Parses `whpk_…` and `whsec_…` entries. Surrounding whitespace is
    /// trimmed and blank entries skipped (a trailing comma in the
    /// environment form is no key); an empty result is the caller's to
    /// judge (`check` fails on it in `enforce` mode).
    pub fn parse<I, S>(entries: I) -> Result<Self, KeyError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut keys = Keys::default();
        let mut count = 0;
        for (i, entry) in entries.into_iter().enumerate() {
            let entry = entry.as_ref().trim();
            if entry.is_empty() {
                continue;
            }
            let position = i + 1;
            count += 1;
            if let Some(b64) = entry.strip_prefix(PUBLIC_PREFIX) {
                let key = parse_public(b64).map_err(|p| KeyError::at(position, p))?;
                keys.ed25519.push((position, key));
            } else if let Some(b64) = entry.strip_prefix(SECRET_PREFIX) {
                let mac = parse_secret_b64(b64).map_err(|p| KeyError::at(position, p))?;
                keys.hmac.push((position, mac));
            } else if entry.starts_with(SEED_PREFIX) {
                return Err(KeyError::at(position, KeyProblem::SigningKeyGiven));
            } else {
                return Err(KeyError::at(position, KeyProblem::UnknownVerifyPrefix));
            }
        }
        if count > MAX_KEYS {
            return Err(KeyProblem::TooMany(count).into());
        }
        Ok(keys)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> usize {
        self.ed25519.len() + self.hmac.len()
    }
}

/// Counts only: the HMAC secrets must not reach a log line, and the public
/// keys would only make one long.
impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keys")
            .field("ed25519", &self.ed25519.len())
            .field("hmac", &self.hmac.len())
            .finish()
    }
}

/// A key `approval-worker sign` signs with: an Ed25519 seed (`whsk_`,
/// signs `v1a`) or an HMAC secret (`whsec_`, signs `v1`).
#[derive(Clone)]
pub enum SigningKey {
    Ed25519(ed25519_dalek::SigningKey),
    Hmac(HmacSha256),
}

impl SigningKey {
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let s = s.trim();
        if let Some(b64) = s.strip_prefix(SEED_PREFIX) {
            let seed = decode_32(b64)?;
            Ok(SigningKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(
                &seed,
            )))
        } else if let Some(b64) = s.strip_prefix(SECRET_PREFIX) {
            Ok(SigningKey::Hmac(parse_secret_b64(b64)?))
        } else if s.starts_with(PUBLIC_PREFIX) {
            Err(KeyProblem::PublicKeyGiven.into())
        } else {
            Err(KeyProblem::UnknownSigningPrefix.into())
        }
    }

    /// Parses each entry, skipping blank ones as [`Keys::parse`] does; an
    /// error names the entry's 1-based position.
    pub fn parse_all<I, S>(entries: I) -> Result<Vec<Self>, KeyError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        entries
            .into_iter()
            .enumerate()
            .filter(|(_, entry)| !entry.as_ref().trim().is_empty())
            .map(|(i, entry)| {
                Self::parse(entry.as_ref()).map_err(|e| KeyError::at(i + 1, e.problem))
            })
            .collect()
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SigningKey::Ed25519(_) => f.write_str("SigningKey::Ed25519([REDACTED])"),
            SigningKey::Hmac(_) => f.write_str("SigningKey::Hmac([REDACTED])"),
        }
    }
}

/// A fresh `whsec_` secret of 32 random bytes.
pub fn generate_secret() -> SecretString {
    SecretString::from(format!(
        "{SECRET_PREFIX}{}",
        B64.encode(random_bytes::<32>())
    ))
}

/// A fresh Ed25519 pair: the `whsk_` seed (secret) and its `whpk_` public key.
pub fn generate_ed25519() -> (SecretString, String) {
    let seed = random_bytes::<32>();
    let public = ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key();
    (
        SecretString::from(format!("{SEED_PREFIX}{}", B64.encode(seed))),
        format!("{PUBLIC_PREFIX}{}", B64.encode(public.as_bytes())),
    )
}

/// An HMAC keyed with a `whsec_` secret of 24 to 64 bytes.
pub(crate) fn parse_secret(s: &str) -> Result<HmacSha256, KeyError> {
    let b64 = s
        .trim()
        .strip_prefix(SECRET_PREFIX)
        .ok_or(KeyProblem::NotASecret)?;
    Ok(parse_secret_b64(b64)?)
}

fn parse_secret_b64(b64: &str) -> Result<HmacSha256, KeyProblem> {
    let mut bytes = B64.decode(b64).map_err(|_| KeyProblem::Base64)?;
    let len = bytes.len();
    let mac = if (MIN_SECRET_LEN..=MAX_SECRET_LEN).contains(&len) {
        HmacSha256::new_from_slice(&bytes).map_err(|_| KeyProblem::SecretLength(len))
    } else {
        Err(KeyProblem::SecretLength(len))
    };
    // The keyed state is to be the secret's only copy in memory.
    bytes.fill(0);
    mac
}

fn parse_public(b64: &str) -> Result<ed25519_dalek::VerifyingKey, KeyProblem> {
    let bytes = decode_32(b64)?;
    let key =
        ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|_| KeyProblem::Ed25519Point)?;
    // A small-order point verifies signatures nobody holds a key for.
    if key.is_weak() {
        return Err(KeyProblem::Ed25519Point);
    }
    Ok(key)
}

/// An Ed25519 public key or seed: exactly 32 bytes.
fn decode_32(b64: &str) -> Result<[u8; 32], KeyProblem> {
    let mut bytes = B64.decode(b64).map_err(|_| KeyProblem::Base64)?;
    let out =
        <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyProblem::Ed25519Length(bytes.len()));
    bytes.fill(0);
    out
}

pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    OsRng.fill_bytes(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    const PUBLIC: &str = "whpk_11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    #[test]
    fn parses_public_keys_and_secrets_with_their_positions() {
        let keys = Keys::parse([PUBLIC, " ", SECRET]).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys.ed25519[0].0, 1);
        assert_eq!(keys.hmac[0].0, 3);
    }

    #[test]
    fn errors_name_the_position_and_never_the_key() {
        let cases: [(&str, &str); 7] = [
            ("whsec_c2hvcnQ=", "24 to 64 bytes"),
            ("whpk_c2hvcnQ=", "32 bytes"),
            ("whsec_not*base64*at*all*secretmaterial", "base64"),
            ("sk_live_secretmaterial", "unknown kind"),
            (
                "whsk_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwMfKQ9r8GKYqr",
                "does not belong here",
            ),
            // The identity point: a public key anyone can sign for.
            (
                "whpk_AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                "small order",
            ),
            (
                "whsec_c2VjcmV0bWF0ZXJpYWxzZWNyZXRtYXRlcmlhbHNlY3JldG1hdGVyaWFsc2VjcmV0bWF0ZXJpYWxzZWNyZXRtYXRlcmlhbA==",
                "24 to 64 bytes",
            ),
        ];
        for (key, expected) in cases {
            let e = Keys::parse([SECRET, key]).unwrap_err().to_string();
            assert!(e.starts_with("key 2: "), "{key}: {e}");
            assert!(e.contains(expected), "{key}: {e}");
            let payload = key.split_once('_').map_or(key, |(_, p)| p);
            assert!(!e.contains(payload), "{e} echoes the key");
            assert!(!e.contains("secretmaterial"), "{e} echoes the key");
        }
    }

    #[test]
    fn more_than_sixteen_keys_are_refused() {
        let many = vec![SECRET; MAX_KEYS + 1];
        assert!(
            Keys::parse(&many)
                .unwrap_err()
                .to_string()
                .contains("17 keys")
        );
        assert_eq!(Keys::parse(&many[..MAX_KEYS]).unwrap().len(), MAX_KEYS);
    }

    #[test]
    fn signing_keys_take_seeds_and_secrets_not_public_keys() {
        let keys =
            SigningKey::parse_all(["whsk_VEVTVFNJR05JTkdLRVlET05PVFVTRVRISVNGT1JBTlk=", SECRET])
                .unwrap();
        assert!(matches!(keys[0], SigningKey::Ed25519(_)));
        assert!(matches!(keys[1], SigningKey::Hmac(_)));
        let e = SigningKey::parse_all([SECRET, PUBLIC]).unwrap_err();
        assert_eq!(e.problem(), &KeyProblem::PublicKeyGiven);
        assert!(e.to_string().starts_with("key 2: "));
    }

    #[test]
    fn debug_prints_no_key_material() {
        let keys = Keys::parse([PUBLIC, SECRET]).unwrap();
        let signing = SigningKey::parse(SECRET).unwrap();
        let shown = format!("{keys:?} {signing:?}");
        assert!(!shown.contains("MfKQ9r8"), "{shown}");
        assert!(shown.contains("REDACTED"), "{shown}");
    }

    #[test]
    fn generated_keys_parse_and_pair_up() {
        let (seed, public) = generate_ed25519();
        let Ok(SigningKey::Ed25519(signing)) = SigningKey::parse(seed.expose_secret()) else {
            panic!("generated seed does not parse");
        };
        let keys = Keys::parse([&public]).unwrap();
        assert_eq!(keys.ed25519[0].1, signing.verifying_key());
        let secret = generate_secret();
        assert!(Keys::parse([secret.expose_secret()]).is_ok());
        assert_ne!(
            generate_secret().expose_secret(),
            secret.expose_secret(),
            "two secrets alike"
        );
    }
}
