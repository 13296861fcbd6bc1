//! Protocol v2 across regions: a v2 sender in one region, its recipient homed in another. The
//! SEND_ACK comes back through the global bus from the recipient's home core once the message is
//! durable there, and a resend of the same client message id (through the other edge) is
//! acknowledged with the first id and delivered once.

use std::time::{Duration, Instant};

use iris_tests::cluster::{region_names, ClusterOpts, Regions};
use iris_tests::v2::V2;
use iris_wire::v2::{ClientFrame, ServerFrame};

use crate::delivery::{core_m, small, CROSS};

/// The next SEND_ACK within `within` (PINGs skipped), as (client id, server id).
fn send_ack(c: &mut V2, within: Duration) -> (u64, u64) {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no SEND_ACK within {within:?}");
        match c.recv_within(left) {
            Some(ServerFrame::SendAck {
                client_msg_id,
                server_id,
                ..
            }) => return (client_msg_id, server_id),
            None | Some(ServerFrame::Ping { .. }) => {}
            Some(other) => panic!("expected SEND_ACK, got {other:?}"),
        }
    }
}

/// Every DELIVER within `within` (PINGs skipped, each acked), as (server id, sender, payload).
fn delivers_within(c: &mut V2, within: Duration) -> Vec<(u64, Vec<u8>, Vec<u8>)> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    while let Some(f) = c.recv_within(deadline.saturating_duration_since(Instant::now())) {
        match f {
            ServerFrame::Deliver {
                server_id,
                sender,
                payload,
                ..
            } => {
                c.write(&ClientFrame::Ack {
                    ids: vec![server_id],
                });
                out.push((server_id, sender, payload));
            }
            ServerFrame::Ping { .. } => {}
            other => panic!("expected DELIVER, got {other:?}"),
        }
        if deadline <= Instant::now() {
            break;
        }
    }
    out
}

#[test]
fn a_v2_send_to_a_user_homed_in_another_region_is_acknowledged_by_that_home_and_delivered_once() {
    let names = region_names(2);
    let r = Regions::start(
        &names,
        ClusterOpts {
            edge_args: vec!["--listen-v2".to_owned(), "127.0.0.1:0".to_owned()],
            ..small()
        },
    );
    let a = r.user_homed_in(0, "xa");
    let b = r.user_homed_in(1, "xb");
    let (mut cb, _) = V2::hello(r.region(1).edge(0), &b);
    let (mut ca, _) = V2::hello(r.region(0).edge(0), &a);
    ca.send(41, &b, b"across");
    let (client, id) = send_ack(&mut ca, CROSS);
    assert_eq!(client, 41);
    let got = delivers_within(&mut cb, Duration::from_secs(3));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        (got[0].0, &got[0].1[..], &got[0].2[..]),
        (id, a.as_bytes(), &b"across"[..])
    );
    // The home core confirmed it; the sender's region stored nothing.
    assert_eq!(core_m(&r, 1, "iris_core_confirms_total"), 1);
    assert_eq!(core_m(&r, 0, "iris_core_confirms_total"), 0);
    // A resend through the sender region's other edge: the first id, no second DELIVER.
    drop(ca);
    let (mut ca, _) = V2::hello(r.region(0).edge(1), &a);
    ca.send(41, &b, b"across");
    assert_eq!(
        send_ack(&mut ca, CROSS),
        (41, id),
        "a resend is acked with the first id"
    );
    assert_eq!(core_m(&r, 1, "iris_core_resends_total"), 1);
    let again = delivers_within(&mut cb, Duration::from_secs(2));
    assert!(again.is_empty(), "a resend was delivered again: {again:?}");
}
