//! A dead thread is fatal: a shard that panics (here on request, with the testing aid
//! `IRIS_EDGE_FAULT_PANIC_SHARD`) ends the whole process with exit status 70 and a log line
//! naming it, instead of leaving the other shards serving half an edge while `/health` says
//! 200. Messages it had stored survive, as after a kill -9.

use std::time::Duration;

use iris_tests::{Server, ServerOpts};

#[test]
fn a_panicking_shard_stops_the_process() {
    let mut s = Server::start(ServerOpts {
        env: vec![("IRIS_EDGE_FAULT_PANIC_SHARD".into(), "1".into())],
        no_ready_probe: true,
        ..ServerOpts::shards(2)
    });
    // Serving until the panic: a stored message for later.
    let mut a = s.login("dt-a");
    a.send("dt-offline", b"stored before the panic");
    a.sync();
    let status = s.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(70), "exit status {status}");
    let log = s.log();
    assert!(
        log.contains("a thread panicked") && log.contains("iris-shard-1"),
        "no log line naming the dead shard:\n{log}"
    );
    // The health endpoint is gone with the process (connection refused), not a stale 200.
    assert!(std::net::TcpStream::connect(s.admin).is_err());
    // Restarted on the same data (without the fault): nothing stored was lost.
    let again = Server::start(ServerOpts {
        data_dir: Some(s.data_dir().to_path_buf()),
        ..ServerOpts::shards(2)
    });
    let mut r = again.login("dt-offline");
    assert_eq!(r.recv_acked(), b"stored before the panic");
}
