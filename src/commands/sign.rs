//! `approval-worker sign`: the three signature headers of CONTRACT v2
//! section 4.1 for a decision body read on stdin, printed as one JSON
//! object, for upstream developers and for operators publishing a decision
//! by hand; `--generate` prints a fresh key instead.
//!
//! Keys come from `--key` or from `APPROVAL_SIGN__KEYS` (comma-separated).
//! The environment is the way to keep a signing key out of shell history
//! and `ps`; the variable lies outside every section the worker reads, so
//! setting it changes nothing else.

use std::{
    io::{self, Read, Write},
    process::ExitCode,
};

use secrecy::ExposeSecret;
use serde_json::json;
use time::OffsetDateTime;

use crate::{
    authn::{SigningKey, keys, sign, webhook},
    decision::MAX_BODY_BYTES,
};

// No doc comment: clap would show it instead of the subcommand's.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A signing key: whsk_<base64 32-byte Ed25519 seed> (signs v1a) or whsec_<base64 secret> (signs v1). Repeat for several entries. Prefer the environment variable: a command line stays in shell history and shows in `ps`.
    #[arg(
        long = "key",
        value_name = "KEY",
        env = "APPROVAL_SIGN__KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    keys: Vec<String>,
    /// The webhook-id, 1 to 64 of [A-Za-z0-9_-] (default: a random msg_...).
    #[arg(long)]
    id: Option<String>,
    /// The webhook-timestamp in Unix seconds (default: now).
    #[arg(long, allow_negative_numbers = true)]
    timestamp: Option<i64>,
    /// Print a fresh key instead of signing: an Ed25519 pair (whsk_ signs, whpk_ goes into APPROVAL_AUTH__KEYS) or an HMAC secret (whsec_, for both sides, or for APPROVAL_AUTH__HOP_KEY).
    #[arg(long, value_enum, value_name = "KIND", conflicts_with_all = ["id", "timestamp"])]
    generate: Option<KeyKind>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum KeyKind {
    Ed25519,
    Hmac,
}

pub fn run(args: Args) -> ExitCode {
    let result = execute(
        args,
        &mut io::stdin().lock(),
        &mut io::stdout().lock(),
        OffsetDateTime::now_utc(),
    );
    match result {
        Ok(notes) => {
            for note in notes {
                eprintln!("sign: note: {note}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sign: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The command without its process: the body from `input`, the JSON line
/// to `out`, `now` as the default timestamp. Returns notes for stderr.
fn execute(
    args: Args,
    input: &mut impl Read,
    out: &mut impl Write,
    now: OffsetDateTime,
) -> Result<Vec<&'static str>, String> {
    if let Some(kind) = args.generate {
        let line = match kind {
            KeyKind::Ed25519 => {
                let (seed, public) = keys::generate_ed25519();
                json!({"signing_key": seed.expose_secret(), "public_key": public})
            }
            KeyKind::Hmac => json!({"secret": keys::generate_secret().expose_secret()}),
        };
        writeln!(out, "{line}").map_err(|e| format!("cannot write the key: {e}"))?;
        return Ok(Vec::new());
    }
    // The error names the key's position, never its text.
    let keys = SigningKey::parse_all(&args.keys).map_err(|e| e.to_string())?;
    if keys.is_empty() {
        return Err("no signing key: set APPROVAL_SIGN__KEYS or pass --key".to_owned());
    }
    let mut body = Vec::new();
    input
        .take(MAX_BODY_BYTES as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| format!("cannot read the body on stdin: {e}"))?;
    if body.len() > MAX_BODY_BYTES {
        return Err(format!(
            "the body is over {MAX_BODY_BYTES} bytes, more than a decision may be"
        ));
    }
    let id = args.id.unwrap_or_else(webhook::random_id);
    let timestamp = args.timestamp.unwrap_or(now.unix_timestamp());
    let signed = sign(&keys, &id, timestamp, &body).map_err(|e| e.to_string())?;
    let line = serde_json::to_string(&signed).map_err(|e| e.to_string())?;
    writeln!(out, "{line}").map_err(|e| format!("cannot write the headers: {e}"))?;
    let mut notes = Vec::new();
    // `echo` adds one; the worker verifies the bytes it receives, so the
    // publisher must send this newline too.
    if body.ends_with(b"\n") {
        notes.push("the body ends with a newline, which is signed: publish it byte for byte");
    }
    Ok(notes)
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use base64::{Engine, engine::general_purpose::STANDARD};
    use clap::Parser;
    use hmac::{Hmac, KeyInit, Mac};
    use serde_json::Value;
    use sha2::Sha256;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    const BODY: &[u8] = br#"{"decision_id":"d-1","provider":"flexpay","action":"reject","target":{"reference":"T-1"},"reason":"duplicate"}"#;
    const NOW: i64 = 1_764_633_600;

    /// Runs the command as parsed from `argv`; the JSON it printed, or its error.
    fn sign_cmd(argv: &[&str], body: &[u8]) -> Result<Value, String> {
        let cli = Cli::try_parse_from([&["sign"], argv].concat()).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        let now = OffsetDateTime::from_unix_timestamp(NOW).unwrap();
        execute(cli.args, &mut Cursor::new(body), &mut out, now)?;
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 1, "one JSON line: {text}");
        Ok(serde_json::from_str(&text).unwrap())
    }

    fn field<'a>(v: &'a Value, name: &str) -> &'a str {
        v[name]
            .as_str()
            .unwrap_or_else(|| panic!("no {name} in {v}"))
    }

    fn signed_bytes(v: &Value, body: &[u8]) -> Vec<u8> {
        let prefix = format!(
            "{}.{}.",
            field(v, "webhook-id"),
            field(v, "webhook-timestamp")
        );
        [prefix.as_bytes(), body].concat()
    }

    fn entry<'a>(v: &'a Value, version: &str) -> &'a str {
        field(v, "webhook-signature")
            .split(' ')
            .find_map(|e| e.strip_prefix(version)?.strip_prefix(','))
            .unwrap_or_else(|| panic!("no {version} entry in {v}"))
    }

    /// The `v1` entry recomputed with `hmac` alone, from the secret's bytes.
    #[test]
    fn hmac_output_matches_an_independent_hmac() {
        let secret = field(&sign_cmd(&["--generate", "hmac"], b"").unwrap(), "secret").to_owned();
        let out = sign_cmd(
            &[
                "--key",
                &secret,
                "--id",
                "msg_a-1",
                "--timestamp",
                "1700000000",
            ],
            BODY,
        )
        .unwrap();
        assert_eq!(field(&out, "webhook-id"), "msg_a-1");
        assert_eq!(field(&out, "webhook-timestamp"), "1700000000");
        let raw = STANDARD
            .decode(secret.strip_prefix("whsec_").unwrap())
            .unwrap();
        let mut mac = Hmac::<Sha256>::new_from_slice(&raw).unwrap();
        mac.update(&signed_bytes(&out, BODY));
        let expected = STANDARD.encode(mac.finalize().into_bytes());
        assert_eq!(entry(&out, "v1"), expected);
    }

    /// The `v1a` entry checked with `ed25519_dalek::VerifyingKey`, from the
    /// generated `whpk_`; a changed body does not verify.
    #[test]
    fn ed25519_output_verifies_with_the_public_key_alone() {
        let pair = sign_cmd(&["--generate", "ed25519"], b"").unwrap();
        let seed = field(&pair, "signing_key");
        let public = field(&pair, "public_key").strip_prefix("whpk_").unwrap();
        let public: [u8; 32] = STANDARD.decode(public).unwrap().try_into().unwrap();
        let public = ed25519_dalek::VerifyingKey::from_bytes(&public).unwrap();
        let out = sign_cmd(&["--key", seed], BODY).unwrap();
        let sig: [u8; 64] = STANDARD
            .decode(entry(&out, "v1a"))
            .unwrap()
            .try_into()
            .unwrap();
        let sig = ed25519_dalek::Signature::from_bytes(&sig);
        public
            .verify_strict(&signed_bytes(&out, BODY), &sig)
            .expect("the v1a entry verifies");
        let mut changed = BODY.to_vec();
        changed[3] ^= 1;
        assert!(
            public
                .verify_strict(&signed_bytes(&out, &changed), &sig)
                .is_err()
        );
    }

    #[test]
    fn defaults_are_a_random_valid_id_and_now() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let a = sign_cmd(&["--key", secret], BODY).unwrap();
        let b = sign_cmd(&["--key", secret], BODY).unwrap();
        assert_eq!(field(&a, "webhook-timestamp"), NOW.to_string());
        let id = field(&a, "webhook-id");
        assert!(
            id.len() <= 64
                && id
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-'),
            "{id}"
        );
        assert_ne!(id, field(&b, "webhook-id"));
    }

    #[test]
    fn several_keys_give_one_entry_each() {
        let out = sign_cmd(
            &[
                "--key",
                "whsk_VEVTVFNJR05JTkdLRVlET05PVFVTRVRISVNGT1JBTlk=",
                "--key",
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            ],
            BODY,
        )
        .unwrap();
        let sig = field(&out, "webhook-signature");
        assert_eq!(sig.split(' ').count(), 2, "{sig}");
        assert!(sig.starts_with("v1a,") && sig.contains(" v1,"), "{sig}");
    }

    #[test]
    fn refusals_are_clear_and_echo_no_key() {
        let e = sign_cmd(&[], BODY).unwrap_err();
        assert!(e.contains("APPROVAL_SIGN__KEYS"), "{e}");
        let e = sign_cmd(
            &["--key", "whpk_ZlN4eg7dSSqi0moX9hQUk3orrOouK3QVQSlJa248c/g="],
            BODY,
        )
        .unwrap_err();
        assert!(e.contains("key 1") && !e.contains("ZlN4eg7d"), "{e}");
        let e = sign_cmd(&["--key", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw!"], BODY).unwrap_err();
        assert!(e.contains("base64") && !e.contains("MfKQ9r8"), "{e}");
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let e = sign_cmd(&["--key", secret, "--id", "d.1"], BODY).unwrap_err();
        assert!(e.contains("webhook-id"), "{e}");
        let e = sign_cmd(&["--key", secret, "--timestamp", "-5"], BODY).unwrap_err();
        assert!(e.contains("Unix seconds"), "{e}");
        let big = vec![b' '; MAX_BODY_BYTES + 1];
        let e = sign_cmd(&["--key", secret], &big).unwrap_err();
        assert!(e.contains("65536 bytes"), "{e}");
        assert!(sign_cmd(&["--key", secret], &big[1..]).is_ok());
        assert!(sign_cmd(&["--generate", "hmac", "--id", "x"], b"").is_err());
    }
}
