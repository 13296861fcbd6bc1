//! Region configuration of the built binaries: `iris-edge --check` and `iris-core --check`
//! refuse a home table naming a region that is not in the region list (with an error naming
//! it), an own region missing from the list and a multi-region list without global brokers, and
//! accept a valid two-region configuration, printing it back. `iris-core` refuses the same at
//! startup, before connecting to anything.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use iris_tests::{core_bin, run_check};

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn edge_toml(regions: &str, table: &Path) -> String {
    format!(
        "[cluster]\nbus = \"kafka\"\nbrokers = \"127.0.0.1:9\"\nregion = \"tokyo\"\n\
         regions = {regions}\nglobal_brokers = \"127.0.0.1:8\"\nhome_table_file = {:?}\n",
        table.to_str().unwrap()
    )
}

/// `iris-core` with the given extra flags (a config that never reaches a broker).
fn core(dir: &Path, extra: &[&str]) -> Output {
    Command::new(core_bin())
        .args(["--brokers", "127.0.0.1:9", "--redis", "redis://127.0.0.1:9"])
        .args(["--region", "tokyo", "--data-dir"])
        .arg(dir.join("core"))
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run iris-core")
}

#[test]
fn edge_check_refuses_an_unknown_region_in_the_home_table() {
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("homes.txt");
    std::fs::write(&table, "# moved\nalice tokyo\nbob atlantis\n").unwrap();
    let out = run_check(&edge_toml("[\"tokyo\", \"frankfurt\"]", &table));
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"atlantis\"") && err.contains("bob"),
        "{}",
        text(&out)
    );

    // The own region missing from the list, an unknown name in the list.
    std::fs::write(&table, "alice tokyo\n").unwrap();
    let out = run_check(&edge_toml("[\"paris\", \"frankfurt\"]", &table));
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("\"tokyo\""),
        "{}",
        text(&out)
    );
    let out = run_check(&edge_toml("[\"tokyo\", \"Frankfurt\"]", &table));
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("\"Frankfurt\""),
        "{}",
        text(&out)
    );
}

#[test]
fn edge_check_accepts_two_regions() {
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("homes.txt");
    std::fs::write(&table, "alice frankfurt\nbob tokyo\n").unwrap();
    let out = run_check(&edge_toml("[\"tokyo\", \"frankfurt\"]", &table));
    assert!(out.status.success(), "{}", text(&out));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("regions = [\"tokyo\", \"frankfurt\"]"),
        "{printed}"
    );
    assert!(
        printed.contains("global_brokers = \"127.0.0.1:8\""),
        "{printed}"
    );

    // Without global brokers two regions are refused.
    let no_global = edge_toml("[\"tokyo\", \"frankfurt\"]", &table)
        .replace("global_brokers = \"127.0.0.1:8\"\n", "");
    let out = run_check(&no_global);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("global_brokers"),
        "{}",
        text(&out)
    );
}

#[test]
fn core_check_refuses_an_unknown_region_in_the_home_table() {
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("homes.txt");
    std::fs::write(&table, "alice tokyo\n\nbob atlantis # typo\n").unwrap();
    let table_arg = table.to_str().unwrap();
    let flags = [
        "--regions",
        "tokyo,frankfurt",
        "--global-brokers",
        "127.0.0.1:8",
        "--home-table",
        table_arg,
    ];
    let mut check = flags.to_vec();
    check.push("--check");
    let out = core(dir.path(), &check);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"atlantis\"") && err.contains("bob"),
        "{}",
        text(&out)
    );
    assert!(out.stdout.is_empty(), "{}", text(&out));

    // Startup (no --check) refuses it the same way, before connecting to anything.
    let out = core(dir.path(), &flags);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("\"atlantis\""),
        "{}",
        text(&out)
    );

    // A malformed line is named by its number.
    std::fs::write(&table, "alice tokyo\nbob\n").unwrap();
    let out = core(dir.path(), &check);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("line 2"),
        "{}",
        text(&out)
    );

    // The own region missing from the list; two regions without global brokers.
    let out = core(
        dir.path(),
        &[
            "--regions",
            "paris,frankfurt",
            "--global-brokers",
            "g:1",
            "--check",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("\"tokyo\""),
        "{}",
        text(&out)
    );
    let out = core(dir.path(), &["--regions", "tokyo,frankfurt", "--check"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--global-brokers"),
        "{}",
        text(&out)
    );
}

#[test]
fn core_check_accepts_two_regions_from_flags_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("homes.txt");
    std::fs::write(&table, "alice frankfurt\n").unwrap();
    let table_arg = table.to_str().unwrap();
    let out = core(
        dir.path(),
        &[
            "--regions",
            "tokyo,frankfurt",
            "--global-brokers",
            "127.0.0.1:8",
            "--home-table",
            table_arg,
            "--check",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        printed.contains("regions = [\"tokyo\", \"frankfurt\"]"),
        "{printed}"
    );
    assert!(
        printed.contains("global_brokers = \"127.0.0.1:8\""),
        "{printed}"
    );
    assert!(printed.contains("home_table_file = "), "{printed}");
    assert!(
        !dir.path().join("core").exists(),
        "--check opened the store"
    );

    // The printed configuration is a valid config file giving the same configuration.
    let body: String = printed
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    let file = dir.path().join("core.toml");
    std::fs::write(&file, &body).unwrap();
    let again = Command::new(core_bin())
        .arg("--config")
        .arg(&file)
        .arg("--check")
        .stdin(Stdio::null())
        .output()
        .expect("run iris-core");
    assert!(again.status.success(), "{}", text(&again));
    assert_eq!(String::from_utf8_lossy(&again.stdout), printed);

    // A single region needs no list and no global brokers.
    let out = core(dir.path(), &["--check"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("regions = []"),
        "{}",
        text(&out)
    );
}
