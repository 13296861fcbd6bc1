//! `iris-plan` end to end: formats, figure sources and flags.

use std::process::Command;

fn iris_plan(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_iris-plan"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn default_table_reproduces_the_design() {
    let (ok, out, err) = iris_plan(&[
        "--users",
        "1e9",
        "--regions",
        "50",
        "--msgs-per-day",
        "5e11",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("edge    c6i.4xlarge           100         5,000  connections"),
        "{out}"
    );
    assert!(
        out.contains("total                         144         7,200"),
        "{out}"
    );
    assert!(!out.contains("With measured figures"));
}

#[test]
fn json_output_parses() {
    let (ok, out, err) = iris_plan(&["--format", "json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["design"]["tiers"][0]["tier"], "edge");
    assert_eq!(v["design"]["tiers"][0]["nodes_per_region"], 100);
    assert_eq!(v["design"]["tiers"][1]["nodes_per_region"], 20);
    assert_eq!(v["design"]["nodes_global"], 7200);
    assert!(v["measured"].is_null());
}

#[test]
fn figures_file_and_flags_give_a_measured_section() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.toml");
    std::fs::write(
        &path,
        "edge_msgs_per_core_per_s = 200000\nedge_conns_per_node = 1000000\n",
    )
    .unwrap();
    let (ok, out, err) = iris_plan(&[
        "--figures",
        path.to_str().unwrap(),
        "--edge-conns-per-node",
        "500000",
        "--format",
        "json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let m = &v["measured"];
    // The flag wins over the file: 10 M / (500 k × 0.8) = 25 edge nodes.
    assert_eq!(m["plan"]["tiers"][0]["nodes_per_region"], 25);
    assert_eq!(m["delta"]["tiers"][0]["nodes_per_region"], -75);
    let used: Vec<&str> = m["figures_used"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["key"].as_str().unwrap())
        .collect();
    assert_eq!(used, ["edge_conns_per_node", "edge_msgs_per_core_per_s"]);
}

#[test]
fn results_file_keys_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.json");
    std::fs::write(
        &path,
        r#"{"scenario":"connect","figures":{"bytes_per_idle_conn":262144}}"#,
    )
    .unwrap();
    let (ok, out, err) = iris_plan(&["--results", path.to_str().unwrap(), "--format", "markdown"]);
    assert!(ok, "{err}");
    assert!(out.contains("used figures.bytes_per_idle_conn"), "{out}");
    // 256 KiB per connection: the edge becomes memory-bound.
    assert!(
        out.contains("| edge | 100 -> 106 | +6 | +300 | connections -> memory |"),
        "{out}"
    );
}

#[test]
fn catalog_flag_and_instance_choice() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    let text =
        iris_perf::plan::catalog::DEFAULT_CATALOG.replace("hourly_usd = 0.68", "hourly_usd = 0.5");
    std::fs::write(&path, text).unwrap();
    let (ok, out, err) = iris_plan(&[
        "--catalog",
        path.to_str().unwrap(),
        "--instance",
        "redis=r6i.4xlarge",
        "--format",
        "json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    // Edge: 100 × $0.5 × 730 h.
    assert_eq!(v["design"]["tiers"][0]["monthly_usd_per_region"], 36_500.0);
    assert_eq!(v["design"]["tiers"][4]["instance"], "r6i.4xlarge");
}

#[test]
fn bad_input_fails_with_a_message() {
    let (ok, _, err) = iris_plan(&["--headroom", "1.2"]);
    assert!(!ok);
    assert!(err.contains("headroom"), "{err}");
    let (ok, _, err) = iris_plan(&["--measured", "edge_msgs=1"]);
    assert!(!ok);
    assert!(err.contains("edge_msgs"), "{err}");
    let (ok, _, err) = iris_plan(&["--instance", "edge=m5.large"]);
    assert!(!ok);
    assert!(err.contains("m5.large"), "{err}");
}

#[test]
fn print_assumptions_is_a_figures_file() {
    let (ok, out, err) = iris_plan(&["--print-assumptions"]);
    assert!(ok, "{err}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seed.toml");
    std::fs::write(&path, &out).unwrap();
    let (ok, out, err) = iris_plan(&["--figures", path.to_str().unwrap(), "--format", "json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["measured"]["delta"]["nodes_global"], 0);
}
