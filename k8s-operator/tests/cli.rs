//! The operator's two command-line tools, run as built binaries: `crdgen` prints exactly the
//! CRD the Helm chart ships, and `nym-operator render` builds objects for every example and
//! refuses each invalid one with the rule it breaks.
//!
//! Being an integration test also makes `cargo test` build both binaries with the test run's
//! features, so the manifest checks in tests/k8s run them without a second, differently
//! featured build of the whole dependency tree.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn operator_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(binary: &str, args: &[&Path]) -> Output {
    Command::new(binary)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {binary}: {e}"))
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn crdgen_prints_exactly_the_crd_the_chart_ships() {
    let out = run(env!("CARGO_BIN_EXE_crdgen"), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let chart_copy = operator_dir().join("../helm/nym-operator/crds/nymnodes.yaml");
    let shipped = std::fs::read(&chart_copy).expect("the chart's CRD");
    assert!(
        out.stdout == shipped,
        "{} differs from crdgen's output: regenerate it with `cargo run -p nym-operator --bin crdgen`",
        chart_copy.display()
    );
}

#[test]
fn render_builds_a_statefulset_for_every_example_nymnode() {
    for example in yaml_files(&operator_dir().join("examples")) {
        let out = run(
            env!("CARGO_BIN_EXE_nym-operator"),
            &[Path::new("render"), &example],
        );
        assert!(
            out.status.success(),
            "{}: {}",
            example.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).expect("YAML is UTF-8");
        let nymnodes = std::fs::read_to_string(&example)
            .expect("example")
            .matches("kind: NymNode")
            .count();
        let statefulsets = text.matches("\nkind: StatefulSet").count();
        assert_eq!(statefulsets, nymnodes, "{}", example.display());
    }
}

#[test]
fn render_refuses_each_invalid_example_naming_what_is_wrong() {
    for example in yaml_files(&operator_dir().join("examples/invalid")) {
        let text = std::fs::read_to_string(&example).expect("example");
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect:"))
            .map(str::trim)
            .unwrap_or_else(|| panic!("{}: first line must be `# expect: ...`", example.display()));
        let out = run(
            env!("CARGO_BIN_EXE_nym-operator"),
            &[Path::new("render"), &example],
        );
        assert!(!out.status.success(), "{} was rendered", example.display());
        assert!(
            out.stdout.is_empty(),
            "{}: printed objects before refusing",
            example.display()
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expect), "{}: {stderr}", example.display());
    }
}
