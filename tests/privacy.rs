//! End-to-end encryption: the recipient's gateway stores and delivers only ciphertext, and
//! a payload altered at the gateway never reaches the application.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use nym_node::client::chunking::MessageId;
use nym_node::client::{ClientAddress, ClientConfig, Event, MixClient};
use nym_node::gateway::mailbox::{Incoming, Mailbox};
use nym_node::keys::{Identity, NodeKeys, random_bytes};

const NODE: &str = env!("CARGO_BIN_EXE_nym-node");

/// Every file under `dir`, recursively, as bytes.
fn files(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path, bytes));
        }
    }
    out
}

struct Network {
    _dir: tempfile::TempDir,
    nodes: Vec<nym_node::localnet::LocalNode>,
    topology: std::path::PathBuf,
    children: Vec<tokio::process::Child>,
    gateway: nym_node::keys::NodeId,
}

impl Network {
    async fn start() -> Network {
        let dir = tempfile::tempdir().unwrap();
        let nodes = one_per_layer(dir.path(), free_base_port(40));
        let topology = common::prepare_from_keys(&nodes, dir.path());
        let mut children = Vec::new();
        for n in &nodes {
            children.push(nym_node::localnet::spawn_node(Path::new(NODE), n, &topology).unwrap());
        }
        nym_node::localnet::wait_ready(&nodes, Duration::from_secs(30))
            .await
            .unwrap();
        let gateway = NodeKeys::load(&nodes[3].dir.join("keys"))
            .unwrap()
            .public()
            .identity_key;
        Network {
            _dir: dir,
            nodes,
            topology,
            children,
            gateway,
        }
    }

    async fn stop_gateway(&mut self) {
        let _ = self.children[3].start_kill();
        let _ = self.children[3].wait().await;
    }

    async fn start_gateway(&mut self) {
        self.children[3] =
            nym_node::localnet::spawn_node(Path::new(NODE), &self.nodes[3], &self.topology)
                .unwrap();
        nym_node::localnet::wait_ready(&self.nodes[3..], Duration::from_secs(30))
            .await
            .unwrap();
    }

    fn mailbox_path(&self) -> std::path::PathBuf {
        self.nodes[3].dir.join("data").join("mailbox.redb")
    }

    async fn stop(mut self) {
        for c in self.children.iter_mut() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_holds_only_ciphertext_and_the_recipient_reads_it_when_back() {
    let mut net = Network::start().await;
    let marker = random_bytes().unwrap();
    let recipient = Identity::generate().unwrap();
    let to = ClientAddress::of(&recipient, net.gateway);
    // Its printed form carries the encryption key, and parses back.
    assert_eq!(to.to_string().parse::<ClientAddress>().unwrap(), to);

    let mut sender = MixClient::start(
        client_config(&net.topology, net.gateway),
        Identity::generate().unwrap(),
    )
    .await
    .unwrap();
    sender.send(to, marker.to_vec(), 0).await.unwrap();
    assert!(
        acknowledged(&mut sender, 1, Duration::from_secs(30)).await == 1,
        "stored at the gateway"
    );
    sender.stop().await;

    // Stopped, so everything it held is on disk: the store, its keys, its log.
    net.stop_gateway().await;
    let on_disk = files(&net.nodes[3].dir);
    assert!(on_disk.iter().any(|(p, _)| p.ends_with("mailbox.redb")));
    assert!(
        on_disk.iter().any(|(p, _)| p.ends_with("node.log")),
        "its log is searched too"
    );
    for (path, bytes) in &on_disk {
        assert!(
            !bytes.windows(marker.len()).any(|w| w == marker),
            "the plaintext marker is in {}",
            path.display()
        );
    }
    // The mailbox holds the fragment, sealed: the payload is there, the marker is not.
    let store = Mailbox::open(&net.mailbox_path(), 1 << 30).unwrap();
    let stored = store.fetch_after(&to.identity, 0, 10).unwrap();
    assert_eq!(stored.len(), 1);
    drop(store);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(net.mailbox_path())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "mailbox readable by others");

    net.start_gateway().await;
    let mut back = MixClient::start(client_config(&net.topology, net.gateway), recipient)
        .await
        .unwrap();
    let got = receive(&mut back, 1, Duration::from_secs(30)).await;
    assert_eq!(got, vec![marker.to_vec()]);
    back.stop().await;
    net.stop().await;
}

/// Waits for the `Confirmed` event of message `id`; false on `Failed` or timeout.
async fn confirmed(c: &mut MixClient, id: MessageId, t: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + t;
    loop {
        match tokio::time::timeout_at(deadline, c.next_event()).await {
            Ok(Some(Event::Confirmed { id: got })) if got == id => return true,
            Ok(Some(Event::Failed { id: got })) if got == id => return false,
            Ok(Some(_)) => {}
            _ => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_altered_at_the_gateway_is_rejected_and_the_sender_resends_it() {
    let mut net = Network::start().await;
    let recipient = Identity::generate().unwrap();
    let to = ClientAddress::of(&recipient, net.gateway);
    // The sender asks for a delivery receipt and stays up while the recipient is away.
    let mut sender = MixClient::start(
        ClientConfig {
            receipt_timeout: Some(Duration::from_secs(6)),
            ..client_config(&net.topology, net.gateway)
        },
        Identity::generate().unwrap(),
    )
    .await
    .unwrap();
    let id = sender
        .send(to, b"pay 10 to alice".to_vec(), 0)
        .await
        .unwrap();
    assert!(acknowledged(&mut sender, 1, Duration::from_secs(30)).await == 1);

    // A dishonest gateway flips one byte of what it stored.
    net.stop_gateway().await;
    let store = Mailbox::open(&net.mailbox_path(), 1 << 30).unwrap();
    let stored = store.fetch_after(&to.identity, 0, 10).unwrap();
    assert_eq!(stored.len(), 1);
    let mut body = stored[0].body.clone();
    let last = body.len() - 1;
    body[last] ^= 0x01;
    store.ack(&to.identity, &[stored[0].id]).unwrap();
    store
        .store(&[Incoming {
            client: to.identity,
            identifier: stored[0].identifier,
            body,
        }])
        .unwrap();
    drop(store);
    net.start_gateway().await;

    let mut back = MixClient::start(client_config(&net.topology, net.gateway), recipient)
        .await
        .unwrap();
    // The altered fragment is counted and dropped; no receipt goes back, so the sender
    // sends the message again, and that copy is what the application gets, once.
    let got = receive(&mut back, 1, Duration::from_secs(60)).await;
    assert_eq!(got, vec![b"pay 10 to alice".to_vec()]);
    assert_eq!(back.stats().fragments_rejected.load(Ordering::Relaxed), 1);
    assert!(confirmed(&mut sender, id, Duration::from_secs(60)).await);
    assert!(sender.stats().resends.load(Ordering::Relaxed) >= 1);
    assert!(
        receive(&mut back, 1, Duration::from_secs(2))
            .await
            .is_empty()
    );
    back.stop().await;
    sender.stop().await;
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_receipt_never_comes_is_reported_failed() {
    let net = Network::start().await;
    // Nobody will ever fetch this client's mail: its gateway stores every copy, no receipt
    // comes back, and after its resends the message is reported failed, not delivered.
    let nobody = ClientAddress::of(&Identity::generate().unwrap(), net.gateway);
    let mut sender = MixClient::start(
        ClientConfig {
            receipt_timeout: Some(Duration::from_secs(1)),
            receipt_resends: 2,
            ..client_config(&net.topology, net.gateway)
        },
        Identity::generate().unwrap(),
    )
    .await
    .unwrap();
    let id = sender.send(nobody, b"anyone?".to_vec(), 0).await.unwrap();
    assert!(!confirmed(&mut sender, id, Duration::from_secs(60)).await);
    assert_eq!(sender.stats().resends.load(Ordering::Relaxed), 2);
    assert_eq!(sender.stats().receipts_received.load(Ordering::Relaxed), 0);
    sender.stop().await;
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_copy_of_a_message_already_held_is_confirmed_again_not_delivered_twice() {
    let net = Network::start().await;
    let recipient = Identity::generate().unwrap();
    let to = ClientAddress::of(&recipient, net.gateway);
    let mut sender = MixClient::start(
        ClientConfig {
            receipt_timeout: Some(Duration::from_secs(1)),
            receipt_resends: 20,
            ..client_config(&net.topology, net.gateway)
        },
        Identity::generate().unwrap(),
    )
    .await
    .unwrap();
    let body: Vec<u8> = (0..4000u32).map(|i| (i % 241) as u8).collect();
    let id = sender.send(to, body.clone(), 0).await.unwrap();
    // The recipient is away until the sender has sent a second copy: as far as the sender
    // knows, the receipt for the first was lost.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while sender.stats().resends.load(Ordering::Relaxed) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no resend");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut back = MixClient::start(client_config(&net.topology, net.gateway), recipient)
        .await
        .unwrap();
    assert_eq!(
        receive(&mut back, 1, Duration::from_secs(30)).await,
        vec![body]
    );
    assert!(confirmed(&mut sender, id, Duration::from_secs(30)).await);
    // The second copy reaches a recipient that already handed the message over: it is
    // confirmed through its own receipt SURB and not handed over again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while back.stats().receipts_sent.load(Ordering::Relaxed) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the resent copy was not confirmed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        receive(&mut back, 1, Duration::from_secs(2))
            .await
            .is_empty()
    );
    back.stop().await;
    sender.stop().await;
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragments_stay_at_the_gateway_until_their_message_is_handed_over() {
    let mut net = Network::start().await;
    let recipient = Identity::generate().unwrap();
    let to = ClientAddress::of(&recipient, net.gateway);
    let body: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    let mut sender = MixClient::start(
        client_config(&net.topology, net.gateway),
        Identity::generate().unwrap(),
    )
    .await
    .unwrap();
    sender.send(to, body.clone(), 0).await.unwrap();
    assert!(acknowledged(&mut sender, 1, Duration::from_secs(30)).await == 1);
    sender.stop().await;

    // Hold one fragment back, as if it had not arrived yet.
    net.stop_gateway().await;
    let store = Mailbox::open(&net.mailbox_path(), 1 << 30).unwrap();
    let stored = store.fetch_after(&to.identity, 0, 100).unwrap();
    assert_eq!(stored.len(), 4, "5000 bytes take four fragments");
    let held_back = stored[2].clone();
    store.ack(&to.identity, &[held_back.id]).unwrap();
    drop(store);
    net.start_gateway().await;

    // The recipient gets three fragments: no message, so it acknowledges none of them.
    let mut back = MixClient::start(client_config(&net.topology, net.gateway), recipient.clone())
        .await
        .unwrap();
    assert!(
        receive(&mut back, 1, Duration::from_secs(3))
            .await
            .is_empty()
    );
    back.stop().await;
    net.stop_gateway().await;
    let store = Mailbox::open(&net.mailbox_path(), 1 << 30).unwrap();
    assert_eq!(
        store.fetch_after(&to.identity, 0, 100).unwrap().len(),
        3,
        "still at the gateway"
    );
    // The missing fragment arrives after all.
    store
        .store(&[Incoming {
            client: to.identity,
            identifier: held_back.identifier,
            body: held_back.body,
        }])
        .unwrap();
    drop(store);
    net.start_gateway().await;

    let mut back = MixClient::start(client_config(&net.topology, net.gateway), recipient)
        .await
        .unwrap();
    assert_eq!(
        receive(&mut back, 1, Duration::from_secs(10)).await,
        vec![body]
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    back.stop().await;
    net.stop_gateway().await;
    let store = Mailbox::open(&net.mailbox_path(), 1 << 30).unwrap();
    assert!(
        store.fetch_after(&to.identity, 0, 100).unwrap().is_empty(),
        "handed over, so all four acknowledged and deleted"
    );
    drop(store);
    net.stop().await;
}
