//! The store: where a publish is accepted, numbered, kept, and read back.
//!
//! The router calls [`Store::append`] under the routing lock of the key id's shard, right
//! before it fans the message out, so sequence numbers are assigned in ONE place and every
//! subscriber (whose pattern names one key id) sees them in increasing order. Appends on
//! other shards run at the same time, so a store numbers atomically. `append` never waits
//! on a disk: it checks quotas in
//! memory and queues the write; a durable implementation commits it on its own thread
//! (group commit) and reports durability through [`Store::when_durable`] — that is what
//! gates `PubAck` for QoS ≥ 1. A refusal is a typed [`StoreError`] whose
//! [`code`](StoreError::code) the publisher gets (`quota_exceeded`, `storage_full`, `busy`,
//! `store_failed`), and the message is not delivered. Quotas are per [`Tenant`].
//!
//! Implementations:
//! - [`SqliteStore`] — SQLite (WAL, group commit on a writer thread), on a file (durable,
//!   the `serve` default) or in memory (same behaviour, nothing survives a restart).
//! - [`LiveStore`] — numbers messages and keeps nothing (live fan-out only; grants no
//!   delivery features).
//!
//! Reads (history, replay, retained values, catch-up after a credit pause) block on the
//! disk, so they run off the async runtime on the process's one store-reader thread
//! (`read_off_runtime`, module `reads`), whose queue is fair per [`Tenant`]: each tenant
//! has its own FIFO and the thread serves tenants round-robin, one read per turn, so a
//! tenant flooding replaying `Sub`s delays another tenant's read by at most one read of its
//! own, not by its backlog. A tenant with [`MAX_QUEUED_READS_PER_TENANT`] reads queued gets
//! the retryable `busy` for the next (counted in `/metrics`). A history read is chunked
//! (one job examines at most one chunk of rows), so a long replay takes many turns.
//!
//! A store only ever sees what the relay can already see: the token path, sizes, flags,
//! publish ids, times, and the opaque envelope bytes.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use whispeer_protocol::frame::Replay;
use whispeer_protocol::{Envelope, ErrorCode, KeyId, Qos, TokenPath, TokenPattern};

use crate::ids::Seq;

pub mod jetstream;
mod reads;
mod sharded;
mod sqlite;

pub(crate) use reads::{read_off_runtime, Admission};
pub use reads::{reads, ReadQueue, ReadQueueStatus, MAX_QUEUED_READS_PER_TENANT};

/// Quota arithmetic shared by the stores that count usage (SQLite, JetStream), so a
/// publish over a quota gets the same error text whichever store counts it.
pub(crate) mod quota {
    use super::StoreError;
    use crate::config::StoreConfig;

    /// Usage counters of one tenant (or all).
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub(crate) struct Usage {
        pub(crate) bytes: u64,
        pub(crate) msgs: u64,
        pub(crate) retained: u64,
        pub(crate) durables: u64,
        pub(crate) paths: u64,
    }

    impl Usage {
        /// Adds `n` (a write accepted).
        pub(crate) fn add(&mut self, n: &Need) {
            self.bytes = self.bytes.saturating_add(n.bytes);
            self.msgs = self.msgs.saturating_add(n.msgs);
            self.retained = self.retained.saturating_add(n.retained);
            self.durables = self.durables.saturating_add(n.durables);
            self.paths = self.paths.saturating_add(n.paths);
        }

        /// Removes `n` (a write deleted, or no longer in flight).
        pub(crate) fn sub(&mut self, n: &Need) {
            self.bytes = self.bytes.saturating_sub(n.bytes);
            self.msgs = self.msgs.saturating_sub(n.msgs);
            self.retained = self.retained.saturating_sub(n.retained);
            self.durables = self.durables.saturating_sub(n.durables);
            self.paths = self.paths.saturating_sub(n.paths);
        }

        /// This usage plus `n`.
        pub(crate) fn plus(mut self, n: &Need) -> Usage {
            self.add(n);
            self
        }
    }

    /// What a new write adds to a tenant's (and the total) usage.
    pub(crate) type Need = Usage;

    /// What each of the five limits counts, in [`over`]'s order.
    const NAMES: [&str; 5] = [
        "stored bytes",
        "stored messages",
        "retained values",
        "durable names",
        "distinct paths",
    ];

    /// A usage's five counters, in [`over`]'s order.
    fn fields(u: &Usage) -> [u64; 5] {
        [u.bytes, u.msgs, u.retained, u.durables, u.paths]
    }

    /// Checks one usage against its limits (0 = unlimited); the first limit hit, if any.
    pub(crate) fn over(u: &Usage, n: &Need, lim: [u64; 5]) -> Option<(&'static str, u64)> {
        let checks = [
            (NAMES[0], u.bytes, n.bytes, lim[0]),
            (NAMES[1], u.msgs, n.msgs, lim[1]),
            (NAMES[2], u.retained, n.retained, lim[2]),
            (NAMES[3], u.durables, n.durables, lim[3]),
            (NAMES[4], u.paths, n.paths, lim[4]),
        ];
        checks
            .into_iter()
            .find(|(_, have, add, max)| *max > 0 && *add > 0 && have.saturating_add(*add) > *max)
            .map(|(what, _, _, max)| (what, max))
    }

    /// The per-tenant limits of a store configuration, in [`over`]'s order.
    pub(crate) fn tenant_limits(c: &StoreConfig) -> [u64; 5] {
        [
            c.tenant_max_bytes,
            c.tenant_max_messages,
            c.tenant_max_retained,
            c.tenant_max_durables,
            c.tenant_max_paths,
        ]
    }

    /// The all-tenant limits of a store configuration, in [`over`]'s order.
    pub(crate) fn total_limits(c: &StoreConfig) -> [u64; 5] {
        [
            c.total_max_bytes,
            c.total_max_messages,
            c.total_max_retained,
            c.total_max_durables,
            c.total_max_paths,
        ]
    }

    /// Which limit refused a write.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Scope {
        /// A per-tenant limit.
        Tenant,
        /// An all-tenant limit.
        Global,
        /// The reserve: the last `reserve_percent` of an all-tenant limit, kept for
        /// tenants holding little (see [`check`]).
        Reserve,
    }

    /// Writes each limit refused, for `/metrics` (one per store, shared by its paths).
    #[derive(Debug, Default)]
    pub(crate) struct Refusals {
        tenant: std::sync::atomic::AtomicU64,
        global: std::sync::atomic::AtomicU64,
        reserve: std::sync::atomic::AtomicU64,
    }

    impl Refusals {
        /// Counts a write `scope` refused.
        pub(crate) fn count(&self, scope: Scope) {
            match scope {
                Scope::Tenant => &self.tenant,
                Scope::Global => &self.global,
                Scope::Reserve => &self.reserve,
            }
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }

        /// The counts so far: (tenant, global, reserve).
        pub(crate) fn get(&self) -> (u64, u64, u64) {
            use std::sync::atomic::Ordering::Relaxed;
            (
                self.tenant.load(Relaxed),
                self.global.load(Relaxed),
                self.reserve.load(Relaxed),
            )
        }
    }

    /// The quota limits of a store configuration, with the reserve worked out once.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) struct Limits {
        /// Per tenant, in [`over`]'s order (0 = unlimited).
        pub(crate) tenant: [u64; 5],
        /// All tenants (0 = unlimited).
        pub(crate) total: [u64; 5],
        /// What all tenants may hold before the reserve: `total` less `reserve_percent`
        /// of it (equal to `total` without a reserve).
        pub(crate) common: [u64; 5],
        /// Most a tenant may hold and still write into the reserve: the reserve divided
        /// by `reserve_tenants`.
        pub(crate) share: [u64; 5],
    }

    impl Limits {
        /// The limits of a store configuration.
        pub(crate) fn of(c: &StoreConfig) -> Self {
            let total = total_limits(c);
            let pct = u128::from(c.reserve_percent.min(100));
            let tenants = u128::from(c.reserve_tenants.max(1));
            let reserve = total.map(|t| (u128::from(t) * pct / 100) as u64);
            let mut common = total;
            let mut share = [0; 5];
            for i in 0..5 {
                common[i] = total[i] - reserve[i];
                // At least 1 where there is a reserve: 0 would read as "unlimited".
                if reserve[i] > 0 {
                    share[i] = ((u128::from(reserve[i]) / tenants) as u64).max(1);
                }
            }
            Limits {
                tenant: tenant_limits(c),
                total,
                common,
                share,
            }
        }
    }

    /// Checks a write of `need` by a tenant holding `tenant` while all tenants hold
    /// `total`: the tenant's own limits, the all-tenant limits, and the reserve.
    ///
    /// The all-tenant limits are first-come up to `common`; the rest of each (the
    /// reserve) takes only writes of tenants that hold at most `share` after the write.
    /// So tenants that filled the store — a flood from a few addresses or accounts — are
    /// refused before it is full, and every other tenant can still store up to its share
    /// of the reserve: one tenant's flood never leaves the others nothing. The check is a
    /// handful of comparisons on running sums (no scan over tenants), and nothing is set
    /// aside for idle tenants below `common`. The price: a tenant above its share is capped
    /// at `common` even while the reserve is free (a one-tenant relay wants no reserve).
    pub(crate) fn check(
        tenant: &Usage,
        total: &Usage,
        need: &Need,
        l: &Limits,
    ) -> Result<(), (Scope, StoreError)> {
        if let Some((what, max)) = over(tenant, need, l.tenant) {
            return Err((Scope::Tenant, tenant_error(what, max)));
        }
        if let Some((what, max)) = over(total, need, l.total) {
            return Err((Scope::Global, global_error(what, max)));
        }
        reserve(tenant, &total.plus(need), need, l)
    }

    /// Checks a transfer of `moved` to a tenant holding `tenant` from another tenant (a
    /// retained value taken over, with its path): the total does not grow, so only the
    /// tenant's own limits and the reserve apply. Past the line, a tenant holding more than
    /// its share may not take values over either — else a small tenant could write into
    /// the reserve and a big one take each value over, and a few tenants fill it after all.
    pub(crate) fn check_transfer(
        tenant: &Usage,
        total: &Usage,
        moved: &Need,
        l: &Limits,
    ) -> Result<(), (Scope, StoreError)> {
        if let Some((what, max)) = over(tenant, moved, l.tenant) {
            return Err((Scope::Tenant, tenant_error(what, max)));
        }
        reserve(tenant, total, moved, l)
    }

    /// The reserve's part of a check: `after` is what all tenants hold after the write.
    /// Per limit, only one this write adds to and whose line `after` passes asks for the
    /// tenant's share.
    fn reserve(
        tenant: &Usage,
        after: &Usage,
        need: &Need,
        l: &Limits,
    ) -> Result<(), (Scope, StoreError)> {
        let (t, u, n) = (fields(after), fields(tenant), fields(need));
        for i in 0..5 {
            let into_reserve = n[i] > 0 && l.common[i] < l.total[i] && t[i] > l.common[i];
            if into_reserve && u[i].saturating_add(n[i]) > l.share[i] {
                return Err((
                    Scope::Reserve,
                    StoreError::QuotaExceeded(format!(
                        "the relay's total {} quota ({}) is nearly used up: its last {} are \
                         kept for tenants holding at most {}, and this write would leave this \
                         tenant holding more; retry once usage falls (retention, deletions) \
                         or ask the operator",
                        NAMES[i],
                        l.total[i],
                        l.total[i] - l.common[i],
                        l.share[i],
                    )),
                ));
            }
        }
        Ok(())
    }

    /// The error of a publish over a per-tenant quota.
    pub(crate) fn tenant_error(what: &str, max: u64) -> StoreError {
        StoreError::QuotaExceeded(format!(
            "this tenant's {what} quota ({max}) is reached; wait for retention to free space \
             or ask the operator"
        ))
    }

    /// The error of a publish over an all-tenant quota.
    pub(crate) fn global_error(what: &str, max: u64) -> StoreError {
        StoreError::QuotaExceeded(format!("the relay's total {what} quota ({max}) is reached"))
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use proptest::prelude::*;

        fn msgs(n: u64) -> Usage {
            Usage {
                msgs: n,
                ..Usage::default()
            }
        }

        /// 100 messages in all, 10 % reserve among 5 tenants: common 90, share 2.
        fn limits() -> Limits {
            let c = StoreConfig {
                total_max_messages: 100,
                reserve_percent: 10,
                reserve_tenants: 5,
                ..StoreConfig::default()
            };
            Limits::of(&c)
        }

        #[test]
        fn the_reserve_is_the_last_percent_divided_among_tenants() {
            let l = limits();
            assert_eq!((l.total[1], l.common[1], l.share[1]), (100, 90, 2));
            // Unlimited totals have no reserve.
            assert_eq!(
                (l.total[0], l.common[0], l.share[0]),
                (8 << 30, 7730941133, 171798691)
            );
            let none = Limits::of(&StoreConfig {
                total_max_messages: 0,
                reserve_percent: 0,
                ..StoreConfig::default()
            });
            assert_eq!((none.total[1], none.common[1], none.share[1]), (0, 0, 0));
            assert_eq!(
                none.common, none.total,
                "no reserve: the totals are first-come"
            );
            // A reserve smaller than its tenants: each may still hold one.
            let tiny = Limits::of(&StoreConfig {
                total_max_messages: 20,
                reserve_percent: 10,
                reserve_tenants: 100,
                ..StoreConfig::default()
            });
            assert_eq!((tiny.common[1], tiny.share[1]), (18, 1));
            // No overflow on the largest totals.
            let huge = Limits::of(&StoreConfig {
                total_max_messages: u64::MAX,
                reserve_percent: 90,
                ..StoreConfig::default()
            });
            assert!(huge.common[1] < huge.total[1] && huge.share[1] > 0);
        }

        #[test]
        fn a_tenant_that_filled_the_store_leaves_the_reserve_to_the_others() {
            let l = limits();
            let one = msgs(1);
            // The flooder fills the common part, first come.
            assert!(check(&msgs(89), &msgs(89), &one, &l).is_ok());
            let (scope, e) = check(&msgs(90), &msgs(90), &one, &l).unwrap_err();
            assert_eq!(scope, Scope::Reserve);
            assert!(
                e.to_string().contains("kept for tenants holding at most 2"),
                "{e}"
            );
            // Another tenant still stores its share, and no more.
            assert!(check(&msgs(0), &msgs(90), &one, &l).is_ok());
            assert!(check(&msgs(1), &msgs(91), &one, &l).is_ok());
            assert_eq!(
                check(&msgs(2), &msgs(92), &one, &l).unwrap_err().0,
                Scope::Reserve
            );
            // The total is still the total, whoever writes.
            assert_eq!(
                check(&msgs(0), &msgs(100), &one, &l).unwrap_err().0,
                Scope::Global
            );
            // A write that would straddle the line counts whole.
            assert_eq!(
                check(&msgs(0), &msgs(88), &msgs(3), &l).unwrap_err().0,
                Scope::Reserve
            );
            assert!(check(&msgs(0), &msgs(88), &msgs(2), &l).is_ok());
        }

        #[test]
        fn only_a_limit_whose_reserve_is_reached_asks_for_the_share() {
            let l = limits();
            // All tenants past the messages' line; this one holds 1 message (within its
            // share of 2) and many bytes (past its share of the bytes' reserve,
            // 171,798,691), but the bytes' total is far from its line: Ok.
            let mine = Usage {
                bytes: 200 << 20,
                msgs: 1,
                ..Usage::default()
            };
            let total = Usage {
                bytes: 200 << 20,
                msgs: 95,
                ..Usage::default()
            };
            let need = Usage {
                bytes: 1024,
                msgs: 1,
                ..Usage::default()
            };
            assert!(check(&mine, &total, &need, &l).is_ok());
            // A write that adds nothing to a limit past its line is not asked for that
            // share: a tenant over its messages' share creates a durable name.
            let big = Usage {
                msgs: 50,
                ..Usage::default()
            };
            let durable = Usage {
                durables: 1,
                ..Usage::default()
            };
            assert!(check(&big, &total, &durable, &l).is_ok());
            assert_eq!(
                check(&big, &total, &msgs(1), &l).unwrap_err().0,
                Scope::Reserve
            );
        }

        #[test]
        fn an_unlimited_total_has_no_reserve() {
            let l = Limits::of(&StoreConfig {
                total_max_messages: 0,
                tenant_max_messages: 0,
                reserve_percent: 10,
                ..StoreConfig::default()
            });
            let huge = msgs(u64::MAX / 2);
            assert!(check(&huge, &huge, &msgs(1), &l).is_ok());
        }

        #[test]
        fn a_transfer_past_the_line_needs_the_share() {
            let l = limits();
            let one = msgs(1);
            // Below the line a value may change hands freely.
            assert!(check_transfer(&msgs(50), &msgs(80), &one, &l).is_ok());
            // Past it, only to a tenant within its share after the transfer.
            assert!(check_transfer(&msgs(1), &msgs(95), &one, &l).is_ok());
            assert_eq!(
                check_transfer(&msgs(2), &msgs(95), &one, &l).unwrap_err().0,
                Scope::Reserve
            );
            // The tenant's own limits apply either way.
            let capped = Limits {
                tenant: [0, 10, 0, 0, 0],
                ..l
            };
            assert_eq!(
                check_transfer(&msgs(10), &msgs(20), &one, &capped)
                    .unwrap_err()
                    .0,
                Scope::Tenant
            );
        }

        proptest! {
            /// Whatever the usage: nothing passes a total; a tenant within its share of the
            /// reserve is refused only by a total or its own limits; past the common part,
            /// a tenant holding more than its share is refused.
            #[test]
            fn the_reserve_rules_hold(
                mine in 0u64..120, others in 0u64..120, n in 1u64..10,
                pct in 0u8..=90, tenants in 1u64..20,
            ) {
                let c = StoreConfig {
                    total_max_messages: 100,
                    tenant_max_messages: 0,
                    reserve_percent: pct,
                    reserve_tenants: tenants,
                    ..StoreConfig::default()
                };
                let l = Limits::of(&c);
                let total = mine + others;
                let r = check(&msgs(mine), &msgs(total), &msgs(n), &l);
                if total + n > 100 {
                    prop_assert_eq!(r.unwrap_err().0, Scope::Global);
                } else if total + n <= l.common[1] || mine + n <= l.share[1] {
                    prop_assert!(r.is_ok());
                } else {
                    prop_assert_eq!(r.unwrap_err().0, Scope::Reserve);
                }
            }
        }
    }
}

pub use jetstream::JetStreamStore;
pub use sqlite::SqliteStore;

/// Why a store refused a message or could not be opened.
#[derive(Debug, Clone, Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store cannot take messages right now.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store file could not be opened or is not a usable whispeer store.
    #[error("{0}")]
    Open(String),
    /// A storage quota (per tenant or global) is reached; the message was not accepted.
    #[error("quota exceeded: {0}")]
    QuotaExceeded(String),
    /// The disk is full: nothing needing the store is accepted until space frees (the store
    /// resumes by itself). Retryable.
    #[error("storage full: {0}")]
    StorageFull(String),
    /// The store's write queue is full. Retryable.
    #[error("store busy: {0}")]
    Busy(String),
    /// This store does not do that (e.g. history on the `none` store).
    #[error("not supported: {0}")]
    Unsupported(String),
    /// Refused for this client (a durable subscription owned by someone else).
    #[error("{0}")]
    NotAllowed(String),
    /// A durable name held by a connection at another relay (a cluster hold): retryable,
    /// it is given back when that subscription ends or lapses when that relay dies.
    #[error("{0}")]
    Held(String),
}

impl StoreError {
    /// The protocol error code a client is sent for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            StoreError::QuotaExceeded(_) => ErrorCode::QuotaExceeded,
            StoreError::StorageFull(_) => ErrorCode::StorageFull,
            StoreError::Busy(_) | StoreError::Held(_) => ErrorCode::Busy,
            StoreError::Unsupported(_) | StoreError::NotAllowed(_) => ErrorCode::NotAllowed,
            StoreError::Unavailable(_) | StoreError::Open(_) => ErrorCode::StoreFailed,
        }
    }
}

/// A key-id claim as a store shared by relays answers it ([`Store::claim_key`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// This store does not keep claims: the relay's auth-state file does.
    NotShared,
    /// The group holds the key id; `new`: this call claimed it.
    Ours {
        /// Claimed by this call.
        new: bool,
    },
    /// Another group holds the key id.
    Others,
    /// Nobody holds it, and the caller did not ask to claim it.
    Unclaimed,
}

/// The address every per-address limit and quota counts a client under: an IPv4 address as
/// is (also when it arrives mapped into IPv6), an IPv6 address cut to its first
/// `v6_prefix` bits (at most 128). A host usually holds a whole IPv6 /64 and can pick any
/// address in it per connection, so counting full IPv6 addresses would give one client
/// 2⁶⁴ separate budgets.
pub fn source_address(ip: IpAddr, v6_prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u32::from(v6_prefix.min(128));
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                IpAddr::V6((u128::from(v6) & mask).into())
            }
        },
    }
}

/// Whose quota a stored message, retained value or durable name counts against: the
/// authenticated relay account when accounts are on, else the source address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Tenant {
    /// A relay account (its Ed25519 public key or account id).
    Account([u8; 32]),
    /// The connection's [`source_address`].
    Address(IpAddr),
    /// An in-process caller with no address (embedded use, tests).
    Local,
    /// A tenant of another relay of the cluster, as that relay's forward names it (its
    /// [`tag`](Tenant::tag), header `Wsp-Tenant`): an envelope from another relay counts
    /// against its publisher's own quota here, not one shared by every remote publisher.
    Remote([u8; 16]),
}

impl Tenant {
    /// The tenant of a connection from `peer` when accounts are off: its
    /// [`source_address`] (IPv6 grouped by its first `v6_prefix` bits).
    pub fn from_peer(peer: Option<SocketAddr>, v6_prefix: u8) -> Self {
        match peer {
            Some(p) => Tenant::Address(source_address(p.ip(), v6_prefix)),
            None => Tenant::Local,
        }
    }

    /// The tenant of a legacy relay account (an entry without `id`): SHA-256 of its name
    /// under a context string (names are unique in the account list; the store keeps no
    /// names). Unchanged since before ids, so such an account keeps its store usage.
    pub fn for_account(name: &str) -> Self {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(b"whispeer-relay/v2/tenant\0");
        h.update(name.as_bytes());
        Tenant::Account(h.finalize().into())
    }

    /// The tenant of a relay account with an `id` (review finding 17): SHA-256 of the id
    /// under its own context string, so a name removed and added again (a new id) starts
    /// with no usage, and no name's tenant ([`for_account`](Self::for_account)) can equal
    /// it (the context strings differ within their first 17 bytes).
    pub fn for_account_id(id: &[u8; 16]) -> Self {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(b"whispeer-relay/v3/account-id-tenant\0");
        h.update(id);
        Tenant::Account(h.finalize().into())
    }

    /// The stable byte key the store files usage under.
    pub fn key(&self) -> Vec<u8> {
        match self {
            Tenant::Account(a) => [&b"a"[..], a].concat(),
            Tenant::Address(IpAddr::V4(v4)) => [&b"4"[..], &v4.octets()].concat(),
            Tenant::Address(IpAddr::V6(v6)) => [&b"6"[..], &v6.octets()].concat(),
            Tenant::Local => b"l".to_vec(),
            Tenant::Remote(t) => [&b"r"[..], t].concat(),
        }
    }

    /// The tenant as other relays and NATS see it: 16 bytes of SHA-256 of its
    /// [`key`](Tenant::key) under a context string, so a source address never travels in
    /// clear (an IPv4 address is still guessable from it by brute force; NATS sees the
    /// relays' connections anyway, never the clients'). A [`Tenant::Remote`] is its tag.
    /// What the JetStream store's usage ledger and the cluster bridge's forwards carry
    /// (header `Wsp-Tenant`, in hex).
    pub fn tag(&self) -> [u8; 16] {
        use sha2::{Digest, Sha256};
        if let Tenant::Remote(t) = self {
            return *t;
        }
        let mut h = Sha256::new();
        h.update(b"whispeer-relay/v2/jetstream-tenant\0");
        h.update(self.key());
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&h.finalize()[..16]);
        tag
    }
}

/// What the router hands the store: metadata plus the opaque envelope.
#[derive(Debug, Clone, Copy)]
pub struct Append<'a> {
    /// The route read from the envelope header.
    pub path: &'a TokenPath,
    /// The envelope exactly as published (opaque; a store keeps bytes, never opens them).
    pub envelope: &'a Envelope,
    /// The `Pub` frame's flags (`pub_flags`).
    pub flags: u64,
    /// The `Pub` frame's QoS.
    pub qos: Qos,
    /// The `Pub` frame's publish id, if any.
    pub publish_id: Option<[u8; 16]>,
    /// Whose quota the message counts against.
    pub tenant: &'a Tenant,
}

/// The outcome of [`Store::append`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// A new message with this sequence, kept in history: deliver it.
    New(Seq),
    /// A new message with this sequence that is routed but not kept in history (QoS 0
    /// without `store.store_qos0`, a retained-only QoS 0 value, or no store): deliver it; a
    /// subscription paused for credit cannot catch up on it later.
    Live(Seq),
    /// A duplicate publish id inside the dedup window: the original's sequence. Not stored
    /// again and not delivered again.
    Duplicate(Seq),
    /// Handed to a store that numbers messages elsewhere (the cluster's JetStream stream):
    /// not routed now — it is routed, numbered, when it comes back from the stream
    /// ([`Store::take_sequenced`]). [`Store::when_sequenced`] with this ticket learns the
    /// outcome (`New` or `Duplicate` with its sequence, once durable, or the error); it
    /// MUST be called once for every ticket.
    Pending(u64),
}

/// Called once a sequence is durable (or the store failed).
pub type OnDurable = Box<dyn FnOnce(Result<(), StoreError>) + Send + 'static>;

/// Called once a [`Accepted::Pending`] publish is numbered and durable: `New(seq)`,
/// `Duplicate(original seq)`, or the error.
pub type OnSequenced = Box<dyn FnOnce(Result<Accepted, StoreError>) + Send + 'static>;

/// A message a store numbered elsewhere, to be routed by the relay in sequence order.
#[derive(Debug, Clone)]
pub struct Sequenced {
    /// Its sequence (the JetStream stream sequence).
    pub seq: Seq,
    /// The envelope as published.
    pub envelope: Envelope,
    /// The publish flags (`pub_flags`).
    pub flags: u64,
    /// Kept in history (false: a retained-only QoS 0 value, routed like a live-only
    /// message: a subscription paused for credit cannot catch up on it).
    pub kept: bool,
}

/// A stored message read back.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Its relay sequence.
    pub seq: Seq,
    /// The envelope as published.
    pub envelope: Envelope,
}

/// A resolved replay request: which stored messages a history read returns.
#[derive(Debug, Clone, Default)]
pub struct ReadPlan {
    /// First sequence to look at.
    pub start: u64,
    /// Only messages received at or after this Unix time (ms).
    pub since_ms: Option<u64>,
    /// Per path (raw bytes): the first sequence to return (`LastN`).
    pub path_starts: Option<HashMap<Vec<u8>, u64>>,
}

impl ReadPlan {
    /// `LastN`: from each path's own first sequence (`upto + 1` when no path has any).
    pub fn per_path(starts: HashMap<Vec<u8>, u64>, upto: Seq) -> Self {
        ReadPlan {
            start: starts.values().copied().min().unwrap_or(upto.0 + 1),
            since_ms: None,
            path_starts: Some(starts),
        }
    }

    /// Whether a stored message passes the plan's filters (the pattern is checked apart).
    pub fn admits(&self, seq: u64, path: &[u8], ts_ms: u64) -> bool {
        if seq < self.start {
            return false;
        }
        if let Some(since) = self.since_ms {
            if ts_ms < since {
                return false;
            }
        }
        match &self.path_starts {
            Some(starts) => starts.get(path).is_some_and(|s| seq >= *s),
            None => true,
        }
    }
}

/// The most one history read returns ([`Store::read_limited`]): at most `msgs` messages
/// and, past the first message, at most `bytes` of envelopes (the first message is
/// returned whatever its size: the caller checks it against its credit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimit {
    /// Most messages (at least one is asked for).
    pub msgs: usize,
    /// Most envelope bytes, the first message apart.
    pub bytes: usize,
}

impl ReadLimit {
    /// No limit beyond the store's chunk.
    pub const CHUNK: ReadLimit = ReadLimit {
        msgs: usize::MAX,
        bytes: usize::MAX,
    };

    /// Whether a chunk holding `n` messages of `bytes` envelope bytes takes one more of
    /// `len` bytes.
    pub fn takes(&self, n: usize, bytes: usize, len: usize) -> bool {
        n == 0 || (n < self.msgs && bytes.saturating_add(len) <= self.bytes)
    }

    /// Cuts `chunk` to the limit: it then ends before the first message past it.
    pub fn cut(&self, chunk: &mut ReadChunk) {
        let mut bytes = 0;
        let keep = chunk.msgs.iter().enumerate().find_map(|(i, m)| {
            let len = m.envelope.len();
            if self.takes(i, bytes, len) {
                bytes += len;
                None
            } else {
                Some(i)
            }
        });
        if let Some(i) = keep {
            chunk.next = chunk.msgs[i].seq.0;
            chunk.msgs.truncate(i);
        }
    }
}

/// One chunk of a history read.
#[derive(Debug, Clone, Default)]
pub struct ReadChunk {
    /// Matching messages, in sequence order.
    pub msgs: Vec<Stored>,
    /// Where the next chunk starts (past `upto` when the read is complete).
    pub next: u64,
}

/// A durable subscription's identity: the filter's key id (so trees never collide) and
/// the client-chosen name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DurableKey {
    /// The key id of the subscription's filter.
    pub key_id: KeyId,
    /// The name from `Sub.durable`.
    pub name: String,
}

/// Where a store reports a durable name whose cluster-wide hold was lost (the connection
/// holding it ends that subscription). Each hold carries its own `generation`, sent back
/// with the notice, so a notice about a hold the connection has since given back and taken
/// again (unsubscribe, subscribe) cannot end the new subscription.
#[derive(Debug, Clone)]
pub struct HoldLost {
    tx: tokio::sync::mpsc::UnboundedSender<(DurableKey, u64)>,
    generation: u64,
}

impl HoldLost {
    /// A notifier for one hold: `generation` tells it apart from the same name's other
    /// holds on this connection.
    pub fn new(tx: tokio::sync::mpsc::UnboundedSender<(DurableKey, u64)>, generation: u64) -> Self {
        HoldLost { tx, generation }
    }
    /// Reports that the hold on `key` was lost (ignored once the connection is gone).
    pub fn notify(&self, key: DurableKey) {
        let _ = self.tx.send((key, self.generation));
    }
}

/// Retention limits, per token path (0 = unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RetentionStatus {
    /// Most messages kept per path.
    pub max_messages: u64,
    /// Most envelope bytes kept per path.
    pub max_bytes: u64,
    /// Oldest message kept, in milliseconds.
    pub max_age_ms: u64,
}

/// One token path in `/status` (opaque: hex of key id and tokens).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathStatus {
    /// Key id and tokens, hex, 32 characters per element.
    pub path: String,
    /// Messages kept.
    pub messages: u64,
    /// Envelope bytes kept.
    pub bytes: u64,
    /// Oldest kept sequence.
    pub first_seq: u64,
    /// Newest kept sequence.
    pub last_seq: u64,
}

/// The store part of `/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct StoreStatus {
    /// `sqlite`, `memory` or `none`.
    pub kind: String,
    /// The database file (sqlite only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Database file + WAL size in bytes (sqlite only).
    pub file_bytes: u64,
    /// Retention limits per path.
    pub retention: RetentionStatus,
    /// Last sequence assigned.
    pub last_seq: u64,
    /// Last sequence committed.
    pub committed_seq: u64,
    /// Messages kept, all paths.
    pub messages: u64,
    /// Envelope bytes kept, all paths.
    pub bytes: u64,
    /// Bytes as the byte quotas count them (`store.total_max_bytes`): the SQLite store
    /// counts each kept envelope with its row's share of the file's pages and its index
    /// entries (history and retained values); 0 for a store that does not count.
    #[serde(default)]
    pub quota_bytes: u64,
    /// Paths with messages.
    pub path_count: u64,
    /// The largest paths (by bytes), at most 100.
    pub paths: Vec<PathStatus>,
    /// Retained values kept.
    pub retained: u64,
    /// Durable subscriptions known.
    pub durables: u64,
    /// Publish ids in the dedup window.
    pub dedup_entries: u64,
    /// `ok`, `storage_full` (the disk is full; retried until space frees), `low_disk`
    /// (less than `store.min_free_bytes` free: publishes that need the store are refused
    /// until space frees) or `unavailable`.
    #[serde(default)]
    pub state: String,
    /// Free bytes of the file system holding the store file, as last measured (file
    /// stores on Unix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_free_bytes: Option<u64>,
    /// `store.min_free_bytes`: below it, publishes that need the store are refused.
    #[serde(default)]
    pub min_free_bytes: u64,
    /// Tenants (accounts or source addresses) with stored data.
    #[serde(default)]
    pub tenants: u64,
}

/// Store counters for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoreMetrics {
    /// Messages appended.
    pub appends: u64,
    /// Duplicate publishes answered from the dedup window.
    pub duplicates: u64,
    /// Transactions committed.
    pub commits: u64,
    /// Messages deleted by retention.
    pub trimmed: u64,
    /// Commit batch sizes: cumulative counts per bucket of [`BATCH_BUCKETS`], then count, sum.
    pub batch_buckets: Vec<u64>,
    /// Operations committed in all batches.
    pub batch_sum: u64,
    /// Commit latency: cumulative counts per bucket of [`COMMIT_BUCKETS`].
    pub commit_buckets: Vec<u64>,
    /// Total commit time, seconds.
    pub commit_seconds_sum: f64,
    /// Publishes refused by a per-tenant quota.
    pub quota_tenant_rejections: u64,
    /// Publishes refused by a global quota.
    pub quota_global_rejections: u64,
    /// Publishes refused by the reserve (`store.reserve_percent`): the totals were nearly
    /// used up and the tenant held more than its share of the rest.
    pub quota_reserve_rejections: u64,
    /// Publishes refused because the disk was full.
    pub storage_full_rejections: u64,
    /// Publishes refused because the store's file system had less than
    /// `store.min_free_bytes` free (after what is queued for the disk).
    pub low_disk_rejections: u64,
    /// Free bytes of the store's file system, as last measured (file stores on Unix).
    pub disk_free_bytes: Option<u64>,
    /// Publishes refused because the write queue was full.
    pub busy_rejections: u64,
    /// Commits that failed (the batch's publishers got an error, nothing was acknowledged).
    pub commit_failures: u64,
    /// Messages routed live without being stored (QoS 0 outside the retention policy).
    pub live_only: u64,
    /// Background WAL checkpoints run.
    pub checkpoints: u64,
    /// Times the writer checkpointed the WAL and truncated it (it had grown past 64 MiB,
    /// or free space was low).
    pub wal_truncations: u64,
    /// Stored rows history, replay and retained reads examined (a read under a key id the
    /// store never saw examines none).
    pub rows_read: u64,
    /// Cluster store: retained writes followed by a confirming write (a write of an older
    /// value of the path may have passed nats-server's check at the same time).
    pub retained_confirms: u64,
    /// Cluster store: retained values written again because an older value's write had
    /// landed after them (nats-server before 2.9.21 in a clustered stream).
    pub retained_repairs: u64,
}

/// Upper bounds of the commit batch size histogram.
pub const BATCH_BUCKETS: [f64; 9] = [
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0,
];
/// Upper bounds of the commit latency histogram, in seconds.
pub const COMMIT_BUCKETS: [f64; 12] = [
    5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 1e-1, 1.0,
];

/// Accepts published messages, assigns their relay sequence numbers, keeps history,
/// retained values, durable positions and the publish-id dedup window.
///
/// No method has a default: every store states what it does. A store without history
/// answers [`StoreError::Unsupported`] rather than an empty result.
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// `sqlite`, `memory` or `none`.
    fn kind(&self) -> &'static str;
    /// Feature bits (`whispeer_protocol::frame::features`) this store supports.
    fn features(&self) -> u64;
    /// Accepts one message (called under the routing lock of its key id's shard, so it never
    /// waits on a disk; appends of other shards' key ids run concurrently): returns its
    /// sequence, strictly greater than every earlier one, or the original's for
    /// a duplicate publish id. A full queue is [`StoreError::Busy`], a quota
    /// [`StoreError::QuotaExceeded`], a full disk [`StoreError::StorageFull`].
    fn append(&self, msg: Append<'_>) -> Result<Accepted, StoreError>;
    /// The last sequence assigned (`Seq(0)` before the first message).
    fn last_seq(&self) -> Seq;
    /// The id of the sequence space this store numbers messages in (`Welcome.seq_space`,
    /// PROTOCOL §3.5.7): random when the store is created and kept as long as its numbers
    /// are (a file store keeps it across restarts; a memory or `none` store numbers afresh
    /// in each process, so it draws a new one). A client resumes by sequence only on a
    /// relay naming the space its positions came from.
    fn seq_space(&self) -> [u8; 16];
    /// Runs `done` once every message up to `seq` is durable (immediately if it is).
    fn when_durable(&self, seq: Seq, done: OnDurable);
    /// Runs `done` with the outcome of a publish [`append`](Self::append) answered
    /// [`Accepted::Pending`] (immediately if known). Stores that number messages
    /// themselves never answer `Pending` and fail this at once.
    fn when_sequenced(&self, ticket: u64, done: OnSequenced);
    /// A message this store numbered elsewhere ([`Sequenced`]) is being routed, under its
    /// shard's routing lock (one task routes them all, in order): it becomes [`last_seq`](Self::last_seq). Stores that number messages
    /// themselves ignore it.
    fn advance(&self, seq: Seq);
    /// The messages this store numbers elsewhere, in sequence order, for the relay to route
    /// (taken once). `None` for stores that number messages themselves.
    fn take_sequenced(&self) -> Option<tokio::sync::mpsc::Receiver<Sequenced>>;
    /// Runs `done` once a history or retained read of `key_id` up to `upto` would see
    /// every write of that key id up to `upto` (immediately if it would). Writes of other
    /// key ids — other tenants — never delay it, nor do `PubAck`s waiting in order: a
    /// subscriber's live messages wait behind its replay or retained lookup, so waiting for
    /// the whole store would let anyone who floods the disk stall every new subscription.
    fn when_readable(&self, key_id: &KeyId, upto: Seq, done: OnDurable);
    /// Resolves a replay request against what is stored, for messages up to `upto`.
    /// Blocking: call off the async runtime.
    fn plan(
        &self,
        pattern: &TokenPattern,
        replay: Replay,
        upto: Seq,
    ) -> Result<ReadPlan, StoreError>;
    /// Reads matching stored messages with sequence in `from..=upto` (a chunk; call again
    /// from `next` until `next > upto`). Blocking: call off the async runtime.
    fn read(
        &self,
        pattern: &TokenPattern,
        plan: &ReadPlan,
        from: u64,
        upto: Seq,
    ) -> Result<ReadChunk, StoreError>;
    /// [`read`](Self::read) returning at most `limit`'s messages and envelope bytes: what a
    /// QoS ≥ 1 sender has credit for now, so it never holds messages across a wait for
    /// credit. The chunk ends before the message past either cap (`next` is that message's
    /// sequence), or where `read` ends it. The default reads a whole chunk and cuts it;
    /// stores override it to read no further than the cut.
    fn read_limited(
        &self,
        pattern: &TokenPattern,
        plan: &ReadPlan,
        from: u64,
        upto: Seq,
        limit: ReadLimit,
    ) -> Result<ReadChunk, StoreError> {
        let mut chunk = self.read(pattern, plan, from, upto)?;
        limit.cut(&mut chunk);
        Ok(chunk)
    }
    /// Retained values with sequence in `from..=upto` of every path the pattern matches, in
    /// sequence order — a chunk that ends after [`READ_CHUNK_BYTES`] of envelopes (at least
    /// one value); call again from `next` until `next > upto`. Blocking: call off the async
    /// runtime.
    fn retained(
        &self,
        pattern: &TokenPattern,
        from: u64,
        upto: Seq,
    ) -> Result<ReadChunk, StoreError>;
    /// [`retained`](Self::retained) returning at most `limit`'s values and envelope bytes:
    /// what a QoS ≥ 1 subscription has credit for now (retained values are sent under its
    /// credit, as history is). The chunk ends before the value past either cap (`next` is
    /// its sequence). The default reads a whole chunk and cuts it; a store may override it
    /// to read no further than the cut.
    fn retained_limited(
        &self,
        pattern: &TokenPattern,
        from: u64,
        upto: Seq,
        limit: ReadLimit,
    ) -> Result<ReadChunk, StoreError> {
        let mut chunk = self.retained(pattern, from, upto)?;
        limit.cut(&mut chunk);
        Ok(chunk)
    }
    /// A durable subscription's acknowledged floor (every matching message up to it is
    /// acknowledged), if the durable exists.
    fn durable(&self, key: &DurableKey) -> Result<Option<u64>, StoreError>;
    /// Records a durable subscription's floor, persisted write-behind. Creating a new
    /// durable counts against `tenant`'s durable-name quota.
    fn set_durable(&self, key: &DurableKey, floor: u64, tenant: &Tenant) -> Result<(), StoreError>;
    /// Deletes a durable subscription — its name, floor and (in a store that keeps them)
    /// owner — and gives its count back to the durable quotas. The caller holds the name
    /// (its subscription, being ended, is the durable's). `Ok(false)`: there was none.
    /// Stores without durables answer [`StoreError::Unsupported`].
    fn delete_durable(&self, key: &DurableKey) -> Result<bool, StoreError>;
    /// Durables this store deleted by itself (not held by any subscription for
    /// `store.durable_idle_ms`), for the relay to forget their owners (taken once; `None`
    /// for a store that never deletes durables by itself).
    fn take_gone(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<DurableKey>>;
    /// Checks, for a store shared by several relays, the owner of a durable subscription
    /// (`account-id:HEX`, `account:NAME` for a legacy account entry, `sha256:HEX` of the
    /// `Sub.owner` secret, or None), recording it for a durable about to be created or one
    /// created without an owner. `Ok(true)`: this
    /// store keeps owners, the relay keeps none of its own; `Ok(false)`: owners are the
    /// relay's (its auth-state file); `Err(NotAllowed)`: the durable is someone else's;
    /// `Err(Busy)`: another owner's `Sub` is creating it (retryable).
    fn durable_owner(&self, key: &DurableKey, owner: Option<&str>) -> Result<bool, StoreError>;
    /// A durable `Sub`'s read of its durable once it holds the name (here and, for a
    /// shared store, [`hold_durable`](Store::hold_durable)): its floor as
    /// [`durable`](Store::durable), and, for a store that keeps owners, checked again
    /// against the `Sub`'s `owner` (as [`durable_owner`](Store::durable_owner) takes it) —
    /// the durable checked before the hold may have been deleted and created again by
    /// another owner since (`Err(NotAllowed)`) — and, when it is new, that owner is the
    /// one the creation ([`set_durable`](Store::set_durable), next) records.
    fn durable_for(
        &self,
        key: &DurableKey,
        _owner: Option<&str>,
    ) -> Result<Option<u64>, StoreError> {
        self.durable(key)
    }
    /// A durable `Sub` that passed [`durable_owner`](Store::durable_owner) failed before
    /// [`durable_for`](Store::durable_for) (the name or the hold refused): a store that
    /// reserved a new name for its owner's creation gives it up, so other owners' `Sub`s
    /// are not refused `busy` for it meanwhile.
    fn durable_abandoned(&self, _key: &DurableKey, _owner: Option<&str>) {}
    /// Claims `key_id` for the accounts group `group` across every relay sharing this
    /// store, or says who holds it (§ relay accounts: the first group to use a key id
    /// claims it). With `create` false nothing is written: an unclaimed key id is
    /// [`Claim::Unclaimed`] (a group at its claim limit may still use what it holds).
    /// [`Claim::NotShared`]: claims are the relay's own (its auth-state file).
    fn claim_key(&self, key_id: &KeyId, group: &str, create: bool) -> Result<Claim, StoreError>;
    /// Whether anything is kept under `key_id` — a message of its history, a retained
    /// value, a durable subscription (also one only queued for the disk) — so its claim
    /// must not lapse (`auth.claim_idle_ms`): the next group to claim the key id would read
    /// it. Asked under the relay's claim lock, for a few key ids per request at most: answer
    /// from memory. The default, `Ok(true)`, never lets a claim lapse.
    fn holds_key_id(&self, _key_id: &KeyId) -> Result<bool, StoreError> {
        Ok(true)
    }
    /// Takes the hold on a durable name across every relay sharing this store, for one
    /// connection of this relay (which already holds it locally: one holder per relay is
    /// the relay's own rule). `Err(Held)`: a connection at another relay holds it.
    /// When the hold is lost afterwards (not renewed in time, taken elsewhere), the key
    /// is sent on `lost` and the relay ends that subscription. Stores not shared by relays
    /// (SQLite, memory) have nothing to take: `Ok`.
    fn hold_durable(&self, _key: &DurableKey, _lost: &HoldLost) -> Result<(), StoreError> {
        Ok(())
    }
    /// Gives back a hold [`hold_durable`](Store::hold_durable) took (the subscription or
    /// its connection ended). Does nothing for a name this relay does not hold.
    fn release_hold(&self, _key: &DurableKey) {}
    /// `/status` details.
    fn status(&self) -> StoreStatus;
    /// `/status` counts without the per-path list (`paths` empty): all that a caller
    /// without the admin token may see, so a store whose [`status`](Store::status) visits
    /// every path answers it from running totals instead (SQLite: the quota counters, so
    /// `bytes` includes retained values and `path_count` paths holding only one, as with
    /// JetStream).
    fn status_counts(&self) -> StoreStatus {
        let mut s = self.status();
        s.paths.clear();
        s
    }
    /// `/metrics` counters.
    fn metrics(&self) -> StoreMetrics;
    /// Flushes everything queued and closes (clean shutdown). Idempotent.
    fn close(&self);
}

/// Envelope bytes after which a history read chunk ends (it holds at least one message).
/// The history sender queues a chunk whole for the subscriber, then waits for room: a chunk
/// of 1,024 large envelopes was up to 1 GiB in the queue of one connection that does not
/// read (a copy per replaying connection).
pub const READ_CHUNK_BYTES: usize = 1 << 20;

/// The delivery features of a store that keeps messages (SQLite, memory, JetStream).
pub const KEEPING_FEATURES: u64 = whispeer_protocol::frame::features::AT_LEAST_ONCE
    | whispeer_protocol::frame::features::EXACTLY_ONCE
    | whispeer_protocol::frame::features::RETAIN
    | whispeer_protocol::frame::features::REPLAY
    | whispeer_protocol::frame::features::DURABLE;

/// Live fan-out only: assigns sequence numbers and keeps nothing (`store.kind = "none"`).
#[derive(Debug)]
pub struct LiveStore {
    last: std::sync::atomic::AtomicU64,
    /// Numbers restart at 1 in every process: a fresh space each time.
    space: [u8; 16],
}

impl Default for LiveStore {
    fn default() -> Self {
        LiveStore {
            last: Default::default(),
            space: new_seq_space(),
        }
    }
}

/// A fresh random sequence-space id (OS randomness; a failing OS RNG would make every
/// relay share one space, so it panics rather than fall back to a constant).
pub fn new_seq_space() -> [u8; 16] {
    let mut id = [0u8; 16];
    getrandom::getrandom(&mut id).expect("OS random number generator");
    id
}

impl LiveStore {
    /// A store starting at sequence 0.
    pub fn new() -> Self {
        Self::default()
    }

    fn unsupported(what: &str) -> StoreError {
        StoreError::Unsupported(format!(
            "this relay keeps no messages (store kind none): {what} is unavailable"
        ))
    }
}

impl Store for LiveStore {
    fn kind(&self) -> &'static str {
        "none"
    }

    fn features(&self) -> u64 {
        0
    }

    fn append(&self, msg: Append<'_>) -> Result<Accepted, StoreError> {
        use std::sync::atomic::Ordering;
        if msg.qos != Qos::AtMostOnce {
            return Err(Self::unsupported("QoS >= 1"));
        }
        Ok(Accepted::Live(Seq(self
            .last
            .fetch_add(1, Ordering::Relaxed)
            + 1)))
    }

    fn last_seq(&self) -> Seq {
        Seq(self.last.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn seq_space(&self) -> [u8; 16] {
        self.space
    }

    fn when_durable(&self, _seq: Seq, done: OnDurable) {
        done(Err(Self::unsupported("durability")))
    }

    fn when_readable(&self, _: &KeyId, _: Seq, done: OnDurable) {
        done(Err(Self::unsupported("history")))
    }

    fn when_sequenced(&self, _: u64, done: OnSequenced) {
        done(Err(Self::unsupported("durability")))
    }

    fn advance(&self, _: Seq) {}

    fn take_sequenced(&self) -> Option<tokio::sync::mpsc::Receiver<Sequenced>> {
        None
    }

    fn plan(&self, _: &TokenPattern, _: Replay, _: Seq) -> Result<ReadPlan, StoreError> {
        Err(Self::unsupported("history"))
    }

    fn read(
        &self,
        _: &TokenPattern,
        _: &ReadPlan,
        _: u64,
        _: Seq,
    ) -> Result<ReadChunk, StoreError> {
        Err(Self::unsupported("history"))
    }

    fn retained(&self, _: &TokenPattern, _: u64, _: Seq) -> Result<ReadChunk, StoreError> {
        Err(Self::unsupported("retained values"))
    }

    fn durable(&self, _: &DurableKey) -> Result<Option<u64>, StoreError> {
        Err(Self::unsupported("durable subscriptions"))
    }

    fn set_durable(&self, _: &DurableKey, _: u64, _: &Tenant) -> Result<(), StoreError> {
        Err(Self::unsupported("durable subscriptions"))
    }

    fn durable_owner(&self, _: &DurableKey, _: Option<&str>) -> Result<bool, StoreError> {
        Err(Self::unsupported("durable subscriptions"))
    }

    fn delete_durable(&self, _: &DurableKey) -> Result<bool, StoreError> {
        Err(Self::unsupported("durable subscriptions"))
    }

    fn take_gone(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<DurableKey>> {
        None
    }

    fn claim_key(&self, _: &KeyId, _: &str, _: bool) -> Result<Claim, StoreError> {
        // One relay, nothing stored: the relay's auth-state file keeps claims.
        Ok(Claim::NotShared)
    }

    fn holds_key_id(&self, _: &KeyId) -> Result<bool, StoreError> {
        // Keeps nothing.
        Ok(false)
    }

    fn status(&self) -> StoreStatus {
        StoreStatus {
            kind: self.kind().into(),
            last_seq: self.last_seq().0,
            committed_seq: self.last_seq().0,
            ..StoreStatus::default()
        }
    }

    fn metrics(&self) -> StoreMetrics {
        StoreMetrics::default()
    }

    fn close(&self) {}
}

/// The raw bytes of a token path: key id, then each token (16 bytes each).
pub fn path_bytes(path: &TokenPath) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 * (1 + path.tokens().len()));
    v.extend_from_slice(path.key_id().as_bytes());
    for t in path.tokens() {
        v.extend_from_slice(t.as_bytes());
    }
    v
}

/// Opens the store a configuration asks for (`default_kind` when it names none).
pub fn open(
    config: &crate::config::StoreConfig,
    default_kind: crate::config::StoreKind,
) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    use crate::config::StoreKind;
    Ok(match config.kind.unwrap_or(default_kind) {
        StoreKind::None => std::sync::Arc::new(LiveStore::new()),
        StoreKind::Memory => std::sync::Arc::new(SqliteStore::open_memory(config.clone())?),
        StoreKind::Sqlite => std::sync::Arc::new(SqliteStore::open_file(config.clone())?),
    })
}
