//! The documentation says what the code does: README's configuration table is generated
//! from the knob definitions and must match them.

#[test]
fn readme_knob_table_matches_the_definitions() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("<!-- knobs:start -->\n")
        .expect("knobs:start marker")
        + "<!-- knobs:start -->\n".len();
    let end = readme.find("<!-- knobs:end -->").expect("knobs:end marker");
    let table = &readme[start..end];
    let expected = nym_node::config::knobs_markdown();
    assert_eq!(
        table, expected,
        "README's knob table is stale; regenerate it with `nym-node config-docs`"
    );
}

#[test]
fn readme_gives_the_two_commands() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    assert!(readme.contains("cargo run --release --bin nym-node -- localnet"));
    assert!(readme.contains("scripts/test.sh"));
    let ci = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/run")).unwrap();
    assert!(
        ci.contains("scripts/test.sh"),
        ".ci/run runs README's test command"
    );
}

#[test]
fn readme_metric_table_matches_the_registry() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("<!-- metrics:start -->\n")
        .expect("metrics:start marker")
        + "<!-- metrics:start -->\n".len();
    let end = readme
        .find("<!-- metrics:end -->")
        .expect("metrics:end marker");
    assert_eq!(
        &readme[start..end],
        nym_node::metrics::metrics_markdown(),
        "README's metric table is stale; regenerate it with `nym-node config-docs --format metrics`"
    );
}

#[test]
fn every_drop_reason_is_documented() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for r in nym_node::metrics::DropReason::ALL {
        assert!(
            readme.contains(&format!("`{}`", r.as_str())),
            "README does not mention drop reason {}",
            r.as_str()
        );
    }
}
