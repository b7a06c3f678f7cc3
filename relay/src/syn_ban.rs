//! Source addresses whose new TCP connections the kernel drops before `accept`.
//!
//! An address that keeps connecting while it is at its connection cap and over its connect
//! rate ([`Refusal::Churning`](crate::rate::Refusal)) is refused at once, but each attempt
//! still costs the kernel a whole TCP handshake and teardown and the relay an `accept` and a
//! `close`, however fast it refuses. Measured with `bash .ci/bench-hostile --quick
//! --only-attack --kinds churn`: 25 churning connections made ~30,000 connections/s and an
//! honest client's p99 rose 11× over its p99 alone, the relay spending most of its CPU in
//! its accept loop. So such an address is *banned* for a while: a classic BPF socket filter
//! on every TCP listener drops its SYNs (and handshake ACKs) before a connection exists, the
//! churner's kernel retransmits its SYN after 1, 2, 4 … s, and the churn stops costing the
//! relay anything. Connections it already has are untouched (the filter is the listener's;
//! accepted sockets have it removed), and connections it makes while banned are not lost to
//! an honest client: they complete once the ban ends, as after packet loss.
//!
//! A ban lasts 1 s; an address that churns again within twice its last ban's length after
//! that ban ended gets twice as long, up to `limits.addr_churn_ban_secs` (0 turns bans
//! off). The filter is Linux's; elsewhere a banned address is refused at `accept` as before.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The first ban's length; each renewal doubles it, up to the configured maximum.
const FIRST_BAN: Duration = Duration::from_secs(1);

/// Addresses remembered (banned or recently banned) at most. A full table forgets the
/// eighth of its bans that end (or ended) first to make room, so a new churner is still
/// banned and the next strikes find room without another pass over the table.
const MAX_REMEMBERED: usize = 65_536;

/// Instructions a filter may have (the kernel's `BPF_MAXINSNS` is 4,096); bans beyond what
/// fits — newest first — are refused at `accept` only.
const MAX_INSNS: usize = 4_000;

/// A ban the table holds.
#[derive(Debug, Clone, Copy)]
struct Ban {
    since: Instant,
    until: Instant,
    /// Renewals so far: the ban lasted `FIRST_BAN << level`.
    level: u32,
}

/// The banned addresses, newest ban first (the list every TCP listener's filter is built
/// from).
pub(crate) type BanList = Arc<Vec<IpAddr>>;

/// The bans, by address and in the order they began.
#[derive(Debug, Default)]
struct Table {
    by_addr: HashMap<IpAddr, Ban>,
    /// The bans of `by_addr` (start, end, address), newest first: kept in order as bans
    /// come, so publishing the newest needs no sort (nor lookup) of them all.
    newest: std::collections::VecDeque<(Instant, Instant, IpAddr)>,
}

impl Table {
    fn forget_where(&mut self, mut gone: impl FnMut(&IpAddr, &Ban) -> bool) {
        self.by_addr.retain(|ip, b| !gone(ip, b));
        let by_addr = &self.by_addr;
        self.newest
            .retain(|(since, _, ip)| by_addr.get(ip).is_some_and(|b| b.since == *since));
    }
}

/// Which source addresses are banned, and until when.
#[derive(Debug)]
pub(crate) struct Bans {
    by_addr: Mutex<Table>,
    /// Addresses remembered at most ([`MAX_REMEMBERED`]; smaller in tests).
    capacity: usize,
    /// Passes over a full table so far (tests).
    #[cfg(test)]
    full_passes: std::sync::atomic::AtomicUsize,
    /// The longest ban; zero turns bans off.
    max: Duration,
    /// The newest [`PUBLISHED`] addresses banned now, newest first, published on every
    /// change.
    list: tokio::sync::watch::Sender<BanList>,
    /// How many addresses are banned now (the list holds the newest of them only).
    active: std::sync::atomic::AtomicUsize,
}

/// Bans published to the socket filters at most: more than any filter holds (each ban takes
/// at least one of its [`MAX_INSNS`] instructions), so a filter built from the list is the
/// one it would be from all bans. Sorting and copying every active ban — up to
/// [`MAX_REMEMBERED`] — on every strike, under the lock `banned` takes, cost milliseconds
/// per new churning address once tens of thousands were banned.
const PUBLISHED: usize = MAX_INSNS;

impl Bans {
    pub(crate) fn new(max: Duration) -> Self {
        Self::with_capacity(max, MAX_REMEMBERED)
    }

    fn with_capacity(max: Duration, capacity: usize) -> Self {
        Self {
            by_addr: Mutex::new(Table::default()),
            capacity: capacity.max(1),
            #[cfg(test)]
            full_passes: Default::default(),
            max,
            list: tokio::sync::watch::Sender::new(Arc::new(Vec::new())),
            active: Default::default(),
        }
    }

    /// The addresses banned now, as a watch (the accept loops rebuild their filters on
    /// each change).
    pub(crate) fn watch(&self) -> tokio::sync::watch::Receiver<BanList> {
        self.list.subscribe()
    }

    /// How many addresses are banned now.
    pub(crate) fn active(&self) -> usize {
        self.active.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `ip` (a [`source_address`](crate::store::source_address)) churned at `now`: bans it
    /// unless it already is. Returns the new ban's length.
    pub(crate) fn strike(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        if self.max.is_zero() {
            return None;
        }
        let mut t = self.by_addr.lock().unwrap_or_else(|p| p.into_inner());
        let level = match t.by_addr.get(&ip) {
            Some(b) if b.until > now => return None,
            // Churning again soon after the last ban ended: a longer one.
            Some(b) if now < b.until + 2 * self.length(b.level) => b.level.saturating_add(1),
            Some(_) => 0,
            None if t.by_addr.len() >= self.capacity => {
                #[cfg(test)]
                self.full_passes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                t.forget_where(|_, b| self.forgettable(b, now));
                if t.by_addr.len() >= self.capacity {
                    // Still full (before, this refused to ban anyone new, after a pass
                    // over the whole table, on every strike): forget the bans that end
                    // first, an eighth of the table, so this pass pays for the next
                    // capacity / 8 strikes. The newest bans are kept: they are the
                    // ones the filters hold (newest first) anyway.
                    let mut ends: Vec<(Instant, IpAddr)> =
                        t.by_addr.iter().map(|(ip, b)| (b.until, *ip)).collect();
                    let k = (self.capacity / 8).max(1).min(ends.len());
                    ends.select_nth_unstable(k - 1);
                    let forget: std::collections::HashSet<IpAddr> =
                        ends[..k].iter().map(|(_, ip)| *ip).collect();
                    t.forget_where(|ip, _| forget.contains(ip));
                }
                0
            }
            None => 0,
        };
        let length = self.length(level);
        let ban = Ban {
            since: now,
            until: now + length,
            level,
        };
        if let Some(old) = t.by_addr.insert(ip, ban) {
            // Renewed: its earlier place goes (a scan, once per renewal).
            if let Some(i) = t.newest.iter().position(|e| (e.0, e.2) == (old.since, ip)) {
                t.newest.remove(i);
            }
        }
        // In order of start: nearly always the front (callers pass the time now).
        let at = t.newest.iter().take_while(|e| e.0 > now).count();
        t.newest.insert(at, (now, ban.until, ip));
        self.publish(&t, now);
        Some(length)
    }

    /// Lifts the bans that ended by `now` and returns when the next one ends.
    pub(crate) fn expire(&self, now: Instant) -> Option<Instant> {
        let mut t = self.by_addr.lock().unwrap_or_else(|p| p.into_inner());
        let active = self.active();
        if t.by_addr.values().filter(|b| b.until > now).count() != active {
            self.publish(&t, now);
        }
        t.forget_where(|_, b| self.forgettable(b, now));
        t.by_addr
            .values()
            .map(|b| b.until)
            .filter(|&u| u > now)
            .min()
    }

    /// Whether `ip` (a [`source_address`](crate::store::source_address)) is banned at
    /// `now` (the QUIC listener, which no socket filter covers, asks).
    pub(crate) fn banned(&self, ip: IpAddr, now: Instant) -> bool {
        let t = self.by_addr.lock().unwrap_or_else(|p| p.into_inner());
        t.by_addr.get(&ip).is_some_and(|b| b.until > now)
    }

    fn length(&self, level: u32) -> Duration {
        FIRST_BAN
            .checked_mul(1u32.checked_shl(level.min(31)).unwrap_or(u32::MAX))
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// A ban that ended long enough ago that churning again starts over at 1 s.
    fn forgettable(&self, b: &Ban, now: Instant) -> bool {
        now >= b.until + 2 * self.length(b.level)
    }

    /// Publishes the newest [`PUBLISHED`] active bans (newest first) and the count.
    fn publish(&self, t: &Table, now: Instant) {
        let active = t.by_addr.values().filter(|b| b.until > now).count();
        self.active
            .store(active, std::sync::atomic::Ordering::Relaxed);
        let list: Vec<IpAddr> = t
            .newest
            .iter()
            .filter(|(_, until, _)| *until > now)
            .take(PUBLISHED)
            .map(|(_, _, ip)| *ip)
            .collect();
        self.list.send_replace(Arc::new(list));
    }
}

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Insn {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

/// `SKF_NET_OFF`: loads at this offset and beyond read the network (IP) header, wherever
/// the packet's data starts for the socket (for TCP: its TCP header).
const NET: u32 = (-0x10_0000i32) as u32;
const LD_B_ABS: u16 = 0x30; // BPF_LD | BPF_B | BPF_ABS
const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const RSH_K: u16 = 0x74; // BPF_ALU | BPF_RSH | BPF_K
const AND_K: u16 = 0x54; // BPF_ALU | BPF_AND | BPF_K
const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JA: u16 = 0x05; // BPF_JMP | BPF_JA
const RET_K: u16 = 0x06; // BPF_RET | BPF_K
/// Return value keeping the whole packet; 0 drops it.
const KEEP: u32 = u32::MAX;

const fn insn(code: u16, jt: u8, jf: u8, k: u32) -> Insn {
    Insn { code, jt, jf, k }
}

/// The filter dropping packets whose source address is in `bans` (IPv4 addresses exactly;
/// IPv6 ones by their first `v6_prefix` bits, as [`source_address`](crate::store::source_address)
/// counts them), or `None` for an empty list. Bans are taken in order until the program
/// would pass [`MAX_INSNS`].
///
/// ```text
///     ldb [net+0]; rsh #4; jeq #6, 0, 1; ja v6
///     ld [net+12]                                  ; IPv4 source
///     jeq #a1, 0, 1; ret #0   …one pair per IPv4 ban
///     ret #-1
/// v6: ld [net+8]; (and #mask;) jeq #w0, 0, skip … ; ret #0   …per IPv6 ban, words the prefix covers
///     ret #-1
/// ```
pub(crate) fn program(bans: &[IpAddr], v6_prefix: u8) -> Option<Vec<Insn>> {
    if bans.is_empty() {
        return None;
    }
    let prefix = u32::from(v6_prefix.clamp(1, 128));
    let mut v4 = Vec::new();
    let mut v6: Vec<Insn> = Vec::new();
    // Header (4) + IPv4 load (1) + two rets.
    let mut size = 7;
    for ip in bans {
        let entry = match ip {
            IpAddr::V4(a) => vec![insn(JEQ_K, 0, 1, u32::from(*a)), insn(RET_K, 0, 0, 0)],
            IpAddr::V6(a) => {
                let words = u128::from(*a).to_be_bytes();
                let mut e = Vec::new();
                let mut jumps = Vec::new();
                for w in 0..prefix.div_ceil(32) {
                    let bits = (prefix - 32 * w).min(32);
                    let mask = u32::MAX << (32 - bits);
                    let i = (4 * w) as usize;
                    let word =
                        u32::from_be_bytes([words[i], words[i + 1], words[i + 2], words[i + 3]])
                            & mask;
                    e.push(insn(LD_W_ABS, 0, 0, NET + 8 + 4 * w));
                    if mask != u32::MAX {
                        e.push(insn(AND_K, 0, 0, mask));
                    }
                    jumps.push(e.len());
                    e.push(insn(JEQ_K, 0, 0, word));
                }
                e.push(insn(RET_K, 0, 0, 0));
                // A word that differs skips the rest of this entry (at most 13 long).
                let end = e.len();
                for j in jumps {
                    e[j].jf = (end - j - 1) as u8;
                }
                e
            }
        };
        if size + entry.len() > MAX_INSNS {
            break;
        }
        size += entry.len();
        match ip {
            IpAddr::V4(_) => v4.extend(entry),
            IpAddr::V6(_) => v6.extend(entry),
        }
    }
    let mut p = vec![
        insn(LD_B_ABS, 0, 0, NET),
        insn(RSH_K, 0, 0, 4),
        insn(JEQ_K, 0, 1, 6),
        // Over the IPv4 part: its load, its entries and its ret.
        insn(JA, 0, 0, (v4.len() + 2) as u32),
        insn(LD_W_ABS, 0, 0, NET + 12),
    ];
    p.extend(v4);
    p.push(insn(RET_K, 0, 0, KEEP));
    p.extend(v6);
    p.push(insn(RET_K, 0, 0, KEEP));
    Some(p)
}

/// Installs the filter for `bans` on `listener` (or removes it for none). Returns false if
/// the platform refused it: the bans then hold at `accept` only.
#[cfg(target_os = "linux")]
pub(crate) fn apply(listener: &tokio::net::TcpListener, bans: &[IpAddr], v6_prefix: u8) -> bool {
    let sock = socket2::SockRef::from(listener);
    match program(bans, v6_prefix) {
        None => {
            // ENOENT when there was none: nothing to undo.
            let _ = sock.detach_filter();
            true
        }
        Some(p) => {
            let filter: Vec<socket2::SockFilter> = p
                .iter()
                .map(|i| socket2::SockFilter::new(i.code, i.jt, i.jf, i.k))
                .collect();
            sock.attach_filter(&filter).is_ok()
        }
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn apply(_: &tokio::net::TcpListener, _: &[IpAddr], _: u8) -> bool {
    false
}

/// An accepted socket inherits its listener's filter as it was when the connection
/// arrived; removed, so a connection's packets are never filtered (a banned address's
/// connections already open keep working, and nobody pays the filter per packet).
#[cfg(target_os = "linux")]
pub(crate) fn clear_inherited(stream: &tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(stream).detach_filter();
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn clear_inherited(_: &tokio::net::TcpStream) {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// Runs `p` as the kernel would on a packet whose network header is `net` (the few
    /// opcodes [`program`] emits; an out-of-range load drops, as in the kernel).
    fn run(p: &[Insn], net: &[u8]) -> u32 {
        let (mut a, mut pc) = (0u32, 0usize);
        loop {
            let i = p[pc];
            pc += 1;
            match i.code {
                LD_B_ABS | LD_W_ABS => {
                    let off = i.k.wrapping_sub(NET) as usize;
                    let n = if i.code == LD_B_ABS { 1 } else { 4 };
                    let Some(b) = net.get(off..off + n) else {
                        return 0;
                    };
                    a = b.iter().fold(0, |a, &x| (a << 8) | u32::from(x));
                }
                RSH_K => a >>= i.k,
                AND_K => a &= i.k,
                JEQ_K => pc += usize::from(if a == i.k { i.jt } else { i.jf }),
                JA => pc += i.k as usize,
                RET_K => return i.k,
                other => panic!("opcode {other:#x} not emitted"),
            }
        }
    }

    fn v4_packet(src: Ipv4Addr) -> Vec<u8> {
        let mut h = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
        h.extend(src.octets());
        h.extend([127, 0, 0, 1]);
        h
    }

    fn v6_packet(src: Ipv6Addr) -> Vec<u8> {
        let mut h = vec![0x60, 0, 0, 0, 0, 20, 6, 64];
        h.extend(src.octets());
        h.extend(Ipv6Addr::LOCALHOST.octets());
        h
    }

    fn drops(p: &[Insn], ip: IpAddr) -> bool {
        let pkt = match ip {
            IpAddr::V4(a) => v4_packet(a),
            IpAddr::V6(a) => v6_packet(a),
        };
        match run(p, &pkt) {
            0 => true,
            KEEP => false,
            other => panic!("filter returned {other}"),
        }
    }

    #[test]
    fn no_bans_no_filter() {
        assert_eq!(program(&[], 64), None);
    }

    #[test]
    fn banned_sources_are_dropped_and_others_kept() {
        let bans: Vec<IpAddr> = vec![
            "127.0.1.2".parse().unwrap(),
            "10.0.0.9".parse().unwrap(),
            "2001:db8:1:2::".parse().unwrap(),
        ];
        let p = program(&bans, 64).unwrap();
        for dropped in [
            "127.0.1.2",
            "10.0.0.9",
            "2001:db8:1:2::1",
            "2001:db8:1:2:ffff::7",
        ] {
            assert!(drops(&p, dropped.parse().unwrap()), "{dropped} kept");
        }
        for kept in [
            "127.0.0.1",
            "127.0.1.3",
            "10.0.0.8",
            "2001:db8:1:3::1",
            "::1",
        ] {
            assert!(!drops(&p, kept.parse().unwrap()), "{kept} dropped");
        }
    }

    #[test]
    fn an_ipv6_prefix_off_a_word_boundary_is_masked() {
        // /60: the second word's last 4 bits are the host's.
        let ban: IpAddr = "2001:db8:aaaa:bbb0::".parse().unwrap();
        let p = program(&[ban], 60).unwrap();
        assert!(drops(&p, "2001:db8:aaaa:bbbf:1::".parse().unwrap()));
        assert!(!drops(&p, "2001:db8:aaaa:bbc0::".parse().unwrap()));
        // /128: every word compared.
        let one: IpAddr = "2001:db8::5".parse().unwrap();
        let p = program(&[one], 128).unwrap();
        assert!(drops(&p, one));
        assert!(!drops(&p, "2001:db8::6".parse().unwrap()));
    }

    #[test]
    fn a_long_list_stays_within_the_kernels_limit_newest_first() {
        let bans: Vec<IpAddr> = (0..5_000u32)
            .map(|i| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)))
            .chain((0..500u128).map(|i| IpAddr::V6(Ipv6Addr::from(i << 64))))
            .collect();
        let p = program(&bans, 64).unwrap();
        assert!(p.len() <= MAX_INSNS, "{} instructions", p.len());
        // The first (newest) are in; the last did not fit.
        assert!(drops(&p, bans[0]));
        assert!(drops(&p, bans[1_500]));
        assert!(!drops(&p, bans[4_999]));
        assert!(!drops(&p, bans[5_100]));
    }

    /// A full table of bans still bans a new churner: it forgets the bans that end first
    /// (an eighth of the table) instead of refusing (before, every strike of a new address
    /// passed over the whole table under the lock and banned no one). One pass makes room
    /// for the next capacity / 8 strikes.
    #[test]
    fn a_full_table_still_bans_forgetting_the_bans_that_end_first() {
        let t0 = Instant::now();
        let bans = Bans::with_capacity(Duration::from_secs(60), 64);
        let ip = |i: u32| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
        // 64 bans, every one in force; the first 8 end first (struck earlier).
        for i in 0..64 {
            let at = t0 + Duration::from_millis(u64::from(i));
            assert!(bans.strike(ip(i), at).is_some());
        }
        let full = bans.full_passes.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(full, 0);
        let now = t0 + Duration::from_millis(100);
        // 8 new churners: each banned, with one pass over the full table in all.
        for i in 64..72 {
            assert_eq!(bans.strike(ip(i), now), Some(Duration::from_secs(1)));
            assert!(bans.banned(ip(i), now));
        }
        assert_eq!(
            bans.full_passes.load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        // Forgotten: the 8 whose bans ended first; the others are still banned.
        assert!((0..8).all(|i| !bans.banned(ip(i), now)));
        assert!((8..72).all(|i| bans.banned(ip(i), now)));
        assert_eq!(bans.active(), 64);
    }

    #[test]
    fn bans_start_at_one_second_and_double_while_the_churn_goes_on() {
        let t0 = Instant::now();
        let bans = Bans::new(Duration::from_secs(5));
        let a: IpAddr = "127.0.1.2".parse().unwrap();
        let mut list = bans.watch();
        assert_eq!(bans.strike(a, t0), Some(Duration::from_secs(1)));
        assert!(list.has_changed().unwrap());
        assert_eq!(*list.borrow_and_update().clone(), vec![a]);
        // Already banned: nothing new.
        assert_eq!(bans.strike(a, t0 + Duration::from_millis(500)), None);
        assert_eq!(bans.expire(t0), Some(t0 + Duration::from_secs(1)));
        // Lifted at its end.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(bans.expire(t1), None);
        assert!(list.borrow_and_update().is_empty());
        assert!(!bans.banned(a, t1));
        // Churning again at once: 2 s, then 4, then the maximum 5.
        assert_eq!(bans.strike(a, t1), Some(Duration::from_secs(2)));
        let t2 = t1 + Duration::from_secs(2);
        assert_eq!(bans.strike(a, t2), Some(Duration::from_secs(4)));
        let t3 = t2 + Duration::from_secs(4);
        assert_eq!(bans.strike(a, t3), Some(Duration::from_secs(5)));
        // Quiet for twice the last ban after it ended: starts over.
        let t4 = t3 + Duration::from_secs(15);
        bans.expire(t4);
        assert_eq!(bans.strike(a, t4), Some(Duration::from_secs(1)));
        // Off: never banned.
        let off = Bans::new(Duration::ZERO);
        assert_eq!(off.strike(a, t0), None);
        assert!(!off.banned(a, t0));
    }

    #[test]
    fn the_list_is_newest_first_and_only_the_active() {
        let t0 = Instant::now();
        let bans = Bans::new(Duration::from_secs(60));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        bans.strike(a, t0);
        bans.strike(b, t0 + Duration::from_millis(600));
        assert_eq!(*bans.watch().borrow().clone(), vec![b, a]);
        bans.expire(t0 + Duration::from_millis(1_100));
        assert_eq!(*bans.watch().borrow().clone(), vec![b]);
    }

    /// With more bans than any filter holds, the list carries only the newest (what the
    /// filters take anyway), in order, and the count says how many are banned.
    #[test]
    fn the_list_holds_the_newest_bans_a_filter_can_take() {
        let t0 = Instant::now();
        let bans = Bans::new(Duration::from_secs(60));
        let n = PUBLISHED + 500;
        let ip = |i: usize| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i as u32));
        for i in 0..n {
            bans.strike(ip(i), t0 + Duration::from_micros(i as u64));
        }
        assert_eq!(bans.active(), n);
        let list = bans.watch().borrow().clone();
        let want: Vec<IpAddr> = (n - PUBLISHED..n).rev().map(ip).collect();
        assert_eq!(*list, want, "the newest {PUBLISHED}, newest first");
        assert!(bans.banned(ip(0), t0), "an older ban still holds at accept");
        // The filter built from the list is the one built from every ban.
        let every: Vec<IpAddr> = (0..n).rev().map(ip).collect();
        assert_eq!(program(&list, 64), program(&every, 64));
    }

    proptest! {
        /// Whatever the bans, the filter drops exactly the banned sources.
        #[test]
        fn the_filter_drops_exactly_the_banned(
            v4 in proptest::collection::vec(any::<u32>(), 0..40),
            v6 in proptest::collection::vec(any::<u128>(), 0..20),
            probes4 in proptest::collection::vec(any::<u32>(), 0..20),
            probes6 in proptest::collection::vec(any::<u128>(), 0..20),
            prefix in 32u8..=128,
        ) {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            let bans: Vec<IpAddr> = v4.iter().map(|&a| IpAddr::V4(a.into()))
                .chain(v6.iter().map(|&a| IpAddr::V6((a & mask).into())))
                .collect();
            let Some(p) = program(&bans, prefix) else {
                prop_assert!(bans.is_empty());
                return Ok(());
            };
            for a in probes4.iter().chain(&v4) {
                prop_assert_eq!(drops(&p, IpAddr::V4((*a).into())), v4.contains(a));
            }
            for a in probes6.iter().chain(&v6) {
                let banned = v6.iter().any(|b| b & mask == a & mask);
                prop_assert_eq!(drops(&p, IpAddr::V6((*a).into())), banned);
            }
        }
    }
}
