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

    let mut back = MixClient::start(consenting(&net), recipient).await.unwrap();
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

/// A recipient that sends delivery receipts, after a delay of up to 1 s.
fn consenting(net: &Network) -> ClientConfig {
    ClientConfig {
        send_receipts: true,
        receipt_delay: Duration::from_secs(1),
        ..client_config(&net.topology, net.gateway)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_come_only_from_a_consenting_recipient_once_and_never_for_a_resent_copy() {
    let net = Network::start().await;
    let asks_receipts = || ClientConfig {
        receipt_timeout: Some(Duration::from_secs(1)),
        receipt_resends: 20,
        ..client_config(&net.topology, net.gateway)
    };
    let mut sender = MixClient::start(asks_receipts(), Identity::generate().unwrap())
        .await
        .unwrap();

    // By default a recipient sends none: the message arrives, its sender is never told.
    let quiet = Identity::generate().unwrap();
    let mut quiet_client =
        MixClient::start(client_config(&net.topology, net.gateway), quiet.clone())
            .await
            .unwrap();
    let id = sender
        .send(ClientAddress::of(&quiet, net.gateway), b"read?".to_vec(), 0)
        .await
        .unwrap();
    assert_eq!(
        receive(&mut quiet_client, 1, Duration::from_secs(30)).await,
        vec![b"read?".to_vec()]
    );
    assert!(!confirmed(&mut sender, id, Duration::from_secs(4)).await);
    assert_eq!(
        quiet_client.stats().receipts_sent.load(Ordering::Relaxed),
        0
    );
    assert!(
        quiet_client
            .stats()
            .duplicates_dropped
            .load(Ordering::Relaxed)
            >= 1,
        "the sender's resent copies reached it, unanswered"
    );
    quiet_client.stop().await;

    // A consenting recipient away until the sender has sent a second copy (as far as the
    // sender knows, the receipt for the first was lost).
    let recipient = Identity::generate().unwrap();
    let to = ClientAddress::of(&recipient, net.gateway);
    let body: Vec<u8> = (0..4000u32).map(|i| (i % 241) as u8).collect();
    let resends_before = sender.stats().resends.load(Ordering::Relaxed);
    let id = sender.send(to, body.clone(), 0).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while sender.stats().resends.load(Ordering::Relaxed) < resends_before + 2 {
        assert!(tokio::time::Instant::now() < deadline, "no resend");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut back = MixClient::start(consenting(&net), recipient).await.unwrap();
    assert_eq!(
        receive(&mut back, 1, Duration::from_secs(30)).await,
        vec![body]
    );
    assert!(confirmed(&mut sender, id, Duration::from_secs(30)).await);
    // Every copy reached the recipient; one receipt went back, for the first, and the
    // message was handed over once.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while back.stats().duplicates_dropped.load(Ordering::Relaxed) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the copies never came"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // past any receipt's delay
    assert_eq!(back.stats().receipts_sent.load(Ordering::Relaxed), 1);
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
async fn a_stored_ciphertext_delivered_again_after_a_client_restart_is_not_shown_again() {
    let mut net = Network::start().await;
    let dir = tempfile::tempdir().unwrap();
    let recipient = Identity::generate().unwrap();
    let to = ClientAddress::of(&recipient, net.gateway);
    let (topology, gateway) = (net.topology.clone(), net.gateway);
    let remembering = || ClientConfig {
        completed_ids: Some(dir.path().join("completed")),
        ..client_config(&topology, gateway)
    };
    let mut sender = MixClient::start(
        client_config(&net.topology, net.gateway),
        Identity::generate().unwrap(),
    )
    .await
    .unwrap();
    sender.send(to, b"transfer 10".to_vec(), 0).await.unwrap();
    assert_eq!(
        acknowledged(&mut sender, 1, Duration::from_secs(30)).await,
        1
    );
    sender.stop().await;

    // What a dishonest gateway keeps: the stored ciphertext, as it was delivered.
    net.stop_gateway().await;
    let store = Mailbox::open(&net.mailbox_path(), 1 << 30).unwrap();
    let kept = store.fetch_after(&to.identity, 0, 10).unwrap();
    assert_eq!(kept.len(), 1);
    drop(store);
    net.start_gateway().await;

    let mut client = MixClient::start(remembering(), recipient.clone())
        .await
        .unwrap();
    assert_eq!(
        receive(&mut client, 1, Duration::from_secs(30)).await,
        vec![b"transfer 10".to_vec()]
    );
    client.stop().await;

    // The gateway delivers the same ciphertext again, to the restarted client.
    net.stop_gateway().await;
    let store = Mailbox::open(&net.mailbox_path(), 1 << 30).unwrap();
    assert!(
        store.fetch_after(&to.identity, 0, 10).unwrap().is_empty(),
        "the client acknowledged it before stopping"
    );
    store
        .store(&[Incoming {
            client: to.identity,
            identifier: kept[0].identifier,
            body: kept[0].body.clone(),
        }])
        .unwrap();
    drop(store);
    net.start_gateway().await;
    let mut client = MixClient::start(remembering(), recipient).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while client.stats().duplicates_dropped.load(Ordering::Relaxed) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the copy never came"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        receive(&mut client, 1, Duration::from_secs(2))
            .await
            .is_empty(),
        "a message taken before the restart was shown again"
    );
    client.stop().await;
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragments_stay_at_the_gateway_until_their_message_is_handed_over() {
    incomplete_message_across_a_restart(None).await;
}

/// With an inbox, each fragment is acknowledged as it comes (the gateway does not learn
/// which fragments make one message), and a restart loses none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_inbox_each_fragment_is_acknowledged_as_it_comes_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    incomplete_message_across_a_restart(Some(dir.path().join("inbox.redb"))).await;
}

/// A four-fragment message whose third fragment arrives only after the recipient stopped
/// and started again; `inbox` is the recipient's (none: fragments wait at the gateway).
async fn incomplete_message_across_a_restart(inbox: Option<std::path::PathBuf>) {
    let mut net = Network::start().await;
    let (topology, gateway) = (net.topology.clone(), net.gateway);
    let recipient_config = || ClientConfig {
        inbox: inbox.clone(),
        ..client_config(&topology, gateway)
    };
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

    // The recipient gets three fragments: no message. Without an inbox it acknowledges
    // none of them; with one, each as soon as it is kept.
    let mut back = MixClient::start(recipient_config(), recipient.clone())
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
    let left = store.fetch_after(&to.identity, 0, 100).unwrap().len();
    match inbox {
        None => assert_eq!(left, 3, "still at the gateway"),
        Some(_) => assert_eq!(left, 0, "each acknowledged once kept in the inbox"),
    }
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

    let mut back = MixClient::start(recipient_config(), recipient)
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
    if let Some(path) = &inbox {
        let kept = nym_node::client::inbox::Inbox::open(path).unwrap();
        assert!(kept.load().unwrap().is_empty(), "the inbox forgot them");
    }
    net.stop().await;
}

/// A recipient that spends every reply SURB it was given asking its sender for 100 more.
/// The sender hands out at most a minute's budget more, and its own traffic to others is
/// not slowed: top-ups only take slots its own packets leave empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_flooding_surb_requests_gets_a_bounded_top_up_and_slows_nobody() {
    use nym_node::client::chunking::{self, Message, MessageKind, Reassembler, ReassemblyLimits};
    use nym_node::client::{connection, e2e, packet, top_up};
    use nym_node::gateway::protocol::{ClientMessage, ServerMessage};
    use nym_node::message::Envelope;
    use nym_node::topology::TopologySource;

    const ATTACHED: usize = 100;
    let net = Network::start().await;
    let topology = TopologySource::parse(&net.topology.display().to_string())
        .load()
        .await
        .unwrap();
    let gateway = topology.node(&net.gateway).unwrap().clone();
    // The attacker registers once as an ordinary client, then speaks the protocol itself.
    let attacker = Identity::generate().unwrap();
    MixClient::start(client_config(&net.topology, net.gateway), attacker.clone())
        .await
        .unwrap()
        .stop()
        .await;
    let friend = Identity::generate().unwrap();
    let mut friend_client =
        MixClient::start(client_config(&net.topology, net.gateway), friend.clone())
            .await
            .unwrap();
    // The sender sends in Poisson slots (20/s), where top-ups would compete.
    let sender = MixClient::start(
        ClientConfig {
            cover_rate: 20.0,
            loop_rate: 0.0,
            ..client_config(&net.topology, net.gateway)
        },
        Identity::generate().unwrap(),
    )
    .await
    .unwrap();
    sender
        .send(
            ClientAddress::of(&attacker, net.gateway),
            b"hi".to_vec(),
            ATTACHED,
        )
        .await
        .unwrap();

    // The attacker collects the message and its SURBs...
    let (mut tx, mut rx) = connection::connect(
        gateway.client_address.as_ref().unwrap(),
        &gateway.noise_key,
        &attacker,
        0,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let key = e2e::EncryptionKey::derive(&attacker);
    let mut reassembler = Reassembler::new(ReassemblyLimits::default());
    let message = loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("the message with its SURBs")
            .unwrap();
        let ServerMessage::Deliver { body, .. } = msg else {
            continue;
        };
        let fragment = key.open(&body).unwrap();
        if let Some((_, bytes)) = reassembler
            .add(&fragment, tokio::time::Instant::now())
            .unwrap()
        {
            break Message::decode(&bytes).unwrap();
        }
    };
    assert_eq!(message.reply_surbs.len(), ATTACHED);
    // ... and spends each on a request for 100 more.
    for surb in &message.reply_surbs {
        let request = Message {
            kind: MessageKind::SurbRequest,
            body: 100u16.to_be_bytes().to_vec(),
            ..Message::data(Vec::new())
        };
        let mut fragments = chunking::split(
            random_bytes().unwrap()[..16].try_into().unwrap(),
            &request.encode(),
            Envelope::fragment_capacity(0),
        )
        .unwrap();
        let envelope = Envelope::Data {
            ack: None,
            fragment: fragments.pop().unwrap(),
        }
        .encode()
        .unwrap();
        let (first_hop, packet) = packet::use_surb(surb, &envelope).unwrap();
        tx.send(&ClientMessage::Send { first_hop, packet })
            .await
            .unwrap();
    }

    // Meanwhile the sender writes to a friend: all of it arrives.
    let sent_at = tokio::time::Instant::now();
    for i in 0..40u8 {
        sender
            .send(ClientAddress::of(&friend, net.gateway), vec![i; 500], 0)
            .await
            .unwrap();
    }
    assert_eq!(
        receive(&mut friend_client, 40, Duration::from_secs(60))
            .await
            .len(),
        40
    );
    let took = sent_at.elapsed();
    // Give the requests time to have all arrived.
    let stats = sender.stats_handle();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while stats.surb_requests_refused.load(Ordering::Relaxed) < (ATTACHED - 2) as u64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "requests refused: {}",
            stats.surb_requests_refused.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let handed_out = stats.surbs_handed_out.load(Ordering::Relaxed) as usize;
    println!(
        "40 messages to a friend in {took:?} during the flood; SURBs handed out {handed_out}, requests refused {}",
        stats.surb_requests_refused.load(Ordering::Relaxed)
    );
    assert!(
        handed_out <= ATTACHED + top_up::PER_ASKER_PER_MINUTE,
        "{handed_out} SURBs handed out"
    );
    assert!(handed_out > ATTACHED, "the first requests were answered");
    drop((tx, rx));
    friend_client.stop().await;
    sender.stop().await;
    net.stop().await;
}
