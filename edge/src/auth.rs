//! LOGIN authentication: compact JWS HS256 tokens (PROTOCOL.md "Auth").
//!
//! With auth on, LOGIN is `user:token`. The token's header must say `alg: HS256`, its signature
//! must verify with the configured secret, `sub` must equal the user, `iss` the configured
//! issuer, `exp` must be in the future and `nbf` (if present) in the past, both with leeway and
//! both JSON numbers (seconds; an `exp` or `nbf` of any other type refuses the token). The
//! header and the claims must be JSON objects with no name given twice, and `alg`, `sub` and
//! `iss` strings. Anything else is refused with `AUTH_FAILED`. Each shard checks tokens with
//! its own [`Verifier`] (the HMAC keyed once).

use std::borrow::Cow;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::AuthConfig;

/// Why a token was refused (logged at debug level; the client only sees `AUTH_FAILED`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token")]
    Missing,
    #[error("token is not a compact JWS")]
    Malformed,
    #[error("alg is not HS256")]
    WrongAlg,
    #[error("bad signature")]
    BadSignature,
    #[error("sub does not match the user")]
    WrongSubject,
    #[error("wrong issuer")]
    WrongIssuer,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet")]
    NotYetValid,
    /// `exp` or `nbf` is not a JSON number.
    #[error("claim {0} is not a number")]
    BadClaimType(&'static str),
}

/// Splits a LOGIN body at the first `:` into user and optional token.
pub fn split_login(body: &[u8]) -> (&[u8], Option<&[u8]>) {
    match body.iter().position(|&b| b == b':') {
        Some(i) => (&body[..i], Some(&body[i + 1..])),
        None => (body, None),
    }
}

/// Whether `body` (a LOGIN's bytes after the opcode, all that has arrived) is exactly a user,
/// `:` and a whole HS256 compact JWS: three non-empty base64url parts, the last the 43
/// characters of a 32-byte signature, nothing after it. Such a LOGIN cannot go on in a later
/// segment, so the edge does not wait `login_settle_us` for the rest of it (with auth on, every
/// login carries one). Anything else (a token cut anywhere, bytes after it) waits as before.
pub fn is_whole_login(body: &[u8]) -> bool {
    let (user, Some(token)) = split_login(body) else {
        return false;
    };
    let b64url = |x: &[u8]| {
        !x.is_empty()
            && x.iter()
                .all(|&c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    };
    let mut parts = token.split(|&b| b == b'.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(p), Some(s), None) => {
            !user.is_empty() && b64url(h) && b64url(p) && s.len() == 43 && b64url(s)
        }
        _ => false,
    }
}

/// Verifies `token` for `user` at `now_ms` (a one-off check: keys the HMAC each call; a
/// shard keeps a [`Verifier`]).
pub fn verify(
    cfg: &AuthConfig,
    user: &[u8],
    token: Option<&[u8]>,
    now_ms: u64,
) -> Result<(), AuthError> {
    Verifier::new(cfg).verify(user, token, now_ms)
}

/// The token check of one shard: the HMAC keyed once with the secret (the key's two hashed
/// pads), cloned for each token.
#[derive(Clone)]
pub struct Verifier {
    mac: Hmac<Sha256>,
    issuer: String,
    leeway_ms: u64,
}

/// The header fields read: any other is ignored. A field given twice refuses the token.
#[derive(serde::Deserialize)]
struct Header<'a> {
    #[serde(borrow)]
    alg: Option<Cow<'a, str>>,
}

/// The claims read: any other is ignored. A claim given twice refuses the token (JSON objects
/// with repeated names are read differently by different parsers), as does a `sub`, `iss`,
/// `exp` or `nbf` of the wrong JSON type.
#[derive(serde::Deserialize)]
struct Claims<'a> {
    #[serde(borrow)]
    sub: Option<Cow<'a, str>>,
    #[serde(borrow)]
    iss: Option<Cow<'a, str>>,
    /// Present with any JSON value (`null` too, which a plain `Option` would read as absent).
    #[serde(default, deserialize_with = "present")]
    exp: Option<serde_json::Value>,
    #[serde(default, deserialize_with = "present")]
    nbf: Option<serde_json::Value>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde::Deserialize::deserialize(d).map(Some)
}

/// A JSON object read into `T`. Only an object: serde's derived structs also take an array of
/// the fields in order, which is not a JOSE header or a claims set.
fn object<'a, T: serde::Deserialize<'a>>(json: &'a [u8]) -> Result<T, AuthError> {
    if json.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(AuthError::Malformed);
    }
    serde_json::from_slice(json).map_err(|_| AuthError::Malformed)
}

/// Decodes one base64url part of a token into `stack` when it fits, else into `heap`.
fn decode_part<'b>(
    part: &str,
    stack: &'b mut [u8; 512],
    heap: &'b mut Vec<u8>,
) -> Result<&'b [u8], AuthError> {
    match URL_SAFE_NO_PAD.decode_slice(part, &mut stack[..]) {
        Ok(n) => Ok(&stack[..n]),
        Err(base64::DecodeSliceError::OutputSliceTooSmall) => {
            *heap = URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|_| AuthError::Malformed)?;
            Ok(heap)
        }
        Err(base64::DecodeSliceError::DecodeError(_)) => Err(AuthError::Malformed),
    }
}

impl Verifier {
    pub fn new(cfg: &AuthConfig) -> Self {
        Self {
            mac: Hmac::<Sha256>::new_from_slice(cfg.secret.as_bytes())
                .expect("hmac takes any key length"),
            issuer: cfg.issuer.clone(),
            leeway_ms: cfg.leeway_ms,
        }
    }

    /// Verifies `token` for `user` at `now_ms`.
    pub fn verify(&self, user: &[u8], token: Option<&[u8]>, now_ms: u64) -> Result<(), AuthError> {
        let token = token.ok_or(AuthError::Missing)?;
        let token = std::str::from_utf8(token).map_err(|_| AuthError::Malformed)?;
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed);
        };
        let (mut stack, mut heap) = ([0u8; 512], Vec::new());
        let header: Header<'_> = object(decode_part(h, &mut stack, &mut heap)?)?;
        if header.alg.as_deref() != Some("HS256") {
            return Err(AuthError::WrongAlg);
        }
        let mut sig = [0u8; 48];
        let n = URL_SAFE_NO_PAD
            .decode_slice(s, &mut sig)
            .map_err(|_| AuthError::Malformed)?;
        let mut mac = self.mac.clone();
        mac.update(h.as_bytes());
        mac.update(b".");
        mac.update(p.as_bytes());
        mac.verify_slice(&sig[..n])
            .map_err(|_| AuthError::BadSignature)?;
        let claims: Claims<'_> = object(decode_part(p, &mut stack, &mut heap)?)?;
        if claims.sub.as_deref().map(str::as_bytes) != Some(user) {
            return Err(AuthError::WrongSubject);
        }
        if claims.iss.as_deref() != Some(self.issuer.as_str()) {
            return Err(AuthError::WrongIssuer);
        }
        // RFC 7519 NumericDate: a JSON number of seconds (fractions allowed). `exp` is
        // required; `nbf` is optional, but present with any other type (a string, null, ...)
        // the token is refused like a malformed one, never silently taken as absent.
        let leeway = self.leeway_ms as f64;
        let now = now_ms as f64;
        let exp = match &claims.exp {
            Some(v) => numeric_date(v).ok_or(AuthError::BadClaimType("exp"))?,
            None => return Err(AuthError::Expired),
        };
        if exp * 1000.0 + leeway <= now {
            return Err(AuthError::Expired);
        }
        if let Some(v) = &claims.nbf {
            let nbf = numeric_date(v).ok_or(AuthError::BadClaimType("nbf"))?;
            if nbf * 1000.0 - leeway > now {
                return Err(AuthError::NotYetValid);
            }
        }
        Ok(())
    }
}

/// A NumericDate claim: a finite JSON number (integer or not), else `None`.
fn numeric_date(v: &serde_json::Value) -> Option<f64> {
    v.as_f64().filter(|f| f.is_finite())
}

/// Signs claims as an HS256 token (for tests and the load generator).
pub fn sign(secret: &[u8], claims: &serde_json::Value) -> String {
    let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let p = URL_SAFE_NO_PAD.encode(claims.to_string());
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("hmac takes any key length");
    mac.update(h.as_bytes());
    mac.update(b".");
    mac.update(p.as_bytes());
    let s = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{h}.{p}.{s}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg() -> AuthConfig {
        AuthConfig {
            enabled: true,
            secret: "0123456789abcdef0123456789abcdef".into(),
            ..AuthConfig::default()
        }
    }

    /// Only the whole `user:token` is whole: every shorter prefix (a LOGIN cut by TCP anywhere)
    /// and anything with bytes after the token waits for the settle time.
    #[test]
    fn only_a_whole_token_login_skips_the_settle_wait() {
        let token = sign(
            cfg().secret.as_bytes(),
            &json!({"sub": "alice", "iss": "iris", "exp": 4_102_444_800u64}),
        );
        let body = format!("alice:{token}").into_bytes();
        assert!(is_whole_login(&body));
        for cut in 0..body.len() {
            assert!(
                !is_whole_login(&body[..cut]),
                "cut at {cut} of {}",
                body.len()
            );
        }
        for tail in [&b"\x02"[..], b"\x03", b"0", b"A", b"."] {
            let mut more = body.clone();
            more.extend_from_slice(tail);
            assert!(!is_whole_login(&more), "with {tail:?} after the token");
        }
        assert!(!is_whole_login(format!(":{token}").as_bytes()), "no user");
        assert!(!is_whole_login(b"alice"), "no token");
    }

    #[test]
    fn good_token_passes_and_tampering_fails() {
        let c = cfg();
        let now = 1_700_000_000_000u64;
        let t = sign(
            c.secret.as_bytes(),
            &json!({"sub":"alice","iss":"iris","exp":1_700_000_100}),
        );
        assert_eq!(verify(&c, b"alice", Some(t.as_bytes()), now), Ok(()));
        assert_eq!(
            verify(&c, b"bob", Some(t.as_bytes()), now),
            Err(AuthError::WrongSubject)
        );
        let mut bad = t.clone().into_bytes();
        let n = bad.len();
        bad[n - 2] = if bad[n - 2] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            verify(&c, b"alice", Some(&bad), now),
            Err(AuthError::BadSignature)
        );
        assert_eq!(verify(&c, b"alice", None, now), Err(AuthError::Missing));
        assert_eq!(
            verify(&c, b"alice", Some(b"x.y"), now),
            Err(AuthError::Malformed)
        );
    }

    #[test]
    fn expiry_issuer_nbf_and_alg() {
        let c = cfg();
        let now = 1_700_000_000_000u64;
        let s = c.secret.as_bytes();
        let exp = sign(s, &json!({"sub":"a","iss":"iris","exp":1_699_999_000}));
        assert_eq!(
            verify(&c, b"a", Some(exp.as_bytes()), now),
            Err(AuthError::Expired)
        );
        let iss = sign(s, &json!({"sub":"a","iss":"other","exp":1_700_000_100}));
        assert_eq!(
            verify(&c, b"a", Some(iss.as_bytes()), now),
            Err(AuthError::WrongIssuer)
        );
        let nbf = sign(
            s,
            &json!({"sub":"a","iss":"iris","exp":1_700_009_000,"nbf":1_700_005_000}),
        );
        assert_eq!(
            verify(&c, b"a", Some(nbf.as_bytes()), now),
            Err(AuthError::NotYetValid)
        );
        let none_alg = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(br#"{"sub":"a"}"#)
        );
        assert_eq!(
            verify(&c, b"a", Some(none_alg.as_bytes()), now),
            Err(AuthError::WrongAlg)
        );
    }

    #[test]
    fn exp_and_nbf_must_be_numbers() {
        let c = cfg();
        let now = 1_700_000_000_000u64;
        let s = c.secret.as_bytes();
        let v = |claims: serde_json::Value| {
            let t = sign(s, &claims);
            verify(&c, b"a", Some(t.as_bytes()), now)
        };
        assert_eq!(
            v(json!({"sub":"a","iss":"iris","exp":"1700009000"})),
            Err(AuthError::BadClaimType("exp"))
        );
        assert_eq!(
            v(json!({"sub":"a","iss":"iris","exp":null})),
            Err(AuthError::BadClaimType("exp"))
        );
        for nbf in [json!("0"), json!(null), json!(true), json!([1]), json!({})] {
            assert_eq!(
                v(json!({"sub":"a","iss":"iris","exp":1_700_009_000,"nbf":nbf})),
                Err(AuthError::BadClaimType("nbf")),
                "nbf {nbf}"
            );
        }
        // Fractional seconds are NumericDates too.
        assert_eq!(
            v(json!({"sub":"a","iss":"iris","exp":1_700_009_000.5,"nbf":1_600_000_000.25})),
            Ok(())
        );
        assert_eq!(
            v(json!({"sub":"a","iss":"iris","exp":1_699_900_000.5})),
            Err(AuthError::Expired)
        );
        assert_eq!(
            v(json!({"sub":"a","iss":"iris","exp":1_700_009_000,"nbf":1_700_005_000.0})),
            Err(AuthError::NotYetValid)
        );
        assert_eq!(
            v(json!({"sub":"a","iss":"iris"})),
            Err(AuthError::Expired),
            "exp is required"
        );
    }

    /// A claim or header field given twice, and a `sub`, `iss` or `alg` that is not a string,
    /// refuse the token (correctly signed): parsers disagree on repeated names.
    #[test]
    fn repeated_and_mistyped_fields_are_refused() {
        let c = cfg();
        let now = 1_700_000_000_000u64;
        let raw = |header: &str, claims: &str| {
            let h = URL_SAFE_NO_PAD.encode(header);
            let p = URL_SAFE_NO_PAD.encode(claims);
            let mut mac = Hmac::<Sha256>::new_from_slice(c.secret.as_bytes()).unwrap();
            mac.update(format!("{h}.{p}").as_bytes());
            let s = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
            verify(&c, b"a", Some(format!("{h}.{p}.{s}").as_bytes()), now)
        };
        let good = r#"{"sub":"a","iss":"iris","exp":1700009000}"#;
        assert_eq!(raw(r#"{"alg":"HS256"}"#, good), Ok(()));
        assert_eq!(
            raw(r#"{"alg":"HS256","typ":"JWT","kid":[1]}"#, good),
            Ok(()),
            "other header fields are ignored"
        );
        for claims in [
            r#"{"sub":"b","sub":"a","iss":"iris","exp":1700009000}"#,
            r#"{"sub":"a","iss":"iris","exp":1,"exp":1700009000}"#,
            r#"{"sub":"a","iss":"iris","iss":"iris","exp":1700009000}"#,
            r#"{"sub":1,"iss":"iris","exp":1700009000}"#,
            r#"{"sub":"a","iss":["iris"],"exp":1700009000}"#,
            r#"["a","iris",1700009000]"#,
        ] {
            assert!(raw(r#"{"alg":"HS256"}"#, claims).is_err(), "{claims}");
        }
        assert_eq!(
            raw(r#"{"alg":"none","alg":"HS256"}"#, good),
            Err(AuthError::Malformed)
        );
        assert_eq!(raw(r#"{"alg":1}"#, good), Err(AuthError::Malformed));
        assert_eq!(raw(r#"["HS256"]"#, good), Err(AuthError::Malformed));
        assert_eq!(
            raw(r#" {"alg":"HS256"} "#, good),
            Ok(()),
            "whitespace around is JSON"
        );
        // Escapes in a string claim are read (an owned copy, not a borrow).
        assert_eq!(
            raw(
                r#"{"alg":"HS256"}"#,
                r#"{"sub":"\u0061","iss":"ir\u0069s","exp":1700009000}"#
            ),
            Ok(())
        );
    }

    /// One verifier serves many tokens (its keyed HMAC is cloned per token), and claims too long
    /// for the stack buffer are decoded on the heap.
    #[test]
    fn a_verifier_is_reused_and_long_claims_decode() {
        let c = cfg();
        let v = Verifier::new(&c);
        let now = 1_700_000_000_000u64;
        for user in ["a", "bob", "carol"] {
            let t = sign(
                c.secret.as_bytes(),
                &json!({"sub": user, "iss": "iris", "exp": 1_700_000_100}),
            );
            assert_eq!(v.verify(user.as_bytes(), Some(t.as_bytes()), now), Ok(()));
            assert_eq!(
                v.verify(b"mallory", Some(t.as_bytes()), now),
                Err(AuthError::WrongSubject)
            );
        }
        let long = sign(
            c.secret.as_bytes(),
            &json!({"sub": "a", "iss": "iris", "exp": 1_700_000_100, "pad": "x".repeat(2000)}),
        );
        assert!(long.len() > 2000);
        assert_eq!(v.verify(b"a", Some(long.as_bytes()), now), Ok(()));
        let other = AuthConfig {
            secret: "another secret of at least 32 bytes".into(),
            ..cfg()
        };
        assert_eq!(
            Verifier::new(&other).verify(b"a", Some(long.as_bytes()), now),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn split_at_first_colon() {
        assert_eq!(split_login(b"a:b:c"), (&b"a"[..], Some(&b"b:c"[..])));
        assert_eq!(split_login(b"alice"), (&b"alice"[..], None));
    }
}
