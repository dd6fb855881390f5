//! The stream protocol between a SOCKS5 client and an exit gateway's network requester:
//! TCP streams carried as numbered frames in mixnet messages.
//!
//! ```text
//! frame = version:u8 (1) || kind:u8 || stream:u64 || seq:u32 || ack:u32 || payload
//! kind  = 0 open     payload = target || first bytes of the stream
//!         1 opened   payload = status:u8 (0 ok, else a SOCKS5 reply code)
//!         2 data     payload = bytes of the stream
//!         3 close    payload empty: the sender's side of the stream is finished
//!         4 ack      payload empty: only `ack` is news
//! target = 1 || ipv4 (4) || port:u16 | 4 || ipv6 (16) || port:u16 | 3 || len:u8 || name || port:u16
//! ```
//!
//! Every frame but `ack` takes the next `seq` of its direction (from 0); the receiver hands
//! frames on in `seq` order exactly once, whatever order and however many times they arrive.
//! Every frame carries `ack`: how many frames of the other direction the sender has taken in
//! order, so the other side can stop resending them.

pub mod relay;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const VERSION: u8 = 1;
pub const HEADER: usize = 1 + 1 + 8 + 4 + 4;

pub type StreamId = u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Ip(IpAddr, u16),
    /// Resolved at the exit, with the exit's resolver.
    Name(String, u16),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Open { target: Target, data: Vec<u8> },
    Opened { status: u8 },
    Data(Vec<u8>),
    Close,
    Ack,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub stream: StreamId,
    pub seq: u32,
    pub ack: u32,
    pub body: Body,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("stream frame too short")]
    Truncated,
    #[error("stream protocol version {0} (this node speaks {VERSION})")]
    Version(u8),
    #[error("unknown stream frame kind {0}")]
    Kind(u8),
    #[error("bad target: {0}")]
    Target(&'static str),
}

impl Frame {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + 64);
        out.push(VERSION);
        out.push(match self.body {
            Body::Open { .. } => 0,
            Body::Opened { .. } => 1,
            Body::Data(_) => 2,
            Body::Close => 3,
            Body::Ack => 4,
        });
        out.extend_from_slice(&self.stream.to_be_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.ack.to_be_bytes());
        match &self.body {
            Body::Open { target, data } => {
                encode_target(target, &mut out);
                out.extend_from_slice(data);
            }
            Body::Opened { status } => out.push(*status),
            Body::Data(d) => out.extend_from_slice(d),
            Body::Close | Body::Ack => {}
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Frame, FrameError> {
        if bytes.len() < HEADER {
            return Err(FrameError::Truncated);
        }
        if bytes[0] != VERSION {
            return Err(FrameError::Version(bytes[0]));
        }
        let u32_at =
            |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let mut stream = [0u8; 8];
        stream.copy_from_slice(&bytes[2..10]);
        let payload = &bytes[HEADER..];
        let body = match bytes[1] {
            0 => {
                let (target, used) = decode_target(payload)?;
                Body::Open {
                    target,
                    data: payload[used..].to_vec(),
                }
            }
            1 => Body::Opened {
                status: *payload.first().ok_or(FrameError::Truncated)?,
            },
            2 => Body::Data(payload.to_vec()),
            3 => Body::Close,
            4 => Body::Ack,
            k => return Err(FrameError::Kind(k)),
        };
        Ok(Frame {
            stream: u64::from_be_bytes(stream),
            seq: u32_at(10),
            ack: u32_at(14),
            body,
        })
    }

    /// Whether the frame takes a sequence number (everything but a bare ack).
    pub fn is_sequenced(&self) -> bool {
        !matches!(self.body, Body::Ack)
    }
}

fn encode_target(t: &Target, out: &mut Vec<u8>) {
    match t {
        Target::Ip(IpAddr::V4(a), port) => {
            out.push(1);
            out.extend_from_slice(&a.octets());
            out.extend_from_slice(&port.to_be_bytes());
        }
        Target::Ip(IpAddr::V6(a), port) => {
            out.push(4);
            out.extend_from_slice(&a.octets());
            out.extend_from_slice(&port.to_be_bytes());
        }
        Target::Name(name, port) => {
            out.push(3);
            let name = &name.as_bytes()[..name.len().min(255)];
            out.push(name.len() as u8);
            out.extend_from_slice(name);
            out.extend_from_slice(&port.to_be_bytes());
        }
    }
}

fn decode_target(b: &[u8]) -> Result<(Target, usize), FrameError> {
    let port_at = |i: usize| -> Result<u16, FrameError> {
        b.get(i..i + 2)
            .map(|p| u16::from_be_bytes([p[0], p[1]]))
            .ok_or(FrameError::Truncated)
    };
    match b.first() {
        Some(1) => {
            let a: [u8; 4] = b
                .get(1..5)
                .ok_or(FrameError::Truncated)?
                .try_into()
                .map_err(|_| FrameError::Truncated)?;
            Ok((Target::Ip(IpAddr::V4(Ipv4Addr::from(a)), port_at(5)?), 7))
        }
        Some(4) => {
            let a: [u8; 16] = b
                .get(1..17)
                .ok_or(FrameError::Truncated)?
                .try_into()
                .map_err(|_| FrameError::Truncated)?;
            Ok((Target::Ip(IpAddr::V6(Ipv6Addr::from(a)), port_at(17)?), 19))
        }
        Some(3) => {
            let len = *b.get(1).ok_or(FrameError::Truncated)? as usize;
            let name = b.get(2..2 + len).ok_or(FrameError::Truncated)?;
            let name =
                std::str::from_utf8(name).map_err(|_| FrameError::Target("name is not UTF-8"))?;
            if name.is_empty() {
                return Err(FrameError::Target("empty name"));
            }
            Ok((Target::Name(name.to_string(), port_at(2 + len)?), 4 + len))
        }
        Some(_) => Err(FrameError::Target("unknown address type")),
        None => Err(FrameError::Truncated),
    }
}

/// Puts one direction's frames back in order: each sequenced frame is handed on once, in
/// `seq` order; duplicates and frames already handed on are dropped. Bounded: a frame more
/// than `window` ahead of the next expected one is refused (the sender resends it later).
#[derive(Debug)]
pub struct Reorder {
    next: u32,
    held: BTreeMap<u32, Frame>,
    window: u32,
}

/// What [`Reorder::push`] did with a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Frames now deliverable, in order (possibly several, when a gap closed).
    Ready(Vec<Frame>),
    /// Held until the frames before it arrive.
    Held,
    /// Seen before (or a bare ack): nothing to do.
    Duplicate,
    /// Too far ahead of what is expected.
    OutOfWindow,
}

impl Reorder {
    pub fn new(window: u32) -> Self {
        Reorder {
            next: 0,
            held: BTreeMap::new(),
            window,
        }
    }

    /// How many frames were handed on in order: the `ack` to send back.
    pub fn acked(&self) -> u32 {
        self.next
    }

    pub fn push(&mut self, frame: Frame) -> Pushed {
        if !frame.is_sequenced() || frame.seq < self.next || self.held.contains_key(&frame.seq) {
            return Pushed::Duplicate;
        }
        if frame.seq - self.next >= self.window {
            return Pushed::OutOfWindow;
        }
        if frame.seq > self.next {
            self.held.insert(frame.seq, frame);
            return Pushed::Held;
        }
        let mut ready = vec![frame];
        self.next += 1;
        while let Some(f) = self.held.remove(&self.next) {
            ready.push(f);
            self.next += 1;
        }
        Pushed::Ready(ready)
    }
}

/// One direction's sending side: numbers frames, keeps each until the other side's `ack`
/// covers it, and says which are due again. A window bounds how many may be unacknowledged
/// (flow control: a stalled reader stops the writer instead of growing a queue).
///
/// When a frame is due again adapts to the path, as TCP's timer does (RFC 6298): the
/// round trips of frames acknowledged after one send give a smoothed estimate, the timeout
/// is that plus four deviations (never below the configured one), and each resend of a frame
/// doubles its wait. A client's paced link can hold frames for seconds; a fixed timeout
/// would resend a whole window each time and choke that link with copies.
#[derive(Debug)]
pub struct Outbound {
    stream: StreamId,
    next: u32,
    unacked: BTreeMap<u32, Unacked>,
    window: usize,
    srtt: Option<std::time::Duration>,
    rttvar: std::time::Duration,
}

/// The longest a frame waits before it is sent again, however slow the path looked.
pub const MAX_RTO: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Debug)]
struct Unacked {
    frame: Frame,
    sent_at: std::time::Instant,
    sends: u32,
}

impl Outbound {
    pub fn new(stream: StreamId, window: usize) -> Self {
        Outbound {
            stream,
            next: 0,
            unacked: BTreeMap::new(),
            window,
            srtt: None,
            rttvar: std::time::Duration::ZERO,
        }
    }

    /// The timeout for a first resend: the estimate, at least `floor`.
    pub fn rto(&self, floor: std::time::Duration) -> std::time::Duration {
        let estimate = self.srtt.map_or(floor, |srtt| srtt + 4 * self.rttvar);
        estimate.max(floor).min(MAX_RTO)
    }

    /// How long a frame sent `sends` times waits before it is due again.
    fn wait(&self, sends: u32, floor: std::time::Duration) -> std::time::Duration {
        let doubled = 1u32 << sends.saturating_sub(1).min(16);
        self.rto(floor).saturating_mul(doubled).min(MAX_RTO)
    }

    fn sample(&mut self, rtt: std::time::Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                let deviation = srtt.abs_diff(rtt);
                self.rttvar = (self.rttvar * 3 + deviation) / 4;
                self.srtt = Some((srtt * 7 + rtt) / 8);
            }
        }
    }

    /// Whether another frame may be sent now.
    pub fn has_room(&self) -> bool {
        self.unacked.len() < self.window
    }

    /// Frames sent and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.unacked.len()
    }

    /// Numbers `body` as the next frame, stamped with our `ack` of the other direction, and
    /// keeps it until acknowledged. A bare ack takes no number and is not kept.
    pub fn send(&mut self, body: Body, ack: u32, now: std::time::Instant) -> Frame {
        let sequenced = !matches!(body, Body::Ack);
        let frame = Frame {
            stream: self.stream,
            seq: if sequenced {
                self.next
            } else {
                self.next.saturating_sub(1)
            },
            ack,
            body,
        };
        if sequenced {
            self.unacked.insert(
                self.next,
                Unacked {
                    frame: frame.clone(),
                    sent_at: now,
                    sends: 1,
                },
            );
            self.next += 1;
        }
        frame
    }

    /// The other side has taken every frame below `ack`, as of `now`: the newest of them
    /// sent only once gives a round-trip sample (a resent one could answer either copy).
    pub fn acked(&mut self, ack: u32, now: std::time::Instant) {
        let mut newest_once = None;
        while let Some(entry) = self.unacked.first_entry() {
            if *entry.key() >= ack {
                break;
            }
            let u = entry.remove();
            if u.sends == 1 {
                newest_once = Some(u.sent_at);
            }
        }
        if let Some(sent_at) = newest_once {
            self.sample(now.saturating_duration_since(sent_at));
        }
    }

    /// Frames unacknowledged for their wait (see the type's doc; `rto` is its floor) since
    /// they were last sent, oldest first, stamped with the current `ack` and marked sent
    /// again; `None` when one was already sent `max_sends` times (the stream is dead).
    pub fn due(
        &mut self,
        now: std::time::Instant,
        rto: std::time::Duration,
        ack: u32,
        max_sends: u32,
    ) -> Option<Vec<Frame>> {
        let mut again = Vec::new();
        let waits: Vec<std::time::Duration> = self
            .unacked
            .values()
            .map(|u| self.wait(u.sends, rto))
            .collect();
        for (u, wait) in self.unacked.values_mut().zip(waits) {
            if now.saturating_duration_since(u.sent_at) < wait {
                continue;
            }
            if u.sends >= max_sends {
                return None;
            }
            u.sends += 1;
            u.sent_at = now;
            u.frame.ack = ack;
            again.push(u.frame.clone());
        }
        Some(again)
    }

    /// When the oldest unacknowledged frame is next due, if any is.
    pub fn next_due(&self, rto: std::time::Duration) -> Option<std::time::Instant> {
        self.unacked
            .values()
            .map(|u| u.sent_at + self.wait(u.sends, rto))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(seq: u32, b: &[u8]) -> Frame {
        Frame {
            stream: 9,
            seq,
            ack: 0,
            body: Body::Data(b.to_vec()),
        }
    }

    #[test]
    fn every_kind_round_trips() {
        for body in [
            Body::Open {
                target: Target::Name("example.org".into(), 443),
                data: b"GET / HTTP/1.1\r\n".to_vec(),
            },
            Body::Open {
                target: Target::Ip("192.0.2.1".parse().unwrap(), 80),
                data: Vec::new(),
            },
            Body::Open {
                target: Target::Ip("2001:db8::1".parse().unwrap(), 8443),
                data: vec![1, 2, 3],
            },
            Body::Opened { status: 2 },
            Body::Data(vec![7; 1500]),
            Body::Close,
            Body::Ack,
        ] {
            let f = Frame {
                stream: u64::MAX - 3,
                seq: 41,
                ack: 17,
                body,
            };
            assert_eq!(Frame::decode(&f.encode()).unwrap(), f);
        }
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        assert_eq!(Frame::decode(&[1, 2]), Err(FrameError::Truncated));
        let mut f = data(0, b"x").encode();
        f[0] = 9;
        assert_eq!(Frame::decode(&f), Err(FrameError::Version(9)));
        let mut f = data(0, b"x").encode();
        f[1] = 77;
        assert_eq!(Frame::decode(&f), Err(FrameError::Kind(77)));
        let mut open = Frame {
            stream: 1,
            seq: 0,
            ack: 0,
            body: Body::Open {
                target: Target::Name("a.example".into(), 1),
                data: Vec::new(),
            },
        }
        .encode();
        open.truncate(HEADER + 4);
        assert_eq!(Frame::decode(&open), Err(FrameError::Truncated));
    }

    #[test]
    fn frames_are_handed_on_in_order_once() {
        let mut r = Reorder::new(8);
        assert_eq!(r.push(data(1, b"b")), Pushed::Held);
        assert_eq!(r.push(data(1, b"b")), Pushed::Duplicate);
        assert_eq!(r.push(data(2, b"c")), Pushed::Held);
        match r.push(data(0, b"a")) {
            Pushed::Ready(fs) => {
                assert_eq!(fs.iter().map(|f| f.seq).collect::<Vec<_>>(), [0, 1, 2])
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(r.acked(), 3);
        assert_eq!(r.push(data(0, b"a")), Pushed::Duplicate);
        assert_eq!(r.push(data(11, b"far")), Pushed::OutOfWindow);
    }

    #[test]
    fn frames_are_kept_until_acknowledged_and_resent_when_due() {
        use std::time::{Duration, Instant};
        let t0 = Instant::now();
        let rto = Duration::from_secs(2);
        let mut out = Outbound::new(5, 3);
        let f0 = out.send(Body::Data(b"a".to_vec()), 0, t0);
        let f1 = out.send(Body::Data(b"b".to_vec()), 0, t0);
        assert_eq!((f0.seq, f1.seq, f0.stream), (0, 1, 5));
        let ack = out.send(Body::Ack, 4, t0);
        assert_eq!(ack.ack, 4);
        assert_eq!(out.in_flight(), 2, "a bare ack is not kept");
        out.send(Body::Close, 0, t0 + Duration::from_secs(1));
        assert!(!out.has_room(), "the window is full");
        assert_eq!(
            out.due(t0 + Duration::from_secs(1), rto, 0, 5),
            Some(vec![])
        );
        // Two seconds on, the two oldest are due, stamped with the current ack.
        let again = out.due(t0 + rto, rto, 9, 5).unwrap();
        assert_eq!(
            again.iter().map(|f| (f.seq, f.ack)).collect::<Vec<_>>(),
            [(0, 9), (1, 9)]
        );
        // Acked after a resend: no round-trip sample, the timeout stays the floor.
        out.acked(2, t0 + Duration::from_secs(2));
        assert_eq!(out.rto(rto), rto);
        assert_eq!(out.in_flight(), 1);
        assert!(out.has_room());
        assert_eq!(out.next_due(rto), Some(t0 + Duration::from_secs(3)));
        // A frame sent max_sends times without an ack kills the stream; each resend waits
        // twice as long as the one before.
        assert!(out.due(t0 + Duration::from_secs(3), rto, 0, 3).is_some());
        assert_eq!(out.next_due(rto), Some(t0 + Duration::from_secs(3 + 4)));
        assert_eq!(
            out.due(t0 + Duration::from_secs(6), rto, 0, 3),
            Some(vec![])
        );
        assert!(out.due(t0 + Duration::from_secs(7), rto, 0, 3).is_some());
        assert_eq!(out.due(t0 + Duration::from_secs(7 + 8), rto, 0, 3), None);
    }

    #[test]
    fn the_resend_timeout_follows_the_round_trips_it_measures() {
        use std::time::{Duration, Instant};
        let floor = Duration::from_secs(1);
        let mut t = Instant::now();
        let mut out = Outbound::new(5, 64);
        // A slow path: every frame answered 4 s after it left.
        for _ in 0..20 {
            out.send(Body::Data(b"x".to_vec()), 0, t);
            t += Duration::from_secs(4);
            out.acked(out.next, t);
        }
        let rto = out.rto(floor);
        assert!(rto >= Duration::from_secs(4), "{rto:?}");
        assert!(rto < Duration::from_secs(6), "{rto:?}");
        // So a frame in flight for 3 s is not resent, where the floor alone would have.
        out.send(Body::Data(b"y".to_vec()), 0, t);
        assert_eq!(
            out.due(t + Duration::from_secs(3), floor, 0, 5),
            Some(vec![])
        );
        assert_eq!(out.rto(Duration::from_secs(600)), MAX_RTO);
    }

    /// Both directions over a channel that loses and reorders frames: every byte arrives, in
    /// order, once.
    #[test]
    fn a_lossy_reordering_channel_still_delivers_the_stream_in_order() {
        use rand::{RngExt, SeedableRng};
        use std::time::{Duration, Instant};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let rto = Duration::from_millis(100);
        let mut now = Instant::now();
        let mut tx = Outbound::new(1, 16);
        let mut rx = Reorder::new(64);
        let mut in_air: Vec<Frame> = Vec::new();
        let mut got = Vec::new();
        let mut next_byte = 0u8;
        for _ in 0..2000 {
            now += Duration::from_millis(10);
            if tx.has_room() && next_byte < 200 {
                in_air.push(tx.send(Body::Data(vec![next_byte]), 0, now));
                next_byte += 1;
            }
            in_air.extend(tx.due(now, rto, 0, 1000).unwrap());
            // Deliver a random frame in the air, losing 20%.
            if !in_air.is_empty() {
                let f = in_air.swap_remove(rng.random_range(0..in_air.len()));
                if rng.random_bool(0.8) {
                    if let Pushed::Ready(fs) = rx.push(f) {
                        for f in fs {
                            if let Body::Data(d) = f.body {
                                got.extend(d);
                            }
                        }
                    }
                    // The receiver's ack comes back (and may be lost too).
                    if rng.random_bool(0.8) {
                        tx.acked(rx.acked(), now);
                    }
                }
            }
        }
        assert_eq!(got, (0..200).collect::<Vec<u8>>());
    }

    proptest! {
        #[test]
        fn any_arrival_order_with_duplicates_yields_the_stream(order in Just((0u32..40).collect::<Vec<_>>()).prop_shuffle(), dups in proptest::collection::vec(0u32..40, 0..20)) {
            let mut r = Reorder::new(64);
            let mut out = Vec::new();
            for seq in order.iter().chain(dups.iter()) {
                if let Pushed::Ready(fs) = r.push(data(*seq, &seq.to_be_bytes())) {
                    out.extend(fs.into_iter().map(|f| f.seq));
                }
            }
            prop_assert_eq!(out, (0u32..40).collect::<Vec<_>>());
        }

        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Frame::decode(&bytes);
        }
    }
}
