//! Raw protocol peers over real TCP sockets on 127.0.0.1: a publisher that posts prepared
//! envelopes (a member re-posting captured ones), a fake relay that sends chosen frames, and
//! a proxy that records every frame a client sends.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use whispeer::core::{self, SealPolicy};
use whispeer::protocol::frame::{self, Welcome};
use whispeer::protocol::{Envelope, Frame, Qos, Sealer};
use whispeer::{Identity, Keyring, Topic, TreeKey};

pub async fn write_frame(s: &mut (impl AsyncWriteExt + Unpin), f: &Frame) {
    let b = f.to_bytes();
    s.write_all(&(b.len() as u32).to_be_bytes()).await.unwrap();
    s.write_all(&b).await.unwrap();
    s.flush().await.unwrap();
}

/// The next frame's bytes, or `None` at the end of the stream.
pub async fn read_raw(s: &mut (impl AsyncReadExt + Unpin)) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.ok()?;
    let mut b = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut b).await.ok()?;
    Some(b)
}

pub async fn read_frame(s: &mut (impl AsyncReadExt + Unpin)) -> Option<Frame> {
    let b = read_raw(s).await?;
    Some(Frame::decode_slice(&b).expect("a valid frame"))
}

/// Seals `value` (CBOR) on `topic`, dated `ts_ms`, signed by `by` (unsigned with `None`).
pub fn seal(
    tree: &TreeKey,
    by: Option<&Identity>,
    topic: &str,
    value: u32,
    ts_ms: u64,
) -> Envelope {
    let mut keys = Keyring::new();
    keys.add_tree_key(tree).unwrap();
    let kr = RwLock::new(keys);
    let payload = whispeer::to_cbor(&value).unwrap();
    core::seal_publish(
        &kr,
        by,
        &SealPolicy::default(),
        &mut Sealer::new(),
        &Topic::new(topic).unwrap(),
        core::CBOR,
        &payload,
        ts_ms,
        &mut rand::rngs::OsRng,
    )
    .unwrap()
    .0
}

/// The same envelope with its last byte (in the AEAD tag) flipped: it routes, never opens.
pub fn tamper(env: &Envelope) -> Envelope {
    let mut b = env.as_bytes().to_vec();
    let n = b.len() - 1;
    b[n] ^= 0x01;
    Envelope::from_slice(&b).unwrap()
}

/// A bare protocol connection that publishes prepared envelopes.
pub struct RawPublisher {
    s: TcpStream,
}

impl RawPublisher {
    pub async fn connect(addr: SocketAddr) -> Self {
        let mut s = TcpStream::connect(addr).await.unwrap();
        write_frame(&mut s, &whispeer::core::ClientCore::hello("raw-publisher")).await;
        loop {
            match read_frame(&mut s).await.expect("welcome") {
                Frame::Welcome(_) => break,
                Frame::Challenge(_) => panic!("relay wants auth"),
                _ => {}
            }
        }
        RawPublisher { s }
    }

    /// Publishes at least once (optionally retained); returns the relay sequence.
    pub async fn publish(&mut self, env: &Envelope, retain: bool) -> u64 {
        let pid: [u8; 16] = rand::random();
        let f = core::pub_frame(env.clone(), Some(pid), retain, Qos::AtLeastOnce);
        write_frame(&mut self.s, &f).await;
        loop {
            match read_frame(&mut self.s).await.expect("puback") {
                Frame::PubAck(a) if a.publish_id == pid => return a.seq,
                Frame::Err(e) => panic!("relay refused the publish: {}", e.message),
                Frame::Ping(p) => {
                    write_frame(&mut self.s, &Frame::Pong(frame::Pong { nonce: p.nonce })).await;
                }
                _ => {}
            }
        }
    }
}

/// Whether a proxy passes a frame on (its bytes, without the length prefix); it may also
/// look at it.
type FrameFilter = Arc<dyn Fn(&[u8]) -> bool + Send + Sync>;

/// A TCP proxy on 127.0.0.1:0 joining each client to a new connection to `upstream`,
/// passing length-prefixed frames through `up` (client → relay) and `down` (relay →
/// client): a frame goes on when its filter returns true. Returns its address.
async fn frame_proxy(upstream: SocketAddr, up: FrameFilter, down: FrameFilter) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let Ok(relay) = TcpStream::connect(upstream).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (rr, rw) = relay.into_split();
            let (up, down) = (up.clone(), down.clone());
            tokio::spawn(async move {
                tokio::select! {
                    () = pump(cr, rw, up) => {}
                    () = pump(rr, cw, down) => {}
                }
            });
        }
    });
    addr
}

/// Passes the frames `keep` keeps from `r` to `w` until either side ends.
async fn pump(
    mut r: impl AsyncReadExt + Unpin,
    mut w: impl AsyncWriteExt + Unpin,
    keep: FrameFilter,
) {
    while let Some(b) = read_raw(&mut r).await {
        if keep(&b)
            && (w.write_all(&(b.len() as u32).to_be_bytes()).await.is_err()
                || w.write_all(&b).await.is_err())
        {
            return;
        }
    }
}

/// A proxy between a client and a relay that records every frame the client sends.
pub struct RecordingProxy {
    pub addr: SocketAddr,
    pub sent: Arc<Mutex<Vec<Frame>>>,
    /// Counts recorded frames; wakes [`RecordingProxy::wait_acks`].
    recorded: tokio::sync::watch::Receiver<u64>,
}

impl RecordingProxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let rec = sent.clone();
        let (bump, recorded) = tokio::sync::watch::channel(0u64);
        let up: FrameFilter = Arc::new(move |b| {
            if let Ok(f) = Frame::decode_slice(b) {
                rec.lock().unwrap().push(f);
                bump.send_modify(|n| *n += 1);
            }
            true
        });
        let addr = frame_proxy(upstream, up, Arc::new(|_| true)).await;
        RecordingProxy {
            addr,
            sent,
            recorded,
        }
    }

    /// Waits (on the recorded frames, not a timer) until `cond` holds for the acked
    /// sequences; returns them. Bounded by the caller's `within`.
    pub async fn wait_acks(&self, cond: impl Fn(&[u64]) -> bool) -> Vec<u64> {
        let mut rx = self.recorded.clone();
        loop {
            let a: Vec<u64> = self.acks().into_iter().flatten().collect();
            if cond(&a) {
                return a;
            }
            rx.changed().await.expect("the proxy outlives its recorder");
        }
    }

    /// The sequences of every `Ack` frame the client sent so far, frame by frame.
    pub fn acks(&self) -> Vec<Vec<u64>> {
        self.sent
            .lock()
            .unwrap()
            .iter()
            .filter_map(|f| match f {
                Frame::Ack(a) => Some(a.seqs.clone()),
                _ => None,
            })
            .collect()
    }
}

/// A proxy between clients and a relay that holds back (never forwards) the `ReplayDone`
/// of the first durable subscription a client asks for through it: that subscription stays
/// in its hand-over (PROTOCOL §4.11) as if the relay had not ended its history yet — the
/// relay holds its live messages back until then, and the client still awaits them.
/// Everything else passes both ways unchanged.
pub struct HandOverProxy {
    pub addr: SocketAddr,
    /// How many `ReplayDone` frames it held back.
    held: tokio::sync::watch::Receiver<usize>,
}

impl HandOverProxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let (kept, held) = tokio::sync::watch::channel(0usize);
        // The relay subscription id of the first durable `Sub` (client-chosen).
        let first: Arc<Mutex<Option<u64>>> = Arc::new(Mutex::new(None));
        let seen = first.clone();
        // Noted before the relay sees the `Sub`: its `ReplayDone` follows.
        let up: FrameFilter = Arc::new(move |b| {
            if let Ok(Frame::Sub(s)) = Frame::decode_slice(b) {
                let mut d = first.lock().unwrap();
                if s.durable.is_some() && d.is_none() {
                    *d = Some(s.sub_id);
                }
            }
            true
        });
        let down: FrameFilter = Arc::new(move |b| match Frame::decode_slice(b) {
            Ok(Frame::ReplayDone(r)) if *seen.lock().unwrap() == Some(r.sub_id) => {
                kept.send_modify(|n| *n += 1);
                false
            }
            _ => true,
        });
        let addr = frame_proxy(upstream, up, down).await;
        HandOverProxy { addr, held }
    }

    /// Waits (on the relay's frames, not a timer) until it held back a `ReplayDone`;
    /// returns how many it held. Bounded by the caller's `within`.
    pub async fn wait_held(&self) -> usize {
        let mut rx = self.held.clone();
        let n = *rx.wait_for(|n| *n > 0).await.expect("the proxy lives");
        n
    }
}

/// A proxy between clients and a relay that drops the first frame from the relay that
/// `pick` chooses — for a `Msg`, as if the client had held it back for want of room:
/// neither delivered nor remembered nor acked, so the relay sends it again after its ack
/// timeout. Everything else passes both ways unchanged.
pub struct DropFirstProxy {
    pub addr: SocketAddr,
    /// How many frames it dropped (0 or 1).
    dropped: tokio::sync::watch::Receiver<usize>,
}

impl DropFirstProxy {
    pub async fn start(
        upstream: SocketAddr,
        pick: impl Fn(&Frame) -> bool + Send + Sync + 'static,
    ) -> Self {
        let (count, dropped) = tokio::sync::watch::channel(0usize);
        let down: FrameFilter = Arc::new(move |b| {
            if *count.borrow() > 0 {
                return true;
            }
            match Frame::decode_slice(b) {
                Ok(f) if pick(&f) => {
                    count.send_modify(|n| *n += 1);
                    false
                }
                _ => true,
            }
        });
        let addr = frame_proxy(upstream, Arc::new(|_| true), down).await;
        DropFirstProxy { addr, dropped }
    }

    /// Waits (on the relay's frames, not a timer) until it dropped its frame. Bounded by
    /// the caller's `within`.
    pub async fn wait_dropped(&self) {
        let mut rx = self.dropped.clone();
        rx.wait_for(|n| *n > 0).await.expect("the proxy lives");
    }
}

/// A fake relay's `Welcome`: at-least-once, retained values and replay offered, 1 MiB
/// frames, the heartbeat asked for `heartbeat_ms` (0: the client's default).
pub fn welcome(heartbeat_ms: u64) -> Frame {
    Frame::Welcome(Welcome {
        version: frame::PROTOCOL_VERSION,
        features: frame::features::AT_LEAST_ONCE
            | frame::features::RETAIN
            | frame::features::REPLAY,
        max_frame: 1 << 20,
        session: [7; 16],
        relay: Some("fake".into()),
        heartbeat_ms,
        seq_space: None,
    })
}

/// `frames`, each behind its 4-byte length prefix, in one buffer.
fn prefixed(frames: &[Frame]) -> Vec<u8> {
    let mut b = Vec::new();
    for f in frames {
        let f = f.to_bytes();
        b.extend_from_slice(&(f.len() as u32).to_be_bytes());
        b.extend_from_slice(&f);
    }
    b
}

/// A fake relay's accepted connection, after the handshake.
pub struct FakeConn {
    pub s: TcpStream,
}

impl FakeConn {
    /// Accepts one client and answers its `Hello` with a `Welcome`.
    pub async fn accept(l: &TcpListener) -> Self {
        let (mut s, _) = l.accept().await.unwrap();
        match read_frame(&mut s).await.expect("hello") {
            Frame::Hello(_) => {}
            other => panic!("expected Hello, got {}", other.name()),
        }
        write_frame(&mut s, &welcome(0)).await;
        FakeConn { s }
    }

    /// The next frame that is not a Ping (Pings are answered).
    pub async fn next(&mut self) -> Option<Frame> {
        loop {
            match read_frame(&mut self.s).await? {
                Frame::Ping(p) => {
                    write_frame(&mut self.s, &Frame::Pong(frame::Pong { nonce: p.nonce })).await
                }
                f => return Some(f),
            }
        }
    }
}

/// A fake relay on a [`FakeConn`]: a task answers the client's Pings and Subs (`SubOk` at
/// seq 0) and records its Subs and Acks, while the test sends whatever frames it chooses —
/// a relay ignoring credit, flags and history as it likes.
pub struct FakeRelay {
    w: Arc<tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>>,
    acks: tokio::sync::watch::Receiver<Vec<u64>>,
    subs: tokio::sync::watch::Receiver<Vec<frame::Sub>>,
}

impl FakeRelay {
    /// Takes over an accepted connection.
    pub fn run(conn: FakeConn) -> Self {
        let (mut r, w) = conn.s.into_split();
        let w = Arc::new(tokio::sync::Mutex::new(w));
        let (acks_tx, acks) = tokio::sync::watch::channel(Vec::new());
        let (subs_tx, subs) = tokio::sync::watch::channel(Vec::new());
        let out = w.clone();
        tokio::spawn(async move {
            while let Some(f) = read_frame(&mut r).await {
                match f {
                    Frame::Ping(p) => {
                        let pong = Frame::Pong(frame::Pong { nonce: p.nonce });
                        write_frame(&mut *out.lock().await, &pong).await;
                    }
                    Frame::Sub(s) => {
                        let ok = Frame::SubOk(frame::SubOk {
                            sub_id: s.sub_id,
                            seq: 0,
                            history: None,
                        });
                        // Confirmed before the test sees it: what it sends next follows.
                        write_frame(&mut *out.lock().await, &ok).await;
                        subs_tx.send_modify(|v| v.push(s));
                    }
                    Frame::Ack(a) => acks_tx.send_modify(|v| v.extend(a.seqs)),
                    _ => {}
                }
            }
        });
        FakeRelay { w, acks, subs }
    }

    /// Sends `f` to the client.
    pub async fn send(&self, f: &Frame) {
        write_frame(&mut *self.w.lock().await, f).await;
    }

    /// Writes `frames` (length-prefixed) in one write; `false` once the client hung up.
    pub async fn try_send_all(&self, frames: &[Frame]) -> bool {
        let b = prefixed(frames);
        let mut w = self.w.lock().await;
        w.write_all(&b).await.is_ok() && w.flush().await.is_ok()
    }

    /// Writes `frames` (length-prefixed) and then `trailer` in one write, then shuts the
    /// socket's sending side (the relay hangs up).
    pub async fn send_all_and_hang_up(&self, frames: &[Frame], trailer: &[u8]) {
        let mut b = prefixed(frames);
        b.extend_from_slice(trailer);
        let mut w = self.w.lock().await;
        w.write_all(&b).await.unwrap();
        w.flush().await.unwrap();
        let _ = w.shutdown().await;
    }

    /// Sends a `Msg` of `envelope` at relay sequence `seq` with `flags`, naming relay
    /// subscription `sub_id` (history and retained values) or none (live).
    pub async fn msg(&self, seq: u64, envelope: &Envelope, flags: u64, sub_id: Option<u64>) {
        let m = frame::Msg {
            paused: None,
            sub_id,
            seq,
            envelope: envelope.clone(),
            flags,
        };
        self.send(&Frame::Msg(m)).await;
    }

    /// Waits (on the client's frames) until `cond` holds for the acked sequences; returns
    /// them. Bounded by the caller's `within`.
    pub async fn wait_acks(&self, cond: impl Fn(&[u64]) -> bool) -> Vec<u64> {
        let mut rx = self.acks.clone();
        let a = rx.wait_for(|a| cond(a)).await.expect("the reader lives");
        a.clone()
    }

    /// Waits until the client sent `n` Subs; returns them.
    pub async fn wait_subs(&self, n: usize) -> Vec<frame::Sub> {
        let mut rx = self.subs.clone();
        let s = rx
            .wait_for(|s| s.len() >= n)
            .await
            .expect("the reader lives");
        s.clone()
    }
}

/// A client of a fake relay on real sockets (the relay answers Subs and Pings; the test
/// sends what it likes), built with `tune`.
pub async fn fake_relay_client(
    t: &whispeer::TreeKey,
    tune: impl FnOnce(whispeer::ClientBuilder) -> whispeer::ClientBuilder,
) -> (FakeRelay, whispeer::Client) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b = whispeer::Client::builder()
        .with(whispeer::Tcp::new(format!(
            "tcp://{}",
            listener.local_addr().unwrap()
        )))
        .with(whispeer::Encryption::with_keyring(super::keyring_with(t)));
    let connect = tokio::spawn(tune(b).connect());
    let relay = FakeRelay::run(super::within("hello", FakeConn::accept(&listener)).await);
    let c = super::within("connect", connect).await.unwrap().unwrap();
    (relay, c)
}

/// A proxy between one client and a relay that holds back every `Ack` frame the client
/// sends (in order) until [`HoldAcksProxy::release`]; everything else passes both ways
/// unchanged, and acks after the release pass at once. While it holds them, the relay still
/// counts the client's deliveries as unacknowledged — the window in which the app has taken
/// a message (its subscription has room again) and the relay has not yet heard of it,
/// opened for as long as a test needs.
pub struct HoldAcksProxy {
    pub addr: SocketAddr,
    /// Whether acks are held, and the held frames (without their length prefix).
    state: Arc<Mutex<(bool, Vec<Vec<u8>>)>>,
    /// The relay side of the one connection (once the client connected).
    relay: Arc<tokio::sync::Mutex<Option<tokio::net::tcp::OwnedWriteHalf>>>,
    /// The sequences of the acks held so far.
    held: tokio::sync::watch::Receiver<Vec<u64>>,
    /// The sequences of every ack the client sent, held or not.
    acked: tokio::sync::watch::Receiver<Vec<u64>>,
}

impl HoldAcksProxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new((true, Vec::new())));
        let relay = Arc::new(tokio::sync::Mutex::new(None));
        let (note, held) = tokio::sync::watch::channel(Vec::new());
        let (all, acked) = tokio::sync::watch::channel(Vec::new());
        let (st, rw) = (state.clone(), relay.clone());
        tokio::spawn(async move {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let Ok(upstream) = TcpStream::connect(upstream).await else {
                return;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut rr, w) = upstream.into_split();
            *rw.lock().await = Some(w);
            let down = async move {
                let _ = tokio::io::copy(&mut rr, &mut cw).await;
            };
            let up = async move {
                while let Some(b) = read_raw(&mut cr).await {
                    // The writer first: a release writes the held frames under it, so a
                    // frame read after the release follows them.
                    let mut out = rw.lock().await;
                    if let Ok(Frame::Ack(a)) = Frame::decode_slice(&b) {
                        all.send_modify(|v| v.extend(&a.seqs));
                        let mut s = st.lock().unwrap();
                        if s.0 {
                            s.1.push(b);
                            note.send_modify(|v| v.extend(a.seqs));
                            continue;
                        }
                    }
                    let w = out.as_mut().expect("connected");
                    if w.write_all(&(b.len() as u32).to_be_bytes()).await.is_err()
                        || w.write_all(&b).await.is_err()
                    {
                        return;
                    }
                }
            };
            tokio::select! {
                () = down => {}
                () = up => {}
            }
        });
        HoldAcksProxy {
            addr,
            state,
            relay,
            held,
            acked,
        }
    }

    /// Waits (on the client's frames) until every ack it sent, held or not, satisfies
    /// `cond`; returns their sequences. Bounded by the caller's `within`.
    pub async fn wait_acked(&self, cond: impl Fn(&[u64]) -> bool) -> Vec<u64> {
        let mut rx = self.acked.clone();
        let a = rx.wait_for(|a| cond(a)).await.expect("the proxy lives");
        a.clone()
    }

    /// Waits (on the client's frames, not a timer) until the acks held back satisfy `cond`;
    /// returns their sequences. Bounded by the caller's `within`.
    pub async fn wait_held(&self, cond: impl Fn(&[u64]) -> bool) -> Vec<u64> {
        let mut rx = self.held.clone();
        let a = rx.wait_for(|a| cond(a)).await.expect("the proxy lives");
        a.clone()
    }

    /// Sends the held acks on, in order, and passes every later one at once.
    pub async fn release(&self) {
        let mut out = self.relay.lock().await;
        let held = {
            let mut s = self.state.lock().unwrap();
            s.0 = false;
            std::mem::take(&mut s.1)
        };
        let w = out.as_mut().expect("connected");
        for b in held {
            w.write_all(&(b.len() as u32).to_be_bytes()).await.unwrap();
            w.write_all(&b).await.unwrap();
        }
    }
}
