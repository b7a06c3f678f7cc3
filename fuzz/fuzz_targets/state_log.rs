//! The npm client's saved-state log (`whispeer_wasm::persist::load`): bytes from a file or
//! IndexedDB that anyone with access to it, or a crash, may have damaged. No input may
//! panic, and no allocation is sized from a record's declared length (only from the bytes
//! present). A log that loads must compact (as `Engine::snapshot` does: pins, kept
//! publishes, the receive window's snapshot, owed rows) to bytes that load to the same state,
//! and a torn end it reports must be exactly the bytes whose removal loads the same state.
//!
//! Records carry a BLAKE3-derived check, so raw mutations rarely get past the first one:
//! the first input byte picks raw bytes (even) or a log built from the rest of the input
//! (odd) — records of every kind with valid checks, genuine kept `Pub` frames among them,
//! records of arbitrary kinds and sizes, unchecked bytes — then optionally cut short and a
//! byte flipped.
#![no_main]

use std::sync::OnceLock;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use rand::{rngs::StdRng, SeedableRng};
use whispeer::core::receive::{Change, Guard, Snapshot};
use whispeer_protocol::TreeId;
use whispeer_protocol::{Keyring, MessageId, Outgoing, Qos, SealOptions, Sealer, Topic, TreeKey};
use whispeer_wasm::persist::{self, load, Saved};

/// The load time (Unix ms); expiries are drawn around it.
const NOW: u64 = 1_700_000_000_000;

fn pid(i: u8) -> [u8; 16] {
    [i + 1; 16]
}

/// Genuine `Pub` frames of publish ids `pid(0..4)` (the last one QoS 0: never kept).
fn frames() -> &'static [Bytes; 4] {
    static F: OnceLock<[Bytes; 4]> = OnceLock::new();
    F.get_or_init(|| {
        let mut rng = StdRng::seed_from_u64(7);
        let tk = TreeKey::generate_with("p", &mut rng).unwrap();
        let mut kr = Keyring::new();
        kr.add_tree_key_at(&tk, 0).unwrap();
        let key = kr.topic_key(&Topic::new("a/b").unwrap()).unwrap();
        std::array::from_fn(|i| {
            let out = Outgoing {
                payload: b"x",
                content_type: "application/octet-stream",
                msg_id: MessageId::random(&mut rng),
                ts_ms: 1_000,
            };
            let env = Sealer::new()
                .seal(&key, &out, &SealOptions::default(), None, &mut rng)
                .unwrap();
            let qos = if i == 3 {
                Qos::AtMostOnce
            } else {
                Qos::AtLeastOnce
            };
            whispeer::core::pub_frame(env, Some(pid(i as u8)), false, qos).to_bytes()
        })
    })
}

/// The fuzzer's bytes as a source of choices (zeros once they run out).
struct In<'a>(&'a [u8]);

impl<'a> In<'a> {
    fn byte(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }

    fn u64(&mut self) -> u64 {
        let mut a = [0u8; 8];
        let b = self.bytes(8);
        a[..b.len()].copy_from_slice(b);
        u64::from_be_bytes(a)
    }

    fn u16(&mut self) -> u16 {
        u16::from(self.byte()) << 8 | u16::from(self.byte())
    }

    /// An expiry or timestamp: mostly around `NOW` (either side), sometimes any.
    fn time(&mut self) -> u64 {
        match self.byte() % 4 {
            0 => self.u64(),
            _ => (NOW - 40_000).wrapping_add(u64::from(self.u16())),
        }
    }

    fn name(&mut self) -> String {
        let n = usize::from(self.byte() % 6);
        String::from_utf8_lossy(self.bytes(n)).into_owned()
    }
}

/// A record with a valid check, of any kind and size (the format of `persist`'s records).
fn record(out: &mut Vec<u8>, body: &[u8]) {
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    let h = blake3::Hasher::new_derive_key("whispeer js client state record")
        .update(body)
        .finalize();
    out.extend_from_slice(&h.as_bytes()[..4]);
}

/// A log built from the input's choices, then perhaps cut short and a byte flipped.
fn build(mut inp: In<'_>) -> Vec<u8> {
    let mutate = inp.byte();
    let (cut, flip, bit) = (inp.u16(), inp.u16(), inp.byte() % 8);
    let mut out = persist::MAGIC.to_vec();
    let mut ops = 0;
    while !inp.0.is_empty() && ops < 200 {
        ops += 1;
        match inp.byte() % 15 {
            0 | 1 => {
                let i = inp.byte() % 4;
                let order = u64::from(inp.byte() % 8);
                persist::keep(&mut out, &pid(i), order, &frames()[usize::from(i)]);
            }
            2 => {
                // Another publish's frame.
                let (i, j) = (inp.byte() % 4, inp.byte() % 4);
                let order = u64::from(inp.byte() % 8);
                persist::keep(&mut out, &pid(i), order, &frames()[usize::from(j)]);
            }
            3 => {
                let i = inp.byte() % 4;
                let order = inp.u64();
                let n = usize::from(inp.byte());
                persist::keep(&mut out, &pid(i), order, inp.bytes(n));
            }
            4 => persist::acked(&mut out, &pid(inp.byte() % 4)),
            5 => {
                let key = (
                    TreeId([inp.byte() % 2; 16]),
                    [inp.byte() % 3; 32],
                    [inp.byte(); 16],
                );
                let expires_ms = inp.time();
                persist::change(&mut out, &Change::Seen { key, expires_ms });
            }
            6 => {
                let key = [inp.byte() % 4; 32];
                let ts_ms = inp.time();
                let msg_id = [inp.byte(); 16];
                persist::change(&mut out, &Change::Retained { key, ts_ms, msg_id });
            }
            7 => {
                let n = usize::from(inp.byte() % 64);
                persist::pins(&mut out, inp.bytes(n));
            }
            8 => {
                let d = u128::from(inp.u16());
                let exp = inp.time();
                persist::seen_digest(&mut out, d, exp);
            }
            9 => {
                let t = inp.time();
                persist::forgot_upto(&mut out, t);
            }
            10 => {
                let durable = inp.name();
                let digest = u128::from(inp.byte() % 8);
                persist::change(&mut out, &Change::Owed { durable, digest });
            }
            11 => {
                let durable = inp.name();
                let digest = u128::from(inp.byte() % 8);
                persist::change(&mut out, &Change::Paid { durable, digest });
            }
            12 => {
                let durable = inp.name();
                persist::change(&mut out, &Change::OwedForgotten { durable });
            }
            13 => {
                // Any kind, any size, a valid check.
                let n = usize::from(inp.byte());
                record(&mut out, inp.bytes(n));
            }
            _ => {
                // Unchecked bytes (a length field of any value among them).
                let n = usize::from(inp.byte() % 16);
                out.extend_from_slice(inp.bytes(n));
            }
        }
    }
    if mutate & 1 != 0 && !out.is_empty() {
        out.truncate(usize::from(cut) % out.len());
    }
    if mutate & 2 != 0 && !out.is_empty() {
        let n = out.len();
        out[usize::from(flip) % n] ^= 1 << bit;
    }
    out
}

/// The receive window restored from `s` as the npm engine restores it.
fn window(s: &Saved, now: u64) -> Snapshot {
    let mut g = Guard::new(Default::default());
    for (k, exp) in &s.seen {
        g.restore_seen(*k, *exp, now);
    }
    for (d, exp) in &s.seen_digests {
        g.restore_digest(*d, *exp, now);
    }
    for &(k, ts, id) in &s.retained {
        g.restore_retained(k, ts, id);
    }
    g.restore_forgot_upto(s.forgot_upto);
    let mut snap = g.snapshot(now);
    // (Retained marks are in no particular order.)
    snap.seen.sort_unstable();
    snap.retained.sort_unstable();
    snap
}

/// A compaction of `s` at `now`, as `Engine::snapshot` writes it.
fn compact(s: &Saved, now: u64) -> Vec<u8> {
    let mut out = persist::MAGIC.to_vec();
    if let Some(p) = &s.pins {
        persist::pins(&mut out, p);
    }
    for (pid, (order, frame)) in &s.outbox {
        persist::keep(&mut out, pid, *order, frame);
    }
    let snap = window(s, now);
    for &(d, exp) in &snap.seen {
        persist::seen_digest(&mut out, d, exp);
    }
    for &(key, ts_ms, msg_id) in &snap.retained {
        persist::change(&mut out, &Change::Retained { key, ts_ms, msg_id });
    }
    persist::forgot_upto(&mut out, snap.forgot_upto);
    s.owed.write(&mut out);
    out
}

fn assert_same(a: &Saved, b: &Saved, now: u64, what: &str) {
    assert_eq!(a.outbox, b.outbox, "{what}: outbox");
    assert_eq!(a.pins, b.pins, "{what}: pins");
    assert_eq!(a.owed, b.owed, "{what}: owed");
    assert_eq!(window(a, now), window(b, now), "{what}: receive window");
}

fn check_log(bytes: &[u8], now: u64) {
    let Ok(s) = load(bytes, now) else {
        return;
    };
    assert!(s.torn <= bytes.len());
    for (_, frame) in s.outbox.values() {
        assert!(
            frame.len() < bytes.len(),
            "a kept frame is bytes of the log"
        );
    }
    if s.torn > 0 {
        let whole =
            load(&bytes[..bytes.len() - s.torn], now).expect("the log without its torn end loads");
        assert_eq!(whole.torn, 0);
        assert_eq!(whole.refused_kept, s.refused_kept);
        assert_same(&s, &whole, now, "without the torn end");
    }
    let out = compact(&s, now);
    let again = load(&out, now).expect("a compacted log loads");
    assert_eq!(
        (again.torn, again.refused_kept),
        (0, 0),
        "a compacted log is clean"
    );
    assert_same(&s, &again, now, "compacted");
    assert_eq!(compact(&again, now), out, "compaction is a fixed point");
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        check_log(rest, NOW);
        // The same bytes behind a valid header.
        let mut b = persist::MAGIC.to_vec();
        b.extend_from_slice(rest);
        check_log(&b, NOW);
    } else {
        check_log(&build(In(rest)), NOW);
    }
});
