//! The binaries as users run them: the localnet and probe commands of the README, exit
//! codes for bad configuration and unsafe keys.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const NODE: &str = env!("CARGO_BIN_EXE_nym-node");
const CLIENT: &str = env!("CARGO_BIN_EXE_nym-client");

#[test]
fn localnet_and_probe_deliver_every_message_and_stop_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let base = common::free_base_port(80);
    let mut localnet = Command::new(NODE)
        .args([
            "localnet",
            "--no-traffic",
            "--base-port",
            &base.to_string(),
            "--dir",
        ])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let topology = dir.path().join("topology.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    // Ready once a probe goes through (the localnet prints its banner after every node is ready).
    let mut output = None;
    while Instant::now() < deadline {
        if topology.exists() {
            let out = Command::new(CLIENT)
                .arg("--topology")
                .arg(&topology)
                .arg("--topology-signer")
                .arg(dir.path().join("directory.pub"))
                .args([
                    "--cover-rate",
                    "0",
                    "probe",
                    "--count",
                    "25",
                    "--timeout",
                    "30s",
                ])
                .output()
                .unwrap();
            if out.status.success() {
                output = Some(out);
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = output.expect("probe never succeeded against the localnet");
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(line.contains("sent=25 delivered=25"), "{line}");

    // A client takes no document without knowing who must have signed it...
    let clients = tempfile::tempdir().unwrap();
    let unsigned = Command::new(CLIENT)
        .arg("--topology")
        .arg(&topology)
        .arg("--data-dir")
        .arg(clients.path())
        .args(["init", "--id", "alice"])
        .output()
        .unwrap();
    assert!(!unsigned.status.success());
    assert!(
        String::from_utf8_lossy(&unsigned.stderr).contains("--topology-signer"),
        "{}",
        String::from_utf8_lossy(&unsigned.stderr)
    );
    // ...and refuses the localnet's document when told another directory signs it.
    let stranger = nym_node::keys::Identity::generate().unwrap().public();
    let forged = Command::new(CLIENT)
        .arg("--topology")
        .arg(&topology)
        .args(["--topology-signer", &stranger.to_base58()])
        .args([
            "--cover-rate",
            "0",
            "probe",
            "--count",
            "1",
            "--timeout",
            "5s",
        ])
        .output()
        .unwrap();
    assert!(
        !forged.status.success(),
        "a document signed by another key was taken"
    );

    // SIGTERM stops the localnet and every node with it.
    unsafe {
        libc::kill(localnet.id() as i32, libc::SIGTERM);
    }
    let status = wait_timeout(&mut localnet, Duration::from_secs(30)).expect("localnet stops");
    assert!(status.success(), "localnet exit status {status}");
    for i in 0..8u16 {
        let port = base + 10 * i;
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "node on port {port} still running"
        );
    }
    let log = std::fs::read_to_string(dir.path().join("mix-2a/node.log")).unwrap();
    assert!(
        log.contains("pipeline drained"),
        "each node drains on the way out:\n{log}"
    );
}

fn wait_timeout(child: &mut std::process::Child, t: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + t;
    while Instant::now() < deadline {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    None
}

#[test]
fn bad_configuration_exits_64_naming_the_variable() {
    let out = Command::new(NODE)
        .arg("run")
        .env_clear()
        .env("NYM_NODE_TOPOLOGY", "/nonexistent.json")
        .env("NYM_NODE_MAX_PACKET_DELAY", "soon")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("NYM_NODE_MAX_PACKET_DELAY: expected a duration"),
        "{err}"
    );

    let out = Command::new(NODE).arg("run").env_clear().output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NYM_NODE_TOPOLOGY"));
}

#[test]
fn an_exit_with_a_bad_policy_does_not_start_and_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.txt");
    std::fs::write(&policy, "accept 127.0.0.1:8080\naccept nowhere:80\n").unwrap();
    let keygen = Command::new(NODE)
        .args(["keygen", "--dir"])
        .arg(dir.path().join("keys"))
        .output()
        .unwrap();
    assert!(keygen.status.success());
    let port = |p: u16| format!("127.0.0.1:{p}");
    let base = common::free_base_port(3);
    let out = Command::new(NODE)
        .arg("run")
        .env_clear()
        .env("NYM_NODE_MODE", "exit-gateway")
        .env("NYM_NODE_TOPOLOGY", dir.path().join("topology.json"))
        .env("NYM_NODE_KEYS_DIR", dir.path().join("keys"))
        .env("NYM_NODE_DATA_DIR", dir.path().join("data"))
        .env("NYM_NODE_MIXNET_BIND", port(base))
        .env("NYM_NODE_HTTP_BIND", port(base + 1))
        .env("NYM_NODE_CLIENT_BIND", port(base + 2))
        .env("NYM_NODE_EXIT_POLICY", &policy)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("NYM_NODE_EXIT_POLICY") && err.contains("line 2"),
        "{err}"
    );
}

#[test]
fn node_refuses_keys_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let out = Command::new(NODE)
        .args(["keygen", "--dir"])
        .arg(&keys)
        .output()
        .unwrap();
    assert!(out.status.success());
    let public: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(public["identity_key"].is_string());
    for f in ["identity.key", "sphinx.key", "noise.key"] {
        let mode = std::fs::metadata(keys.join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    std::fs::set_permissions(
        keys.join("identity.key"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    let out = Command::new(NODE)
        .arg("run")
        .env_clear()
        .env("NYM_NODE_TOPOLOGY", dir.path().join("t.json"))
        .env("NYM_NODE_KEYS_DIR", &keys)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
}

#[test]
fn keygen_if_missing_keeps_existing_keys_and_plain_keygen_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let keygen = |extra: &[&str]| {
        Command::new(NODE)
            .args(["keygen", "--dir"])
            .arg(&keys)
            .args(extra)
            .output()
            .unwrap()
    };
    // First start of a pod: no keys yet, so they are generated.
    let first = keygen(&["--if-missing"]);
    assert!(first.status.success(), "{first:?}");
    let first: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    // Every later start: the same identity, untouched.
    let again = keygen(&["--if-missing"]);
    assert!(again.status.success(), "{again:?}");
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(first, again);
    // Without the flag an existing identity is never overwritten.
    let plain = keygen(&[]);
    assert!(!plain.status.success());
}

#[test]
fn keygen_if_missing_makes_only_the_missing_keys() {
    // The Helm chart's existingSecret provides the identity and Noise keys; the Sphinx seed
    // is always made in the pod.
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let run = |args: &[&str]| {
        Command::new(NODE)
            .args(["keygen", "--dir"])
            .arg(&keys)
            .args(args)
            .output()
            .unwrap()
    };
    let full: serde_json::Value = serde_json::from_slice(&run(&[]).stdout).unwrap();
    std::fs::remove_file(keys.join("sphinx.key")).unwrap();
    let out = run(&["--if-missing"]);
    assert!(out.status.success(), "{out:?}");
    let again: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(again["identity_key"], full["identity_key"]);
    assert_eq!(again["noise_key"], full["noise_key"]);
    assert!(keys.join("sphinx.key").exists());
}

#[test]
fn check_env_runs_the_node_parser_and_names_the_bad_variable() {
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join("env");
    std::fs::write(
        &env,
        "NYM_NODE_TOPOLOGY=/etc/t.json\nNYM_NODE_MAILBOX_MAX_BYTES=2147483648\nNYM_NODE_SPHINX_QUEUE=1000000\n",
    )
    .unwrap();
    let check = |path: &std::path::Path| {
        Command::new(NODE)
            .args(["check-env", "--file"])
            .arg(path)
            .env_clear()
            .output()
            .unwrap()
    };
    let out = check(&env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // What a values file with bare numbers used to render.
    std::fs::write(
        &env,
        "NYM_NODE_TOPOLOGY=/etc/t.json\nNYM_NODE_SPHINX_QUEUE=1e+06\n",
    )
    .unwrap();
    let out = check(&env);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NYM_NODE_SPHINX_QUEUE"));
}
