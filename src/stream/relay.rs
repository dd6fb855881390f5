//! One stream's pump between a TCP socket and the mixnet, the same at both ends (the
//! SOCKS5 client and the exit's network requester): bytes read from the socket leave as
//! numbered `data` frames, frames from the other side are put back in order and written
//! to the socket, every frame carries our `ack`, and what the other side has not
//! acknowledged is sent again.
//!
//! Frames travel through a multiplexer that owns the mixnet client: it hands this stream
//! the frames addressed to it and takes the frames it sends ([`Outgoing`]).

use std::time::Duration;

use prometheus::IntCounter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Body, Frame, Outbound, Pushed, Reorder, StreamId};

/// Most SURBs one frame's message grants (each is about 400 bytes of the message).
const MAX_GRANT: u32 = 32;

#[derive(Debug, Clone)]
pub struct Settings {
    /// Frames one side may have unacknowledged (and the reorder window of the other).
    pub window: usize,
    /// How long a frame waits for its ack before it is sent again.
    pub rto: Duration,
    /// Sends of one frame after which the other side is taken for gone.
    pub max_sends: u32,
    /// How long an ack may wait to ride on a data frame before it goes alone.
    pub ack_delay: Duration,
    /// A stream with no frame either way for this long is closed.
    pub idle_timeout: Duration,
    /// Most stream bytes in one `data` frame.
    pub chunk: usize,
    /// The SOCKS5 client's side: attach reply SURBs to what it sends so that about this
    /// many stay with the other side (it answers through them, one per frame).
    pub surb_target: Option<u32>,
    /// SURBs the first frame grants (kept small: the open request is on the critical path
    /// of the first byte, and every SURB makes it longer).
    pub surb_first: u32,
    /// After a stream finished, how long late copies of the other side's last frames are
    /// still answered with an ack (TCP's TIME_WAIT): our last ack may have been lost, and
    /// the other side resends until it hears one. A few of the other side's resend timeouts.
    pub linger: Duration,
}

/// A frame on its way to the multiplexer, with how many reply SURBs to attach to it.
#[derive(Debug)]
pub struct Outgoing {
    pub frame: Frame,
    pub surbs: u32,
    /// The exit's side: the sender tag whose SURBs carry the frame back to the client.
    pub reply_tag: Option<[u8; 16]>,
}

/// Why a stream ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// Both sides closed and everything was acknowledged.
    Finished,
    /// Nothing moved for the idle timeout.
    Idle,
    /// A frame went unacknowledged after every resend.
    PeerGone,
    /// The multiplexer stopped.
    MixnetGone,
    /// The socket failed.
    Socket(std::io::ErrorKind),
}

/// Live byte counts of a stream (the exit's metrics).
#[derive(Clone)]
pub struct ByteCounters {
    pub from_socket: IntCounter,
    pub to_socket: IntCounter,
}

/// The socket's writing half, as the other side's bodies reach it.
struct SocketWriter {
    wr: tokio::net::tcp::OwnedWriteHalf,
    /// Until the other side's close (or a failed write).
    open: bool,
    counters: Option<ByteCounters>,
}

impl SocketWriter {
    /// Writes `data` or passes on a `close`; false when the socket's reader is gone (a write
    /// failed), so there is nothing more to read or deliver either.
    async fn deliver(&mut self, body: Body) -> bool {
        match body {
            Body::Data(bytes) if self.open => {
                if let Err(e) = self.wr.write_all(&bytes).await {
                    tracing::debug!(error = %e, "stream socket write failed");
                    self.open = false;
                    return false;
                }
                if let Some(c) = &self.counters {
                    c.to_socket.inc_by(bytes.len() as u64);
                }
            }
            Body::Close if self.open => {
                self.open = false;
                let _ = self.wr.shutdown().await;
            }
            _ => {}
        }
        true
    }
}

/// A stream's protocol state, shared by the opening phase and the pump.
pub struct Stream {
    settings: Settings,
    outbound: Outbound,
    reorder: Reorder,
    incoming: mpsc::Receiver<Frame>,
    out: mpsc::Sender<Outgoing>,
    reply_tag: Option<[u8; 16]>,
    /// The `ack` last sent, and when an ack is owed.
    sent_ack: u32,
    ack_due: Option<Instant>,
    /// Reply SURBs granted to, and frames received from (each used one), the other side.
    granted: u64,
    received: u64,
    last_activity: Instant,
    /// Bodies taken in order before the pump started (they came with the open exchange).
    early: Vec<Body>,
}

impl Stream {
    pub fn new(
        id: StreamId,
        settings: Settings,
        incoming: mpsc::Receiver<Frame>,
        out: mpsc::Sender<Outgoing>,
        reply_tag: Option<[u8; 16]>,
    ) -> Self {
        Stream {
            outbound: Outbound::new(id, settings.window),
            reorder: Reorder::new(settings.window as u32),
            settings,
            incoming,
            out,
            reply_tag,
            sent_ack: 0,
            ack_due: None,
            granted: 0,
            received: 0,
            last_activity: Instant::now(),
            early: Vec::new(),
        }
    }

    /// Numbers and sends `body`.
    pub async fn send(&mut self, body: Body) -> Result<(), End> {
        let ack = self.reorder.acked();
        let frame = self.outbound.send(body, ack, std::time::Instant::now());
        self.emit(frame).await
    }

    async fn emit(&mut self, frame: Frame) -> Result<(), End> {
        self.sent_ack = self.sent_ack.max(frame.ack);
        if self.sent_ack >= self.reorder.acked() {
            self.ack_due = None;
        }
        let surbs = match self.settings.surb_target {
            Some(target) => {
                let outstanding = self.granted.saturating_sub(self.received);
                let limit = if self.granted == 0 {
                    self.settings.surb_first
                } else {
                    MAX_GRANT
                };
                let grant = (target as u64)
                    .saturating_sub(outstanding)
                    .min(limit as u64);
                self.granted += grant;
                grant as u32
            }
            None => 0,
        };
        self.out
            .send(Outgoing {
                frame,
                surbs,
                reply_tag: self.reply_tag,
            })
            .await
            .map_err(|_| End::MixnetGone)
    }

    /// Takes in a frame of the other side; returns what is now deliverable, in order.
    fn take(&mut self, frame: Frame) -> Vec<Body> {
        self.received += 1;
        self.last_activity = Instant::now();
        self.outbound.acked(frame.ack, std::time::Instant::now());
        let sequenced = frame.is_sequenced();
        let ready = match self.reorder.push(frame) {
            Pushed::Ready(frames) => frames.into_iter().map(|f| f.body).collect(),
            _ => Vec::new(),
        };
        // Every sequenced frame, a duplicate too (our ack may have been lost), is owed an ack.
        if sequenced && self.ack_due.is_none() {
            self.ack_due = Some(Instant::now() + self.settings.ack_delay);
        }
        ready
    }

    fn next_wake(&self) -> Instant {
        let idle = self.last_activity + self.settings.idle_timeout;
        let resend = self
            .outbound
            .next_due(self.settings.rto)
            .map(Instant::from_std);
        [Some(idle), resend, self.ack_due]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(idle)
    }

    /// Resends what is due and sends an owed ack.
    async fn on_timer(&mut self) -> Result<(), End> {
        let now = Instant::now();
        if now >= self.last_activity + self.settings.idle_timeout {
            return Err(End::Idle);
        }
        let ack = self.reorder.acked();
        let again = self
            .outbound
            .due(
                now.into_std(),
                self.settings.rto,
                ack,
                self.settings.max_sends,
            )
            .ok_or(End::PeerGone)?;
        for frame in again {
            self.emit(frame).await?;
        }
        if self.ack_due.is_some_and(|at| now >= at) {
            self.ack_due = None;
            self.send(Body::Ack).await?;
        }
        Ok(())
    }

    /// Hands bodies taken by [`Stream::next_bodies`] but not used back to the pump, which
    /// delivers them first.
    pub fn put_back(&mut self, bodies: impl IntoIterator<Item = Body>) {
        self.early.extend(bodies);
    }

    /// Waits (at most `limit`) until the other side has acknowledged everything sent: an
    /// answer that ends the stream (a refusal) still arrives through a lossy mixnet.
    pub async fn settle(&mut self, limit: Duration) {
        let until = Instant::now() + limit;
        while self.outbound.in_flight() > 0 && Instant::now() < until {
            let wake = self.next_wake().min(until);
            tokio::select! {
                frame = self.incoming.recv() => match frame {
                    Some(f) => { self.take(f); }
                    None => return,
                },
                _ = tokio::time::sleep_until(wake) => {
                    if self.on_timer().await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Waits for the next bodies the other side sent, in order, keeping up resends and
    /// acks meanwhile (the opening phase, before there is a socket to pump).
    pub async fn next_bodies(&mut self) -> Result<Vec<Body>, End> {
        loop {
            let wake = self.next_wake();
            tokio::select! {
                frame = self.incoming.recv() => {
                    let bodies = self.take(frame.ok_or(End::MixnetGone)?);
                    if !bodies.is_empty() {
                        return Ok(bodies);
                    }
                }
                _ = tokio::time::sleep_until(wake) => self.on_timer().await?,
            }
        }
    }

    /// Relays between `socket` and the other side until both directions are closed and
    /// acknowledged. `first_byte` runs when the socket first yields data.
    pub async fn pump(
        &mut self,
        socket: TcpStream,
        counters: Option<ByteCounters>,
        mut first_byte: Option<Box<dyn FnOnce() + Send>>,
    ) -> End {
        let (mut rd, wr) = socket.into_split();
        let mut buf = vec![0u8; self.settings.chunk];
        let mut reading = true;
        let mut writer = SocketWriter {
            wr,
            open: true,
            counters: counters.clone(),
        };
        for body in std::mem::take(&mut self.early) {
            reading &= writer.deliver(body).await;
        }
        let end = loop {
            if !reading && !writer.open && self.outbound.in_flight() == 0 {
                break End::Finished;
            }
            let (wake, room) = (self.next_wake(), self.outbound.has_room());
            tokio::select! {
                read = rd.read(&mut buf), if reading && room => {
                    let body = match read {
                        Ok(0) | Err(_) => {
                            reading = false;
                            Body::Close
                        }
                        Ok(n) => {
                            if let Some(f) = first_byte.take() {
                                f();
                            }
                            if let Some(c) = &counters {
                                c.from_socket.inc_by(n as u64);
                            }
                            self.last_activity = Instant::now();
                            Body::Data(buf[..n].to_vec())
                        }
                    };
                    if let Err(e) = self.send(body).await {
                        break e;
                    }
                }
                frame = self.incoming.recv() => {
                    let Some(frame) = frame else { break End::MixnetGone };
                    for body in self.take(frame) {
                        reading &= writer.deliver(body).await;
                    }
                }
                _ = tokio::time::sleep_until(wake) => {
                    if let Err(e) = self.on_timer().await {
                        break e;
                    }
                }
            }
        };
        // The other side's last frames (its close) are acknowledged before we go, so it
        // need not resend them to a stream that no longer exists.
        if end == End::Finished && self.sent_ack < self.reorder.acked() {
            let _ = self.send(Body::Ack).await;
        }
        end
    }

    /// Once finished: answers every late frame of the other side with an ack for
    /// `Settings::linger`, so the other side finishes too even when our last ack was lost.
    pub async fn linger(&mut self) {
        let until = Instant::now() + self.settings.linger;
        loop {
            tokio::select! {
                frame = self.incoming.recv() => {
                    let Some(frame) = frame else { return };
                    let _ = self.take(frame);
                    if self.send(Body::Ack).await.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep_until(until) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn settings() -> Settings {
        Settings {
            window: 16,
            rto: Duration::from_millis(150),
            max_sends: 50,
            ack_delay: Duration::from_millis(10),
            idle_timeout: Duration::from_secs(30),
            chunk: 1000,
            surb_target: None,
            surb_first: 0,
            linger: Duration::from_secs(3),
        }
    }

    /// A mixnet between the two ends that loses one frame in 5 at random and delays each
    /// of the others by 0-30 ms, so they also arrive out of order. (Losing exactly every
    /// 5th frame is not a mixnet: a resend round of the same shape can then lose the same
    /// frame every time, until the sender gives up.)
    fn lossy(mut from: mpsc::Receiver<Outgoing>, to: mpsc::Sender<Frame>) {
        tokio::spawn(async move {
            while let Some(out) = from.recv().await {
                if rand::random::<u8>().is_multiple_of(5) {
                    continue;
                }
                let to = to.clone();
                let wait = Duration::from_millis(rand::random::<u64>() % 30);
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    let _ = to.send(out.frame).await;
                });
            }
        });
    }

    /// A connected socket pair: (the application's side, the pump's side).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (pumped, _) = l.accept().await.unwrap();
        (app, pumped)
    }

    #[tokio::test]
    async fn bytes_cross_a_lossy_reordering_channel_both_ways_and_both_ends_finish() {
        let (a_out_tx, a_out_rx) = mpsc::channel(1024);
        let (b_out_tx, b_out_rx) = mpsc::channel(1024);
        let (a_in_tx, a_in_rx) = mpsc::channel(1024);
        let (b_in_tx, b_in_rx) = mpsc::channel(1024);
        // The mixnet outlives either end: an end that finishes first does not close the
        // other's inbound channel.
        let _mixnet = (a_in_tx.clone(), b_in_tx.clone());
        lossy(a_out_rx, b_in_tx);
        lossy(b_out_rx, a_in_tx);
        let a = Stream::new(7, settings(), a_in_rx, a_out_tx, None);
        let b = Stream::new(7, settings(), b_in_rx, b_out_tx, None);
        let (mut app_a, sock_a) = pair().await;
        let (mut app_b, sock_b) = pair().await;
        // Each end lingers once finished, as the exit and the SOCKS5 client do.
        let run = |mut s: Stream, sock| async move {
            let end = s.pump(sock, None, None).await;
            if end == End::Finished {
                s.linger().await;
            }
            end
        };
        let pump_a = tokio::spawn(run(a, sock_a));
        let pump_b = tokio::spawn(run(b, sock_b));

        let sent: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let to_send = sent.clone();
        let writer = tokio::spawn(async move {
            app_a.write_all(&to_send).await.unwrap();
            app_a.shutdown().await.unwrap();
            let mut answer = Vec::new();
            app_a.read_to_end(&mut answer).await.unwrap();
            answer
        });
        // B's application reads to the end (A's close must arrive), then answers and closes.
        let mut got = Vec::new();
        app_b.read_to_end(&mut got).await.unwrap();
        app_b.write_all(b"thanks").await.unwrap();
        app_b.shutdown().await.unwrap();

        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "bytes differ");
        assert_eq!(writer.await.unwrap(), b"thanks");
        // Both ends finish: when the very last ack is lost, the end that finished first
        // answers the other's resend while it lingers.
        let ends = (pump_a.await.unwrap(), pump_b.await.unwrap());
        assert_eq!(ends, (End::Finished, End::Finished));
    }

    #[tokio::test]
    async fn a_side_that_never_answers_is_given_up_after_max_sends() {
        let (out_tx, mut out_rx) = mpsc::channel(1024);
        let (_in_tx, in_rx) = mpsc::channel(16);
        let mut s = Stream::new(
            1,
            Settings {
                max_sends: 3,
                ..settings()
            },
            in_rx,
            out_tx,
            None,
        );
        let sent = tokio::spawn(async move {
            let mut n = 0;
            while out_rx.recv().await.is_some() {
                n += 1;
            }
            n
        });
        s.send(Body::Open {
            target: super::super::Target::Name("example.org".into(), 80),
            data: Vec::new(),
        })
        .await
        .unwrap();
        assert_eq!(s.next_bodies().await, Err(End::PeerGone));
        drop(s);
        assert_eq!(sent.await.unwrap(), 3, "sent once and resent twice");
    }
}
