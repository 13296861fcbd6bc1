//! `[rate_limits]` against a real `iris-edge`, v1 and v2: logins per source address, messages
//! per user and per v1 connection, prekey fetches per connection, and the relay limit, which
//! now also answers (once per run of refusals). A refused action is answered (v1 `0xFF
//! RATE_LIMITED`, v2 RATE_LIMITED naming what and the SEND), not accepted, and the connection
//! stays open (a login is refused and closed); a client beside it is not limited.

use std::time::Duration;

use iris_tests::v2::V2;
use iris_tests::{wire, Client, Frame, Server, ServerOpts};
use iris_wire::v2::{ClientFrame, LimitedAction, ServerFrame};

fn server(config: &str) -> Server {
    Server::start(ServerOpts::shards(1).with_v2().config(config))
}

#[test]
fn logins_from_one_address_are_limited_and_closed() {
    let s = server("[rate_limits]\nlogins_per_sec_per_address = 1\nlogin_burst_per_address = 3\n");
    let mut kept = Vec::new();
    for i in 0..3 {
        kept.push(s.login(&format!("ok-{i}")));
    }
    // More logins from 127.0.0.1 at once: refused with raw RATE_LIMITED, then the close (a
    // slow machine may have earned one more token meanwhile: the refusal comes within two).
    let mut refused_v1 = false;
    for i in 0..3 {
        let mut c = Client::connect(s.client);
        c.write(&wire::login(format!("extra-{i}").as_bytes()));
        if c.recv() == Frame::RateLimitedText {
            assert_eq!(c.expect_closed(), vec![]);
            refused_v1 = true;
            break;
        }
        kept.push(c);
    }
    assert!(refused_v1, "no v1 login was refused");
    // v2: RATE_LIMITED (login), then the close.
    let mut v = V2::connect(s.v2.unwrap());
    v.write(&ClientFrame::Hello {
        client_name: b"t".to_vec(),
        client_version: b"1".to_vec(),
        token: b"too-many-v2".to_vec(),
        resume_after: 0,
    });
    let frames = v.until_closed(Duration::from_secs(5));
    assert!(
        matches!(
            frames.as_slice(),
            [ServerFrame::RateLimited {
                what: LimitedAction::Login,
                retry_after_ms: 1..=1000,
                reference: 0
            }]
        ),
        "{frames:?}"
    );
    // The sessions already open are untouched; a second later a login works again.
    kept[0].send("ok-1", b"still here");
    assert_eq!(kept[1].recv_acked(), b"still here");
    std::thread::sleep(Duration::from_millis(1100));
    let mut later = s.login("later");
    later.send("ok-0", b"after a second");
    assert_eq!(kept[0].recv_acked(), b"after a second");
    assert_eq!(s.metric("iris_edge_rate_limited_logins_total"), 2);
}

#[test]
fn a_users_sends_are_limited_over_all_its_connections_and_a_neighbour_is_not() {
    let s = server("[rate_limits]\nsends_per_sec_per_user = 1\nsend_burst_per_user = 4\n");
    let mut sink = s.login("sink");
    let mut a1 = s.login("busy");
    let (mut a2, _) = V2::hello(&s, "busy");
    let mut calm = s.login("calm");
    // Two from v1, then v2 sends until one is refused: the burst is shared by both connections
    // (a slow machine may earn a token meanwhile, hence "until").
    a1.send("sink", b"v1-0");
    a1.send("sink", b"v1-1");
    a1.sync();
    let mut accepted = vec![b"v1-0".to_vec(), b"v1-1".to_vec()];
    let mut refused = None;
    for i in 1..=6u64 {
        let payload = format!("v2-{i}").into_bytes();
        a2.send(i, "sink", &payload);
        match a2.recv() {
            ServerFrame::SendAck { client_msg_id, .. } => {
                assert_eq!(client_msg_id, i);
                accepted.push(payload);
            }
            ServerFrame::RateLimited {
                what: LimitedAction::Send,
                reference,
                retry_after_ms,
            } => {
                assert_eq!(reference, i, "the refusal names the SEND");
                assert!((1..=1000).contains(&retry_after_ms));
                refused = Some(i);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    let refused = refused.expect("no send of the user was refused");
    assert!(refused >= 3, "refused at v2 send {refused}: the burst is 4");
    // The v1 connection of the same user is refused with 0xFF right after.
    a1.send("sink", b"refused");
    match a1.recv() {
        Frame::RateLimited(ms) => assert!((1..=1000).contains(&ms), "{ms}"),
        other => panic!("{other:?}"),
    }
    // Exactly the accepted messages arrive, in order; nothing refused does.
    let got: Vec<Vec<u8>> = sink
        .recv_msgs(accepted.len(), true)
        .into_iter()
        .map(|m| m.1)
        .collect();
    assert_eq!(got, accepted);
    assert!(sink.recv_within(Duration::from_millis(300)).is_none());
    // Another user on the same shard has its own bucket.
    for i in 0..4 {
        calm.send("sink", format!("calm {i}").as_bytes());
    }
    assert_eq!(sink.recv_msgs(4, true).len(), 4);
    assert!(calm.recv_within(Duration::from_millis(200)).is_none());
    assert_eq!(s.metric("iris_edge_rate_limited_sends_total"), 2);
}

#[test]
fn a_v1_connection_send_limit_refuses_the_rest_of_a_batch() {
    let s = server("[rate_limits]\nv1_sends_per_sec = 1\nv1_send_burst = 3\n");
    let mut sink = s.login("sink");
    let mut a = s.login("batcher");
    a.write(&wire::batch_send(b"sink", &[b"a", b"b", b"c", b"d", b"e"]));
    assert!(matches!(a.recv(), Frame::RateLimited(_)));
    let got: Vec<Vec<u8>> = sink.recv_msgs(3, true).into_iter().map(|m| m.1).collect();
    assert_eq!(got, vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
    assert!(sink.recv_within(Duration::from_millis(300)).is_none());
    // v2 connections are not under the v1 limit.
    let (mut v, _) = V2::hello(&s, "v2-sender");
    for i in 1..=5 {
        v.send(i, "sink", b"v2");
    }
    for _ in 0..5 {
        assert!(matches!(v.recv(), ServerFrame::SendAck { .. }));
    }
}

#[test]
fn prekey_fetches_and_relays_are_limited_and_answered() {
    let s = server(
        "typing_relays_per_sec = 1\ntyping_relay_burst = 2\n\
         [rate_limits]\nprekey_fetches_per_sec = 1\nprekey_fetch_burst = 2\n",
    );
    let mut a = s.login("fetcher");
    let mut victim = s.login("typed-at");
    a.write(&wire::fetch_prekeys(b"nobody").repeat(3));
    // The refusal is written at once, the two answers when the store replies.
    let frames: Vec<Frame> = (0..3).map(|_| a.recv()).collect();
    let answers = frames
        .iter()
        .filter(|f| matches!(f, Frame::Prekeys(_)))
        .count();
    let refused = frames
        .iter()
        .filter(|f| matches!(f, Frame::RateLimited(_)))
        .count();
    assert_eq!((answers, refused), (2, 1), "{frames:?}");
    // Relays: two pass, the rest are dropped, and the sender is told once for the run.
    a.write(&wire::typing(b"typed-at", true).repeat(10));
    assert!(matches!(a.recv(), Frame::RateLimited(_)));
    assert!(a.recv_within(Duration::from_millis(300)).is_none());
    for _ in 0..2 {
        assert!(matches!(victim.recv(), Frame::Typing { .. }));
    }
    assert!(victim.recv_within(Duration::from_millis(300)).is_none());
    // v2: PREKEY_FETCH over its limit is answered RATE_LIMITED (prekey fetch).
    let (mut v, _) = V2::hello(&s, "v2-fetcher");
    for _ in 0..3 {
        v.write(&ClientFrame::PrekeyFetch {
            user: b"nobody".to_vec(),
        });
    }
    let frames: Vec<ServerFrame> = (0..3).map(|_| v.recv()).collect();
    let answers = frames
        .iter()
        .filter(|f| matches!(f, ServerFrame::Prekeys { user, .. } if user == b"nobody"))
        .count();
    let refused = frames
        .iter()
        .filter(|f| {
            matches!(
                f,
                ServerFrame::RateLimited {
                    what: LimitedAction::PrekeyFetch,
                    ..
                }
            )
        })
        .count();
    assert_eq!((answers, refused), (2, 1), "{frames:?}");
    assert_eq!(s.metric("iris_edge_rate_limited_prekey_fetches_total"), 2);
    assert_eq!(s.metric("iris_edge_rate_limited_relays_total"), 1);
}
