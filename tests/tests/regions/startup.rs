//! A region name or a home table naming a region that is not in the region list is refused at
//! startup (no `--check`): `iris-edge` and `iris-core` are started for real, with a running
//! broker and Redis they could otherwise use, and must exit non-zero with an error naming the
//! unknown region.

use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use iris_tests::cluster::{region_names, write_home_table};
use iris_tests::services::{RedisServer, Tansu};
use iris_tests::{core_bin, edge_bin};

/// Runs `cmd` until it exits (at most 20 s: a process that keeps running accepted the
/// configuration and fails the test); returns its status and standard error.
fn run_to_exit(mut cmd: Command, what: &str) -> (ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let err_path = dir.path().join("stderr.log");
    let err = std::fs::File::create(&err_path).unwrap();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(err))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return (st, std::fs::read_to_string(&err_path).unwrap_or_default());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} still runs 20 s after its start: it accepted the configuration; \
                 stderr:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The edge's command line for region `own` of `regions` on a live broker and Redis.
fn edge_cmd(
    dir: &Path,
    broker: &Tansu,
    global: &Tansu,
    redis: &RedisServer,
    own: &str,
    regions: &[String],
    table: Option<&Path>,
) -> Command {
    let mut cmd = Command::new(edge_bin());
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--shards",
        "1",
    ])
    .arg("--data-dir")
    .arg(dir.join("edge"))
    .args(["--bus", "kafka", "--brokers", &broker.brokers()])
    .args([
        "--redis",
        &redis.url(),
        "--region",
        own,
        "--partitions",
        "2",
    ])
    .args(["--node-id", "1", "--regions", &regions.join(",")])
    .args(["--global-brokers", &global.brokers()]);
    if let Some(t) = table {
        cmd.arg("--home-table").arg(t);
    }
    cmd.env("NO_COLOR", "1");
    cmd
}

/// The core's command line, same configuration.
fn core_cmd(
    dir: &Path,
    broker: &Tansu,
    global: &Tansu,
    redis: &RedisServer,
    own: &str,
    regions: &[String],
    table: Option<&Path>,
) -> Command {
    let mut cmd = Command::new(core_bin());
    cmd.args(["--brokers", &broker.brokers(), "--redis", &redis.url()])
        .args([
            "--region",
            own,
            "--partitions",
            "2",
            "--admin",
            "127.0.0.1:0",
        ])
        .args(["--member", "0", "--members", "1"])
        .arg("--data-dir")
        .arg(dir.join("core"))
        .args(["--regions", &regions.join(",")])
        .args(["--global-brokers", &global.brokers()]);
    if let Some(t) = table {
        cmd.arg("--home-table").arg(t);
    }
    cmd.env("NO_COLOR", "1");
    cmd
}

type MakeCmd = fn(&Path, &Tansu, &Tansu, &RedisServer, &str, &[String], Option<&Path>) -> Command;

fn refuses_unknown_regions(bin: &str, make: MakeCmd) {
    let broker = Tansu::memory();
    let global = Tansu::memory();
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let names = region_names(2);
    let unknown = format!("{}-nowhere", names[0]);

    // The own region is not in the list.
    let (st, err) = run_to_exit(
        make(dir.path(), &broker, &global, &redis, &unknown, &names, None),
        &format!("{bin} --region {unknown}"),
    );
    assert!(
        !st.success(),
        "{bin} with own region {unknown}: {st}\n{err}"
    );
    assert!(
        err.contains(&unknown),
        "{bin}: the error must name the region {unknown}; stderr:\n{err}"
    );

    // The list names an invalid region.
    let bad = "Not-A-Region".to_owned();
    let list = vec![names[0].clone(), bad.clone()];
    let (st, err) = run_to_exit(
        make(dir.path(), &broker, &global, &redis, &names[0], &list, None),
        &format!("{bin} --regions {}", list.join(",")),
    );
    assert!(
        !st.success(),
        "{bin} with region list {list:?}: {st}\n{err}"
    );
    assert!(
        err.contains(&bad),
        "{bin}: the error must name the region {bad}; stderr:\n{err}"
    );

    // The home table names a region not in the list (the other lines are fine).
    let table = dir.path().join("homes.txt");
    write_home_table(
        &table,
        &[
            ("alice", names[0].as_str()),
            ("bob", unknown.as_str()),
            ("carol", names[1].as_str()),
        ],
    );
    let (st, err) = run_to_exit(
        make(
            dir.path(),
            &broker,
            &global,
            &redis,
            &names[0],
            &names,
            Some(&table),
        ),
        &format!("{bin} --home-table (bob {unknown})"),
    );
    assert!(
        !st.success(),
        "{bin} with a home table naming {unknown}: {st}\n{err}"
    );
    assert!(
        err.contains(&unknown),
        "{bin}: the error must name the region {unknown}; stderr:\n{err}"
    );

    // The same configuration with a valid table starts (the refusals above are about the
    // regions, not about anything else on the command line).
    write_home_table(
        &table,
        &[("alice", names[0].as_str()), ("bob", names[1].as_str())],
    );
    let mut child = make(
        dir.path(),
        &broker,
        &global,
        &redis,
        &names[0],
        &names,
        Some(&table),
    )
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("spawn");
    std::thread::sleep(Duration::from_secs(3));
    let still = child.try_wait().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        still.is_none(),
        "{bin} with a valid two-region configuration exited: {still:?}"
    );
}

#[test]
fn edge_refuses_an_unknown_region_at_startup() {
    refuses_unknown_regions("iris-edge", edge_cmd);
}

#[test]
fn core_refuses_an_unknown_region_at_startup() {
    refuses_unknown_regions("iris-core", core_cmd);
}
