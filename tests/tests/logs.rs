//! Logs: plain text without ANSI escape codes when standard error is not a terminal (here: the
//! harness's log file), and one JSON object per line with `--log-format json`.

use iris_tests::{Server, ServerOpts};

#[test]
fn text_logs_to_a_file_have_no_ansi_codes() {
    let s = Server::start(ServerOpts::shards(2));
    let mut c = s.login("log-user");
    c.sync();
    let log = s.log();
    assert!(log.contains("iris-edge serving"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escape codes in a log written to a file:\n{}",
        log.escape_debug()
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    let s = Server::start(ServerOpts {
        args: vec!["--log-format".into(), "json".into()],
        ..ServerOpts::shards(2)
    });
    let mut c = s.login("json-user");
    c.sync();
    let log = s.log();
    let mut lines = 0;
    let mut serving = false;
    for line in log
        .lines()
        .filter(|l| !l.starts_with("====") && !l.is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        if v["fields"]["message"] == "iris-edge serving" {
            serving = true;
            assert!(v["fields"]["client"].is_string(), "{line}");
        }
        lines += 1;
    }
    assert!(lines > 2 && serving, "{log}");
}
