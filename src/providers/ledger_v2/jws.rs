//! Ledger challenge signing (PROVIDERS.md section 4).
//!
//! Ledger approves a request only when the API user answers the request's
//! challenge with a compact JWS (RFC 7515) made with its P-256 key. The bytes
//! matter: the payload must be the decoded challenge *byte for byte*, so this
//! module signs raw bytes itself instead of going through a JWT crate that
//! would re-serialize claims.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::{Signature, SigningKey};
#[cfg(test)]
use p256::ecdsa::{VerifyingKey, signature::Verifier as _};
use p256::pkcs8::DecodePrivateKey as _;

/// The protected header PyJWT emits, which Ledger's reference code uses.
/// Kept as fixed bytes so every signature carries exactly this header.
const HEADER: &[u8] = br#"{"alg":"ES256","typ":"JWT"}"#;

/// Errors of this module. Messages never quote the input: it may be a key.
#[derive(Debug, thiserror::Error)]
pub enum JwsError {
    #[error(
        "signing key is neither PEM (EC or PKCS#8 private key), hex of PEM, nor a readable file holding one"
    )]
    KeyFormat,
    #[error("signing key file cannot be read: {0}")]
    KeyFile(std::io::ErrorKind),
    #[error("signing key is not a valid P-256 private key")]
    InvalidKey,
    #[error("challenge is not valid base64")]
    ChallengeEncoding,
    #[cfg(test)]
    #[error("JWS is malformed")]
    Malformed,
    #[cfg(test)]
    #[error("JWS algorithm is not ES256")]
    Algorithm,
    #[cfg(test)]
    #[error("JWS signature does not verify")]
    BadSignature,
}

/// Loads a P-256 private key from PEM text, the hex of PEM bytes (how
/// Ledger's samples store it), or a path to a file holding either.
pub fn load_signing_key(text: &str) -> Result<SigningKey, JwsError> {
    let trimmed = text.trim();
    if let Some(key) = parse_inline(trimmed)? {
        return Ok(key);
    }
    // Not inline key material: the configuration gave a path. Only a path that
    // exists counts, so a mistyped key is reported as a format error.
    let path = Path::new(trimmed);
    if trimmed.is_empty() || !path.is_file() {
        return Err(JwsError::KeyFormat);
    }
    let contents = std::fs::read_to_string(path).map_err(|e| JwsError::KeyFile(e.kind()))?;
    parse_inline(contents.trim())?.ok_or(JwsError::KeyFormat)
}

/// `Ok(None)` when `text` looks like neither PEM nor hex, so the caller can
/// try it as a path.
fn parse_inline(text: &str) -> Result<Option<SigningKey>, JwsError> {
    if text.contains("-----BEGIN") {
        return parse_pem(text).map(Some);
    }
    if let Ok(bytes) = hex::decode(text) {
        let pem = String::from_utf8(bytes).map_err(|_| JwsError::KeyFormat)?;
        if pem.contains("-----BEGIN") {
            return parse_pem(pem.trim()).map(Some);
        }
        return Err(JwsError::KeyFormat);
    }
    Ok(None)
}

fn parse_pem(pem: &str) -> Result<SigningKey, JwsError> {
    if pem.contains("-----BEGIN EC PRIVATE KEY-----") {
        let secret = p256::SecretKey::from_sec1_pem(pem).map_err(|_| JwsError::InvalidKey)?;
        Ok(SigningKey::from(secret))
    } else if pem.contains("-----BEGIN PRIVATE KEY-----") {
        SigningKey::from_pkcs8_pem(pem).map_err(|_| JwsError::InvalidKey)
    } else {
        Err(JwsError::KeyFormat)
    }
}

/// Decodes a challenge as Ledger sends it: base64url, padded or not. Standard
/// base64 is accepted as a fallback because some samples use it.
pub fn decode_challenge(challenge: &str) -> Result<Vec<u8>, JwsError> {
    let unpadded = challenge.trim().trim_end_matches('=');
    URL_SAFE_NO_PAD
        .decode(unpadded)
        .or_else(|_| STANDARD_NO_PAD.decode(unpadded))
        .map_err(|_| JwsError::ChallengeEncoding)
}

/// Answers a Ledger challenge: compact JWS `header.payload.signature` whose
/// payload is the decoded challenge bytes unchanged, signed ES256 with a raw
/// 64-byte r||s signature.
pub fn sign_challenge(key: &SigningKey, challenge_b64url: &str) -> Result<String, JwsError> {
    let payload = decode_challenge(challenge_b64url)?;
    let mut jws = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(HEADER),
        URL_SAFE_NO_PAD.encode(&payload)
    );
    let signature: Signature = key.sign(jws.as_bytes());
    jws.push('.');
    jws.push_str(&URL_SAFE_NO_PAD.encode(signature.to_bytes()));
    Ok(jws)
}

/// Checks a compact JWS made by [`sign_challenge`] (or any ES256 signer) and
/// returns its payload bytes: the client's own round-trip check (the
/// simulator verifies with its own code, written apart).
#[cfg(test)]
pub fn verify_jws(key: &VerifyingKey, jws: &str) -> Result<Vec<u8>, JwsError> {
    let mut parts = jws.split('.');
    let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwsError::Malformed);
    };
    let header = URL_SAFE_NO_PAD
        .decode(header_b64)
        .map_err(|_| JwsError::Malformed)?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|_| JwsError::Malformed)?;
    if header.get("alg").and_then(|alg| alg.as_str()) != Some("ES256") {
        return Err(JwsError::Algorithm);
    }
    let payload = URL_SAFE_NO_PAD
        .decode(payload_b64)
        .map_err(|_| JwsError::Malformed)?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature_b64)
        .map_err(|_| JwsError::Malformed)?;
    let signature = Signature::from_slice(&signature).map_err(|_| JwsError::Malformed)?;
    // The signing input is the two segments exactly as received.
    let signing_input_len = header_b64.len() + 1 + payload_b64.len();
    key.verify(&jws.as_bytes()[..signing_input_len], &signature)
        .map_err(|_| JwsError::BadSignature)?;
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::ledger_v2::sim::DEMO_SIGNING_KEY_PEM;

    const CHALLENGE_JSON: &str =
        r#"{"antireplay":"00ff","data":{"request_id":"r1"},"type":"APPROVE_REQUEST"}"#;

    fn demo_key() -> SigningKey {
        load_signing_key(DEMO_SIGNING_KEY_PEM).expect("demo key loads")
    }

    fn to_hex(bytes: &[u8]) -> String {
        hex::encode(bytes)
    }

    #[test]
    fn sign_then_verify_returns_the_challenge_bytes() {
        let key = demo_key();
        let challenge = URL_SAFE_NO_PAD.encode(CHALLENGE_JSON);
        let jws = sign_challenge(&key, &challenge).unwrap();

        let segments: Vec<&str> = jws.split('.').collect();
        assert_eq!(segments.len(), 3);
        assert_eq!(URL_SAFE_NO_PAD.decode(segments[0]).unwrap(), HEADER);
        // The payload segment is the challenge itself (it had no padding).
        assert_eq!(segments[1], challenge);
        assert_eq!(URL_SAFE_NO_PAD.decode(segments[2]).unwrap().len(), 64);

        let payload = verify_jws(key.verifying_key(), &jws).unwrap();
        assert_eq!(payload, CHALLENGE_JSON.as_bytes());
    }

    #[test]
    fn padded_and_standard_alphabet_challenges_are_accepted() {
        let key = demo_key();
        // Bytes chosen so that standard and url-safe alphabets differ (+ and /).
        let raw = [0xfbu8, 0xff, 0xfe, 0x01];
        for encoded in [
            base64::engine::general_purpose::URL_SAFE.encode(raw),
            base64::engine::general_purpose::STANDARD.encode(raw),
        ] {
            let jws = sign_challenge(&key, &encoded).unwrap();
            assert_eq!(verify_jws(key.verifying_key(), &jws).unwrap(), raw);
        }
        assert!(matches!(
            sign_challenge(&key, "not base64!"),
            Err(JwsError::ChallengeEncoding)
        ));
    }

    #[test]
    fn a_payload_changed_by_one_byte_fails_verification() {
        let key = demo_key();
        let jws = sign_challenge(&key, &URL_SAFE_NO_PAD.encode(CHALLENGE_JSON)).unwrap();
        let segments: Vec<&str> = jws.split('.').collect();
        let mut tampered = CHALLENGE_JSON.as_bytes().to_vec();
        tampered[3] ^= 0x01;
        let forged = format!(
            "{}.{}.{}",
            segments[0],
            URL_SAFE_NO_PAD.encode(&tampered),
            segments[2]
        );
        assert!(matches!(
            verify_jws(key.verifying_key(), &forged),
            Err(JwsError::BadSignature)
        ));
    }

    #[test]
    fn another_key_or_algorithm_is_refused() {
        let key = demo_key();
        let other = SigningKey::from_slice(&[7u8; 32]).expect("a valid scalar");
        let jws = sign_challenge(&key, &URL_SAFE_NO_PAD.encode(CHALLENGE_JSON)).unwrap();
        assert!(matches!(
            verify_jws(other.verifying_key(), &jws),
            Err(JwsError::BadSignature)
        ));

        let rest = jws.split_once('.').unwrap().1;
        let hs256 = format!("{}.{rest}", URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256"}"#));
        assert!(matches!(
            verify_jws(key.verifying_key(), &hs256),
            Err(JwsError::Algorithm)
        ));
        assert!(matches!(
            verify_jws(key.verifying_key(), "a.b"),
            Err(JwsError::Malformed)
        ));
    }

    #[test]
    fn loads_pem_hex_of_pem_pkcs8_and_file_path() {
        let expected = demo_key().verifying_key().to_owned();

        let from_hex = load_signing_key(&to_hex(DEMO_SIGNING_KEY_PEM.as_bytes())).unwrap();
        assert_eq!(from_hex.verifying_key(), &expected);

        use p256::pkcs8::EncodePrivateKey as _;
        let pkcs8 = demo_key()
            .to_pkcs8_pem(p256::pkcs8::LineEnding::LF)
            .unwrap();
        assert!(pkcs8.contains("BEGIN PRIVATE KEY"));
        assert_eq!(load_signing_key(&pkcs8).unwrap().verifying_key(), &expected);

        let dir = std::env::temp_dir().join(format!("jws-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let pem_file = dir.join("key.pem");
        std::fs::write(&pem_file, DEMO_SIGNING_KEY_PEM).unwrap();
        let hex_file = dir.join("key.hex");
        std::fs::write(&hex_file, to_hex(DEMO_SIGNING_KEY_PEM.as_bytes()) + "\n").unwrap();
        for path in [&pem_file, &hex_file] {
            let loaded = load_signing_key(path.to_str().unwrap()).unwrap();
            assert_eq!(loaded.verifying_key(), &expected);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_keys_give_errors_without_key_material() {
        let garbage = "-----BEGIN EC PRIVATE KEY-----\nc2VjcmV0\n-----END EC PRIVATE KEY-----";
        let err = load_signing_key(garbage).unwrap_err();
        assert!(matches!(err, JwsError::InvalidKey));
        assert!(!err.to_string().contains("c2VjcmV0"));

        let err = load_signing_key("/definitely/not/a/key/file").unwrap_err();
        assert!(matches!(err, JwsError::KeyFormat));
        assert!(!err.to_string().contains("definitely"));
        // Hex that decodes to something other than PEM.
        assert!(matches!(
            load_signing_key("deadbeef"),
            Err(JwsError::KeyFormat)
        ));
    }
}
