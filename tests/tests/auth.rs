//! Auth on: LOGIN `user:JWT` (HS256). Good tokens (made by `iris_edge::auth::sign` and one
//! made by hand with Python's hmac, independent of the server's code) get LOGIN_OK; a bad
//! signature, an expired token, a missing token, a wrong subject, issuer or algorithm, and a
//! token not valid yet get raw `AUTH_FAILED` and a close.

use std::time::Duration;

use base64_free::b64url;
use iris_edge::auth::sign;
use iris_tests::{unix_secs, wire, Client, Frame, Server, ServerOpts};
use serde_json::json;

const SECRET: &str = "iris-integration-test-secret-0123456789";

/// Made outside Rust: python3 hmac/hashlib/base64 with SECRET, claims
/// {"sub":"handmade","iss":"iris","exp":4102444800}.
const HANDMADE: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJoYW5kbWFkZSIsImlzcyI6ImlyaXMiLCJleHAiOjQxMDI0NDQ4MDB9.UwJytD0cC83L0jpBtFLRTMsmWEvpDhEilKEKGeXZlkw";

/// Base64url without padding, for hand-built tokens (no extra dependency).
mod base64_free {
    pub fn b64url(data: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            let chars = chunk.len() + 1;
            for i in 0..chars {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
}

fn server() -> Server {
    Server::start(
        ServerOpts::shards(2).config(&format!("[auth]\nenabled = true\nsecret = \"{SECRET}\"\n")),
    )
}

fn token(claims: serde_json::Value) -> String {
    sign(SECRET.as_bytes(), &claims)
}

fn good(user: &str) -> String {
    token(json!({"sub": user, "iss": "iris", "exp": unix_secs() + 3600}))
}

fn login_ok(s: &Server, user: &str, tok: &str) -> Client {
    let mut c = s.connect();
    c.write(&wire::login(format!("{user}:{tok}").as_bytes()));
    let (f, raw) = c.recv_raw();
    assert_eq!(raw, b"\x03LOGIN_OK", "login {user}: got {f:?}");
    c.user = Some(user.to_owned());
    c
}

fn refused(s: &Server, body: &str, why: &str) {
    let mut c = s.connect();
    c.write(&wire::login(body.as_bytes()));
    let (f, raw) = c.recv_raw();
    assert_eq!(raw, b"AUTH_FAILED", "{why}: got {f:?}");
    let rest = c.expect_closed();
    assert!(rest.is_empty(), "{why}: frames after AUTH_FAILED: {rest:?}");
}

#[test]
fn good_tokens_log_in_and_deliver() {
    let s = server();
    let mut a = login_ok(&s, "alice", &good("alice"));
    let mut h = login_ok(&s, "handmade", HANDMADE);
    a.send("handmade", b"hi handmade");
    assert_eq!(h.recv_acked(), b"hi handmade");
    h.send("alice", b"hi alice");
    assert_eq!(a.recv_acked(), b"hi alice");
    // nbf in the past is fine.
    let t = token(
        json!({"sub": "nbf-ok", "iss": "iris", "exp": unix_secs() + 600, "nbf": unix_secs() - 600}),
    );
    login_ok(&s, "nbf-ok", &t);
}

/// LOGIN has no length, so the edge waits `login_settle_us` after its first byte for the rest
/// of it; a LOGIN that is a user and a whole token cannot go on, so it is answered without that
/// wait. With a 3 s settle time: a whole token gets LOGIN_OK well within it; a token cut in its
/// signature waits, and logs in as soon as the rest (5 ms later) has made it whole.
#[test]
fn a_whole_token_is_answered_without_the_settle_wait() {
    let s = Server::start(ServerOpts::shards(1).config(&format!(
        "login_settle_us = 3000000\n[auth]\nenabled = true\nsecret = \"{SECRET}\"\n"
    )));
    let mut c = s.connect();
    let t0 = std::time::Instant::now();
    c.write(&wire::login(format!("whole:{}", good("whole")).as_bytes()));
    assert_eq!(
        c.recv_within(Duration::from_millis(1500)),
        Some(Frame::LoginOk),
        "a whole token waited for the settle time"
    );
    eprintln!("whole token: LOGIN_OK after {:?}", t0.elapsed());
    let mut cut = s.connect();
    let login = wire::login(format!("cut:{}", good("cut")).as_bytes());
    cut.write_split(&login, login.len() - 10, Duration::from_millis(5));
    assert_eq!(
        cut.recv_within(Duration::from_secs(6)),
        Some(Frame::LoginOk),
        "a token cut in two did not log in"
    );
}

#[test]
fn bad_tokens_get_auth_failed_and_close() {
    let s = server();
    let now = unix_secs();
    let other_secret = sign(
        b"another-secret-of-at-least-32-bytes!!",
        &json!({"sub": "mallory", "iss": "iris", "exp": now + 3600}),
    );
    refused(
        &s,
        &format!("mallory:{other_secret}"),
        "signed with another secret",
    );

    let mut t = good("mallory").into_bytes();
    let n = t.len();
    t[n - 3] = if t[n - 3] == b'A' { b'B' } else { b'A' };
    refused(
        &s,
        &format!("mallory:{}", String::from_utf8(t).unwrap()),
        "tampered signature",
    );

    // Payload swapped, signature kept.
    let g = good("mallory");
    let parts: Vec<&str> = g.split('.').collect();
    let forged_payload =
        b64url(format!(r#"{{"sub":"mallory","iss":"iris","exp":{}}}"#, now + 99_999).as_bytes());
    refused(
        &s,
        &format!("mallory:{}.{forged_payload}.{}", parts[0], parts[2]),
        "tampered payload",
    );

    refused(
        &s,
        &format!(
            "old:{}",
            token(json!({"sub": "old", "iss": "iris", "exp": now - 3600}))
        ),
        "expired token",
    );
    refused(&s, "nobody", "missing token");
    refused(&s, "nobody:", "empty token");
    refused(&s, "nobody:not-a-jwt", "garbage token");
    refused(
        &s,
        &format!("eve:{}", good("alice")),
        "token for another user",
    );
    refused(
        &s,
        &format!(
            "iss:{}",
            token(json!({"sub": "iss", "iss": "evil", "exp": now + 3600}))
        ),
        "wrong issuer",
    );
    refused(
        &s,
        &format!(
            "early:{}",
            token(json!({"sub": "early", "iss": "iris", "exp": now + 7200, "nbf": now + 3600}))
        ),
        "not valid yet (nbf)",
    );
    let none = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(format!(r#"{{"sub":"none","iss":"iris","exp":{}}}"#, now + 3600).as_bytes())
    );
    refused(&s, &format!("none:{none}"), "alg none");

    // After all that, good logins still work.
    let mut a = login_ok(&s, "after-a", &good("after-a"));
    let mut b = login_ok(&s, "after-b", &good("after-b"));
    a.send("after-b", b"still fine");
    assert_eq!(b.recv_acked(), b"still fine");
    b.expect_silence(Duration::from_millis(50));
    assert_eq!(a.recv_within(Duration::from_millis(50)), None::<Frame>);
}

#[test]
fn check_rejects_short_secret() {
    let out = iris_tests::run_check("[auth]\nenabled = true\nsecret = \"short\"\n");
    assert!(!out.status.success(), "--check accepted a 5-byte secret");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("secret"),
        "message does not name the secret: {err}"
    );
}

#[test]
fn exp_and_nbf_of_the_wrong_json_type_are_refused() {
    let s = server();
    let now = unix_secs();
    for (why, claims) in [
        (
            "exp as a string",
            json!({"sub": "ty", "iss": "iris", "exp": (now + 3600).to_string()}),
        ),
        ("exp null", json!({"sub": "ty", "iss": "iris", "exp": null})),
        (
            "nbf as a string (was ignored)",
            json!({"sub": "ty", "iss": "iris", "exp": now + 3600, "nbf": "0"}),
        ),
        (
            "nbf as a bool",
            json!({"sub": "ty", "iss": "iris", "exp": now + 3600, "nbf": false}),
        ),
        (
            "nbf as an object",
            json!({"sub": "ty", "iss": "iris", "exp": now + 3600, "nbf": {}}),
        ),
    ] {
        refused(&s, &format!("ty:{}", token(claims)), why);
    }
    // NumericDate may have a fraction: accepted for both claims (was refused for exp and
    // ignored for nbf).
    let t = token(json!({
        "sub": "ty", "iss": "iris", "exp": now as f64 + 3600.5, "nbf": now as f64 - 60.25
    }));
    login_ok(&s, "ty", &t);
}

#[test]
fn check_never_prints_the_secret() {
    let out = iris_tests::run_check(&format!("[auth]\nenabled = true\nsecret = \"{SECRET}\"\n"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains(SECRET),
        "--check printed the JWT secret:\n{text}"
    );
    assert!(
        text.contains(&format!("secret = \"<redacted: {} bytes>\"", SECRET.len())),
        "{text}"
    );
}

/// With auth off, a listener that is not loopback is announced loudly at startup; loopback,
/// or auth on, is not.
#[test]
fn auth_off_on_a_public_listener_warns_at_startup() {
    const WARNING: &str = "AUTH IS OFF ON A NON-LOOPBACK LISTENER";
    let public = ServerOpts {
        args: vec!["--listen".into(), "0.0.0.0:0".into()],
        ..ServerOpts::shards(1)
    };
    let s = Server::start(public.clone());
    let mut c = s.login("public-user");
    c.sync();
    assert!(s.log().contains(WARNING), "no warning:\n{}", s.log());
    let local = Server::start(ServerOpts::shards(1));
    assert!(!local.log().contains(WARNING), "{}", local.log());
    let secured = Server::start(ServerOpts {
        config: Some(format!("[auth]\nenabled = true\nsecret = \"{SECRET}\"\n")),
        ..public
    });
    assert!(!secured.log().contains(WARNING), "{}", secured.log());
}
