//! Fuzz target for LOGIN: the body delimiting rule of the decoder
//! (`iris_edge::protocol::decode`, module documentation "LOGIN") and the `user:token` split and
//! HS256 JWT check (`iris_edge::auth`). Three kinds of input, chosen by the first byte:
//!
//! - raw bytes after `0x01`: the decoder never panics and its answer is the documented rule,
//!   checked against a naive reference (the body ends at the smallest `k` whose tail is a run of
//!   complete valid non-LOGIN frames, else at the end, refused past `max_login_bytes`); the body
//!   splits into user and token losslessly, and if the token is accepted its signature is valid
//!   under the test key and its claims satisfy PROTOCOL.md "Auth";
//! - a token signed with the test key over a header and claims built from the input (claim
//!   types, values and presence all vary): `verify` accepts it exactly when an independent
//!   reading of the rules does, and any single-character change of an accepted token is
//!   refused;
//! - a printable `user:token` LOGIN followed by valid frames in the same read: the decoder
//!   splits exactly after the token, and the frames decode as they were encoded.

#![no_main]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use iris_edge::auth::{self, AuthError};
use iris_edge::config::AuthConfig;
use iris_edge::protocol::frame::ClientFrame;
use iris_edge::protocol::{decode, Decoded, Limits, MsgId};
use libfuzzer_sys::arbitrary::{Result as AResult, Unstructured};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;

const SECRET: &str = "fuzz-secret-0123456789abcdef-0123456789";
/// A fixed "now" (2023-11-14T22:13:20Z, ms), so runs are reproducible.
const NOW_MS: u64 = 1_700_000_000_000;
const LOGIN: u8 = 0x01;

fn cfg() -> AuthConfig {
    AuthConfig {
        enabled: true,
        secret: SECRET.into(),
        ..AuthConfig::default()
    }
}

fn mac(signing_input: &[u8]) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    m.update(signing_input);
    m.finalize().into_bytes().to_vec()
}

/// Whether `buf[start..]` is a non-empty run of complete, valid, non-LOGIN frames that ends
/// exactly at `buf.len()` (the naive way: decode frame after frame).
fn run_of_frames(buf: &[u8], start: usize, limits: &Limits) -> bool {
    let mut pos = start;
    if pos >= buf.len() {
        return false;
    }
    while pos < buf.len() {
        if buf[pos] == LOGIN {
            return false;
        }
        match decode(&buf[pos..], limits) {
            Ok(Decoded::Frame(_, n)) => pos += n,
            _ => return false,
        }
    }
    true
}

/// The claims rules of PROTOCOL.md "Auth" read independently of `auth::verify`.
fn claims_ok(claims: &[u8], user: &[u8], c: &AuthConfig) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(claims) else {
        return false;
    };
    let num = |k: &str| -> Option<Option<f64>> {
        match v.get(k) {
            None => Some(None),
            Some(serde_json::Value::Number(n)) => n.as_f64().filter(|f| f.is_finite()).map(Some),
            Some(_) => None,
        }
    };
    let sub_ok = matches!(v.get("sub"), Some(serde_json::Value::String(s)) if s.as_bytes() == user);
    let iss_ok = matches!(v.get("iss"), Some(serde_json::Value::String(s)) if *s == c.issuer);
    let leeway = c.leeway_ms as f64;
    let now = NOW_MS as f64;
    let exp_ok = matches!(num("exp"), Some(Some(e)) if e * 1000.0 + leeway > now);
    let nbf_ok = match num("nbf") {
        Some(None) => true,
        Some(Some(n)) => n * 1000.0 - leeway <= now,
        None => false,
    };
    sub_ok && iss_ok && exp_ok && nbf_ok
}

fn header_ok(header: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(header)
        .ok()
        .and_then(|h| h.get("alg").and_then(|a| a.as_str()).map(|a| a == "HS256"))
        .unwrap_or(false)
}

/// An accepted token: three parts, a valid HS256 signature under the test key, an HS256 header
/// and claims that pass the rules.
fn assert_accepted_is_valid(user: &[u8], token: &[u8], c: &AuthConfig) {
    let t = std::str::from_utf8(token).expect("accepted token is UTF-8");
    let parts: Vec<&str> = t.split('.').collect();
    assert_eq!(parts.len(), 3, "accepted token {t:?} is not three parts");
    let sig = URL_SAFE_NO_PAD.decode(parts[2]).expect("signature is base64url");
    let signing_input = format!("{}.{}", parts[0], parts[1]);
    assert_eq!(sig, mac(signing_input.as_bytes()), "accepted a bad signature: {t:?}");
    assert_eq!(URL_SAFE_NO_PAD.encode(&sig), parts[2], "non-canonical signature accepted");
    let header = URL_SAFE_NO_PAD.decode(parts[0]).expect("header is base64url");
    assert!(header_ok(&header), "accepted header {header:?}");
    let claims = URL_SAFE_NO_PAD.decode(parts[1]).expect("claims are base64url");
    assert!(claims_ok(&claims, user, c), "accepted claims {claims:?}");
}

/// Raw bytes after LOGIN: the delimiting rule, the split and the token check.
fn raw(data: &[u8]) {
    let limits = Limits::default();
    let mut buf = Vec::with_capacity(data.len() + 1);
    buf.push(LOGIN);
    buf.extend_from_slice(data);
    // Only k <= max_login_bytes + 1 are tried by the rule.
    let last_k = (buf.len().saturating_sub(1)).min(limits.max_login_bytes + 1);
    let first_run = (2..=last_k).find(|&k| run_of_frames(&buf, k, &limits));
    match decode(&buf, &limits) {
        Ok(Decoded::Incomplete) => assert_eq!(buf.len(), 1),
        Ok(Decoded::Frame(ClientFrame::Login { body }, k)) => {
            assert!(buf.len() >= 2);
            assert!((2..=buf.len()).contains(&k), "consumed {k} of {}", buf.len());
            assert_eq!(body, &buf[1..k]);
            assert!(body.len() <= limits.max_login_bytes);
            match first_run {
                Some(want) => assert_eq!(k, want, "login split at {k}, rule says {want}"),
                None => assert_eq!(k, buf.len(), "login split at {k} without a run of frames"),
            }
            let (user, token) = auth::split_login(body);
            assert!(!user.contains(&b':'));
            match token {
                Some(t) => {
                    assert_eq!(user.len() + 1 + t.len(), body.len());
                    assert_eq!(&body[..user.len()], user);
                    assert_eq!(body[user.len()], b':');
                    assert_eq!(&body[user.len() + 1..], t);
                }
                None => assert_eq!(user, body),
            }
            let c = cfg();
            match auth::verify(&c, user, token, NOW_MS) {
                Ok(()) => assert_accepted_is_valid(user, token.unwrap(), &c),
                Err(AuthError::Missing) => assert!(token.is_none()),
                Err(_) => {}
            }
        }
        Ok(Decoded::Frame(other, _)) => panic!("LOGIN decoded as {other:?}"),
        Err(e) => {
            assert_eq!(e, iris_edge::protocol::ProtoError::LoginTooLong, "LOGIN refused: {e:?}");
            assert!(buf.len() - 1 > limits.max_login_bytes);
            assert_eq!(first_run, None);
        }
    }
}

/// A JSON value for a claim, chosen by the input: right, wrong or badly typed.
fn claim_value(u: &mut Unstructured<'_>, good: serde_json::Value) -> AResult<Option<serde_json::Value>> {
    use serde_json::json;
    Ok(Some(match u.int_in_range(0u8..=11)? {
        0 => return Ok(None),
        1..=4 => good,
        5 => json!(u.arbitrary::<i64>()?),
        6 => json!(u.arbitrary::<u64>()?),
        7 => serde_json::Value::from(u.arbitrary::<f64>()?),
        8 => json!(String::arbitrary_take(u)?),
        9 => json!(null),
        10 => json!([u.arbitrary::<bool>()?]),
        _ => json!(u.arbitrary::<bool>()?),
    }))
}

trait TakeString {
    fn arbitrary_take(u: &mut Unstructured<'_>) -> AResult<String>;
}
impl TakeString for String {
    fn arbitrary_take(u: &mut Unstructured<'_>) -> AResult<String> {
        let n = u.int_in_range(0usize..=12)?;
        let b = u.bytes(n)?;
        Ok(String::from_utf8_lossy(b).into_owned())
    }
}

/// A printable user name from the input (at least one byte, no `:`).
fn printable_user(u: &mut Unstructured<'_>) -> AResult<Vec<u8>> {
    let n = u.int_in_range(1usize..=24)?;
    Ok(u.bytes(n)?
        .iter()
        .map(|&b| match 0x20 + b % 95 {
            b':' => b'_',
            c => c,
        })
        .collect())
}

/// Signs `header.claims` (any bytes) with the test key, as a compact JWS.
fn sign_raw(header: &[u8], claims: &[u8]) -> String {
    let h = URL_SAFE_NO_PAD.encode(header);
    let p = URL_SAFE_NO_PAD.encode(claims);
    let s = URL_SAFE_NO_PAD.encode(mac(format!("{h}.{p}").as_bytes()));
    format!("{h}.{p}.{s}")
}

/// A signed token built from the input; returns (user, token).
fn signed_token(u: &mut Unstructured<'_>) -> AResult<(Vec<u8>, String)> {
    use serde_json::json;
    let user = printable_user(u)?;
    let user_s = String::from_utf8(user.clone()).unwrap();
    let header = match u.int_in_range(0u8..=5)? {
        0..=2 => json!({"alg": "HS256", "typ": "JWT"}).to_string().into_bytes(),
        3 => json!({"alg": "none"}).to_string().into_bytes(),
        4 => json!({"alg": String::arbitrary_take(u)?}).to_string().into_bytes(),
        _ => {
            let n = u.int_in_range(0usize..=16)?;
            u.bytes(n)?.to_vec()
        }
    };
    let now_s = (NOW_MS / 1000) as i64;
    let claims = if u.int_in_range(0u8..=15)? == 0 {
        let n = u.int_in_range(0usize..=32)?;
        u.bytes(n)?.to_vec()
    } else {
        let mut m = serde_json::Map::new();
        let sub = if u.arbitrary::<bool>()? { json!(user_s) } else { json!(format!("{user_s}x")) };
        let offset = |u: &mut Unstructured<'_>| -> AResult<i64> { u.int_in_range(-120i64..=120) };
        let exp = json!(now_s + offset(u)?);
        let nbf = json!(now_s + offset(u)?);
        for (k, good) in [("sub", sub), ("iss", json!("iris")), ("exp", exp), ("nbf", nbf)] {
            if let Some(v) = claim_value(u, good)? {
                m.insert(k.into(), v);
            }
        }
        serde_json::Value::Object(m).to_string().into_bytes()
    };
    Ok((user, sign_raw(&header, &claims)))
}

fn signed(data: &[u8]) -> AResult<()> {
    let mut u = Unstructured::new(data);
    let (user, token) = signed_token(&mut u)?;
    let c = cfg();
    let parts: Vec<&str> = token.split('.').collect();
    let header = URL_SAFE_NO_PAD.decode(parts[0]).unwrap();
    let claims = URL_SAFE_NO_PAD.decode(parts[1]).unwrap();
    let want = header_ok(&header) && claims_ok(&claims, &user, &c);
    let got = auth::verify(&c, &user, Some(token.as_bytes()), NOW_MS);
    assert_eq!(got.is_ok(), want, "verify {got:?} for header {header:?} claims {claims:?}");
    if got.is_ok() {
        assert_accepted_is_valid(&user, token.as_bytes(), &c);
        // Any one character changed (to another base64url character or a dot): refused.
        let at = u.int_in_range(0..=token.len() - 1)?;
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.";
        let mut t = token.clone().into_bytes();
        let pick = alphabet[u.int_in_range(0..=alphabet.len() - 1)?];
        if t[at] != pick {
            t[at] = pick;
            assert!(
                auth::verify(&c, &user, Some(&t), NOW_MS).is_err(),
                "tampered token accepted: {:?}",
                String::from_utf8_lossy(&t)
            );
        }
        // The same token for another user is refused.
        let mut other = user.clone();
        other.push(b'x');
        assert!(auth::verify(&c, &other, Some(token.as_bytes()), NOW_MS).is_err());
    }
    Ok(())
}

/// A valid frame built from the input (never LOGIN).
fn some_frame(u: &mut Unstructured<'_>, out: &mut Vec<u8>) -> AResult<()> {
    let target_len = u.int_in_range(1usize..=40)?;
    let target = u.bytes(target_len)?.to_vec();
    let frame = match u.int_in_range(0u8..=3)? {
        0 => {
            let n = u.int_in_range(0usize..=64)?;
            ClientFrame::Send { target: &target, msg: u.bytes(n)? }
        }
        1 => ClientFrame::Ack { id: MsgId(u.arbitrary()?) },
        2 => ClientFrame::GetStatus { target: &target },
        _ => ClientFrame::Typing { target: &target, on: u.arbitrary()? },
    };
    frame.encode(out);
    Ok(())
}

fn login_then_frames(data: &[u8]) -> AResult<()> {
    let mut u = Unstructured::new(data);
    let (user, token) = signed_token(&mut u)?;
    let mut body = user.clone();
    if u.arbitrary::<bool>()? {
        body.push(b':');
        body.extend_from_slice(token.as_bytes());
    }
    let limits = Limits::default();
    if body.len() > limits.max_login_bytes {
        return Ok(());
    }
    let mut buf = vec![LOGIN];
    buf.extend_from_slice(&body);
    let login_end = buf.len();
    let mut ends = Vec::new();
    for _ in 0..u.int_in_range(1u8..=3)? {
        some_frame(&mut u, &mut buf)?;
        ends.push(buf.len());
    }
    match decode(&buf, &limits) {
        Ok(Decoded::Frame(ClientFrame::Login { body: b }, k)) => {
            assert_eq!(k, login_end, "printable login {body:?} split at {k}");
            assert_eq!(b, &body[..]);
        }
        other => panic!("login {body:?} + frames decoded as {other:?}"),
    }
    let mut at = login_end;
    for end in ends {
        match decode(&buf[at..], &limits) {
            Ok(Decoded::Frame(_, n)) => assert_eq!(at + n, end),
            other => panic!("frame after login decoded as {other:?}"),
        }
        at = end;
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => raw(rest),
        1 => {
            let _ = signed(rest);
        }
        _ => {
            let _ = login_then_frames(rest);
        }
    }
});
