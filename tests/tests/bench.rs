//! `reuseport bench --quick`: every model produces figures, every echo is
//! verified and the kernel drops nothing. (The figures themselves are
//! printed, not asserted: timings belong to benchmarks, not tests.)

#[test]
fn a_quick_run_measures_every_model_cleanly() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the benchmark needs root (BPF, a network namespace)"
    );
    let out_dir = std::env::temp_dir().join(format!("reuseport-bench-{}", std::process::id()));
    let out = reuseport_tests::reuseport_command()
        .args(["bench", "--quick", "--check", "--out"])
        .arg(&out_dir)
        .output()
        .expect("running reuseport bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench --check failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains(
            "run clean (every model measured, every echo verified, no kernel drops): yes"
        ),
        "{stdout}"
    );

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("results.json")).expect("results.json"))
            .expect("JSON");
    let workloads = json["workloads"].as_array().expect("workloads");
    let names: Vec<&str> = workloads
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "connection-rate",
            "bpf-cost",
            "bpf-cost-by-workers",
            "distribution",
            "persistent-echo",
            "open-loop-latency",
            "skewed-mix",
            "idle-memory",
            "udp-echo"
        ]
    );
    let tcp_models = [
        "single-acceptor",
        "shared-accept",
        "tokio-default",
        "reuseport-kernel",
        "cpu",
        "hash",
        "round-robin",
        "least-loaded",
        "weighted",
        "consistent",
        "floor",
    ];
    for w in workloads {
        let rows = w["rows"].as_array().unwrap();
        let models: Vec<&str> = rows.iter().map(|r| r["model"].as_str().unwrap()).collect();
        match w["name"].as_str().unwrap() {
            "bpf-cost" => {
                assert_eq!(
                    models,
                    [
                        "cpu",
                        "hash/flow",
                        "hash/src-ip",
                        "hash/four-tuple",
                        "round-robin",
                        "least-loaded",
                        "weighted",
                        "consistent/flow",
                        "consistent/four-tuple",
                        "floor",
                        "empty",
                        "cost_counter",
                        "cost_config",
                        "cost_load_bytes",
                        "cost_atomic",
                        "cost_murmur",
                        "cost_table",
                        "cost_loads",
                        "round_robin_shared",
                        "round_robin_per_cpu"
                    ]
                );
                for r in rows {
                    assert!(r["bpf_ns"].as_f64().unwrap() > 0.0, "{r}");
                    assert!(r["bpf_ratio"].as_f64().unwrap() > 0.0, "{r}");
                }
            }
            "bpf-cost-by-workers" => {
                // Every policy, the floor and cost_config at each group
                // size, each measured (its program ran) next to the floor
                // of its size.
                for n in [1, 4, 16, 64] {
                    let at: Vec<&serde_json::Value> = rows
                        .iter()
                        .filter(|r| r["workers"].as_u64() == Some(n))
                        .collect();
                    assert_eq!(at.len(), 11, "{n} workers: {at:?}");
                    assert!(at.iter().any(|r| r["model"] == "floor"));
                    for r in at {
                        assert!(r["bpf_ns"].as_f64().unwrap() > 0.0, "{r}");
                        assert!(r["bpf_ratio"].as_f64().unwrap() > 0.0, "{r}");
                    }
                }
            }
            "udp-echo" => assert_eq!(models[0], "shared-socket"),
            "idle-memory" => {
                assert_eq!(models, ["echo server (round-robin)"]);
                assert!(rows[0]["bytes_per_connection"].as_f64().unwrap() > 0.0);
            }
            _ => assert_eq!(models, tcp_models),
        }
        for r in rows {
            assert!(r["ops"].as_u64().unwrap() > 0, "{}: {r}", w["name"]);
            assert_eq!(r["errors"].as_u64().unwrap(), 0, "{}: {r}", w["name"]);
        }
    }
    assert!(json["drops"].as_object().unwrap().is_empty());
    // The `cpu` policy serves every connection on the CPU that received it.
    let rate = &workloads[0]["rows"];
    let cpu = rate
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["model"] == "cpu")
        .unwrap();
    assert_eq!(cpu["locality"].as_f64(), Some(1.0));
    for file in [
        "report.md",
        "results.csv",
        "distribution.svg",
        "latency.svg",
    ] {
        let len = std::fs::metadata(out_dir.join(file))
            .unwrap_or_else(|_| panic!("{file}"))
            .len();
        assert!(len > 100, "{file} has content");
    }
    let _ = std::fs::remove_dir_all(&out_dir);
}

/// `reuseport bench --soak MINUTES`: steady churn, with descriptors and
/// memory reported at intervals; here a few seconds of it.
#[test]
fn a_short_soak_stays_flat_and_loses_nothing() {
    let out_dir = std::env::temp_dir().join(format!("reuseport-soak-{}", std::process::id()));
    let out = reuseport_tests::reuseport_command()
        .args(["bench", "--soak", "0.1", "--out"])
        .arg(&out_dir)
        .output()
        .expect("running reuseport bench --soak");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "soak failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("descriptors and memory flat, nothing failed: yes"),
        "{stdout}"
    );
    // The last sample: thousands of connections, none failed.
    let last: Vec<&str> = stdout
        .lines()
        .rfind(|l| l.starts_with("| ") && !l.starts_with("| s "))
        .expect("samples")
        .split('|')
        .map(str::trim)
        .collect();
    let connections: u64 = last[2].parse().unwrap();
    assert!(connections > 1_000, "{stdout}");
    assert_eq!(last[3], "0", "failed connections: {stdout}");
}

/// The README's benchmark figures are the committed run's
/// (`docs/bench/results.csv`), as `reuseport-bench readme` generates them:
/// a figure edited by hand, or a new run committed without regenerating
/// them, fails here (and in `cargo xtask lint`).
#[test]
fn the_readme_figures_are_the_committed_runs() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf();
    let out = reuseport_tests::reuseport_command()
        .args(["bench", "readme", "--check", "--results"])
        .arg(root.join("docs/bench"))
        .arg("--readme")
        .arg(root.join("README.md"))
        .output()
        .expect("running reuseport bench readme");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `reuseport bench --quic-churn N`: QUIC connections through a drain, an
/// added worker and a takeover restart, under the `quic` key (none may break: `--check`) and
/// under the kernel's hash (counted and printed).
#[test]
fn a_quic_churn_breaks_no_connection_under_the_quic_key() {
    let out_dir = std::env::temp_dir().join(format!("reuseport-quic-churn-{}", std::process::id()));
    let out = reuseport_tests::reuseport_command()
        .args(["bench", "--quic-churn", "60", "--check", "--out"])
        .arg(&out_dir)
        .output()
        .expect("running reuseport bench --quic-churn");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "quic churn failed:\n{stdout}\n{stderr}"
    );
    println!("{stdout}");
    let rows: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out_dir.join("quic-churn.json")).expect("quic-churn.json"),
    )
    .expect("JSON");
    let rows = rows.as_array().expect("rows");
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["model"], "hash --hash-key quic");
    assert_eq!(rows[0]["connections"], 60);
    assert_eq!(rows[0]["broken"], 0);
    assert!(rows[0]["streams"].as_u64().unwrap() > 60, "streams flowed");
    assert_eq!(rows[1]["model"], "kernel");
    assert_eq!(rows[1]["connections"], 60, "the comparison ran");
    let _ = std::fs::remove_dir_all(&out_dir);
}
