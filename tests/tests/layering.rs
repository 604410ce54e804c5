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

/// The library's internal modules: private, reachable only with the
/// `internals` feature, which the benchmark and the tests turn on.
const INTERNAL: [&str; 18] = [
    "balance", "control", "datagram", "error", "group", "maps", "metrics", "objects", "policy",
    "slots", "pins", "layout", "signals", "proto", "socket", "steering", "sys", "worker",
];

/// The modules named by `reuseport::MODULE::` paths in `text`, also inside
/// `use reuseport::{...}` groups.
fn modules_used(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (i, _) in text.match_indices("reuseport::") {
        let rest = &text[i + "reuseport::".len()..];
        let group = match rest.strip_prefix('{') {
            Some(g) => &g[..g.find("};").unwrap_or(g.len())],
            None => rest.split([';', ',', ' ', '(', '\n']).next().unwrap_or(""),
        };
        for path in group.split([',', '{', '\n']) {
            if let Some((module, _)) = path.trim().split_once("::") {
                found.push(module.trim().to_string());
            }
        }
    }
    found
}

#[test]
fn the_command_line_the_examples_and_the_readme_use_only_the_public_api() {
    let root = workspace();
    let mut files: Vec<std::path::PathBuf> = ["main.rs", "cli.rs", "stats.rs"]
        .iter()
        .map(|f| root.join("reuseport-cli/src").join(f))
        .collect();
    for e in std::fs::read_dir(root.join("reuseport-user/examples")).unwrap() {
        files.push(e.unwrap().path());
    }
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let embedding = readme
        .split("## Embedding")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("the README's Embedding section");
    let mut texts: Vec<(String, String)> = files
        .iter()
        .map(|f| (f.display().to_string(), std::fs::read_to_string(f).unwrap()))
        .collect();
    texts.push(("README.md, Embedding".into(), embedding.to_string()));
    let mut seen = 0;
    for (name, text) in &texts {
        let used = modules_used(text);
        seen += used.len();
        for m in used {
            assert!(
                !INTERNAL.contains(&m.as_str()),
                "{name} uses the internal module reuseport::{m}"
            );
        }
    }
    // The scan found the public modules they do use (server::...).
    assert!(seen > 0, "no reuseport:: paths found");
    assert!(modules_used("use reuseport::{sys::x, Group};").contains(&"sys".to_string()));
}

/// Where `needle` occurs in `haystack`.
fn occurrences(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

#[test]
fn the_server_embeds_no_test_program() {
    // The test object's programs are named in its symbol table; the
    // production object (the only one the server embeds) has none of them.
    let server = std::fs::read(binary()).expect("reading the server binary");
    let bench = std::fs::read(binary().with_file_name("reuseport-bench"))
        .expect("reading the benchmark binary");
    for name in [
        &b"verifier_reject"[..],
        b"cost_murmur",
        b"round_robin_per_cpu",
    ] {
        assert_eq!(
            occurrences(&server, name),
            0,
            "the server embeds {}",
            String::from_utf8_lossy(name)
        );
        // The benchmark embeds the test object: the check would see it.
        assert!(
            occurrences(&bench, name) > 0,
            "reuseport-bench embeds {}",
            String::from_utf8_lossy(name)
        );
    }
    // ... while the steering program is there.
    assert!(occurrences(&server, b"steer_select") > 0);
}
