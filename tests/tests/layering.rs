//! The library stays embeddable: what an embedder compiles holds none of the
//! command line's, the benchmark's or the charts' crates, and the `reuseport`
//! server links no font library (only `reuseport-bench` draws charts).
//! `cargo xtask lint` runs this test too.

use std::process::Command;

use reuseport_tests::binary;

/// Crates that belong to the command line and the benchmark, never to the
/// library an embedder builds.
const NOT_IN_THE_LIBRARY: [&str; 9] = [
    "plotters",
    "font-kit",
    "indicatif",
    "csv",
    "serde_json",
    "env_logger",
    "clap",
    "hdrhistogram",
    "anyhow",
];

fn workspace() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

/// The crate names of `cargo tree ARGS`, one each.
fn tree(args: &[&str]) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(workspace())
        .args(["tree", "--offline", "--prefix", "none", "-e", "normal"])
        .args(args)
        .output()
        .expect("running cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn the_library_tree_holds_no_cli_or_chart_crate() {
    let names = tree(&["-p", "reuseport-user"]);
    // The tree was read: the library's own runtime dependencies are in it.
    for needed in ["aya", "tokio", "socket2"] {
        assert!(names.iter().any(|n| n == needed), "{needed} in {names:?}");
    }
    let leaked: Vec<&str> = NOT_IN_THE_LIBRARY
        .into_iter()
        .filter(|c| names.iter().any(|n| n == c))
        .collect();
    assert!(
        leaked.is_empty(),
        "the library (reuseport-user, default features) depends on {leaked:?}"
    );
    // ... while the command line's crate does use them: the check looks at
    // the right names.
    let cli = tree(&["-p", "reuseport-cli"]);
    for c in ["clap", "plotters", "hdrhistogram"] {
        assert!(cli.iter().any(|n| n == c), "{c} in reuseport-cli's tree");
    }
}

/// The shared libraries `path` needs, by `ldd`.
fn linked(path: &std::path::Path) -> String {
    let out = Command::new("ldd").arg(path).output().expect("running ldd");
    assert!(out.status.success(), "ldd {}", path.display());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_server_links_no_font_library() {
    let server = binary();
    let libs = linked(&server);
    assert!(libs.contains("libc.so"), "{libs}");
    for font in ["libfontconfig", "libfreetype"] {
        assert!(
            !libs.contains(font),
            "{} links {font}:\n{libs}",
            server.display()
        );
    }
    // The benchmark, with its charts, does: the check would see them.
    let bench = server.with_file_name("reuseport-bench");
    assert!(
        linked(&bench).contains("libfontconfig"),
        "{} draws its charts with fontconfig",
        bench.display()
    );
}
