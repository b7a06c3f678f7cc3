//! Subscriptions per tenant and in all (`limits.tenant_max_subscriptions`,
//! `limits.tenant_subscription_bytes`, `limits.max_total_subscriptions`,
//! `limits.total_subscription_bytes`).
//!
//! A subscription costs the relay memory that grows with its depth: each level it does not
//! share with another subscription is a node of the routing index (measured on the relay
//! binary's RSS, debug build: ~2.4 KiB for a five-level filter, ~16.5 KiB for a 32-level
//! one), and
//! `max_subscriptions` only bounds one connection: 256 connections from one address could
//! hold 256,000 of them, and addresses are cheap (an IPv6 /48 holds 65,536 /64s). So the
//! tenant — the relay account, or the source address when accounts are off — has caps of
//! its own, on the count and on the memory its filters may cost ([`cost`]: as if no level
//! were shared), and the relay has totals. Over any, a `Sub` is answered with a non-fatal
//! `Err(too_many_subscriptions)` naming it; the connection and its other subscriptions
//! carry on.
//!
//! The totals are not first-come to the end: like the store's, they keep a reserve
//! (`limits.subscription_reserve_percent` of each, divided among
//! `limits.subscription_reserve_tenants`). Past the rest, a `Sub` is taken only from a
//! tenant that holds at most its share of the reserve after it — so a few tenants that
//! filled the totals (32 accounts, or 32 IPv6 /64s of one /48 with auth off, at the
//! default caps) cannot lock every other tenant out.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::store::Tenant;

/// What a subscription of `levels` levels may cost the relay, in bytes: a fixed part
/// (session record, index entry, target) and one index node per level, as measured.
///
/// Memory only, wildcards or not: what `+` levels cost in routing work (every publish on a
/// path their prefixes match walks their nodes) is charged to the publisher instead
/// (`rate::walk_tokens`, see `index`). Pricing `+` here would have to refuse ordinary
/// filter sets to bound the walk — one tenant's 1,872 deep filters already reach 41,359
/// nodes a publish — and would still not bound several tenants on one key id.
pub(crate) fn cost(levels: usize) -> usize {
    512 + 544 * levels
}

/// What a tenant, or the relay, holds.
#[derive(Debug, Default, Clone, Copy)]
struct Held {
    subs: usize,
    bytes: usize,
}

/// Subscriptions held per tenant and in all.
#[derive(Debug)]
pub(crate) struct SubQuota {
    tenant_max: Held,
    total_max: Held,
    /// What all tenants may hold before the reserve: `total_max` less the reserve (equal
    /// to it without one).
    common: Held,
    /// Most a tenant may hold and still subscribe into the reserve.
    share: Held,
    state: Mutex<(HashMap<Tenant, Held>, Held)>,
}

impl SubQuota {
    /// Caps per tenant and in all, as (count, bytes), 0 = unlimited; and the reserve, as
    /// (percent of each total, tenants it is divided among).
    pub(crate) fn new(
        tenant_max: (usize, usize),
        total_max: (usize, usize),
        reserve: (u8, u64),
    ) -> Self {
        let unlimited = |n: usize| if n == 0 { usize::MAX } else { n };
        let cap = |(subs, bytes): (usize, usize)| Held {
            subs: unlimited(subs),
            bytes: unlimited(bytes),
        };
        let total_max = cap(total_max);
        let (pct, tenants) = (u128::from(reserve.0.min(100)), u128::from(reserve.1.max(1)));
        // (common, share) of one total; an unlimited total has no reserve. A share is at
        // least one subscription's worth (`least`: 1, or the bytes of a 1-level filter)
        // where there is a reserve: below, no tenant could ever subscribe into it and the
        // total would silently be its common part (fewer tenants are then sure of their
        // share: warned at start, `Config::reserve_warnings`).
        let split = |total: usize, least: usize| {
            if total == usize::MAX {
                return (total, 0);
            }
            let r = (total as u128 * pct / 100) as usize;
            let share = if r > 0 {
                ((r as u128 / tenants) as usize).max(least)
            } else {
                0
            };
            (total - r, share)
        };
        let (subs, bytes) = (split(total_max.subs, 1), split(total_max.bytes, cost(1)));
        Self {
            tenant_max: cap(tenant_max),
            total_max,
            common: Held {
                subs: subs.0,
                bytes: bytes.0,
            },
            share: Held {
                subs: subs.1,
                bytes: bytes.1,
            },
            state: Mutex::new((HashMap::new(), Held::default())),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, (HashMap<Tenant, Held>, Held)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Why one more subscription of `levels` levels for `tenant` is refused — replacing
    /// one of `replacing` levels, whose share it takes over — or `None` when it may go
    /// ahead.
    #[cfg(test)]
    pub(crate) fn refusal(
        &self,
        tenant: &Tenant,
        levels: usize,
        replacing: Option<usize>,
    ) -> Option<String> {
        self.refusal_in(&self.state(), tenant, levels, replacing)
    }

    fn refusal_in(
        &self,
        st: &(HashMap<Tenant, Held>, Held),
        tenant: &Tenant,
        levels: usize,
        replacing: Option<usize>,
    ) -> Option<String> {
        let (tenants, total) = st;
        let freed = replacing.map_or(Held::default(), |l| Held {
            subs: 1,
            bytes: cost(l),
        });
        let after = |h: Held| Held {
            subs: h.subs.saturating_sub(freed.subs) + 1,
            bytes: h.bytes.saturating_sub(freed.bytes) + cost(levels),
        };
        let c = cost(levels);
        let t = after(*total);
        if t.subs > self.total_max.subs || t.bytes > self.total_max.bytes {
            return Some(format!(
                "the relay holds its limit of subscriptions ({} or {} MiB of filters); try \
                 again later",
                self.total_max.subs,
                self.total_max.bytes >> 20
            ));
        }
        let held = after(tenants.get(tenant).copied().unwrap_or_default());
        let whose = match tenant {
            Tenant::Account(_) => "account",
            _ => "source address",
        };
        if held.subs > self.tenant_max.subs {
            return Some(format!(
                "subscription limit of {} per {whose} reached",
                self.tenant_max.subs
            ));
        }
        if held.bytes > self.tenant_max.bytes {
            return Some(format!(
                "subscription memory limit of {} KiB per {whose} reached (a filter of \
                 {levels} levels counts {} bytes)",
                self.tenant_max.bytes >> 10,
                c
            ));
        }
        // The reserve: past `common`, only a tenant holding at most its share after this
        // Sub gets in (per total this Sub adds to; a replacement by one no deeper adds
        // nothing).
        let into_reserve = |after: usize, before: usize, common: usize, total: usize| {
            after > before && common < total && after > common
        };
        let subs_in = into_reserve(t.subs, total.subs, self.common.subs, self.total_max.subs)
            && held.subs > self.share.subs;
        let bytes_in = into_reserve(
            t.bytes,
            total.bytes,
            self.common.bytes,
            self.total_max.bytes,
        ) && held.bytes > self.share.bytes;
        let (total_max, kept, share) = if subs_in {
            (
                format!("{} subscriptions", self.total_max.subs),
                format!("{}", self.total_max.subs - self.common.subs),
                format!("{} subscriptions", self.share.subs),
            )
        } else if bytes_in {
            (
                format!("{} MiB of filters", self.total_max.bytes >> 20),
                format!("{} KiB", (self.total_max.bytes - self.common.bytes) >> 10),
                format!("{} KiB of filters", self.share.bytes >> 10),
            )
        } else {
            return None;
        };
        Some(format!(
            "the relay's subscriptions are near its limit ({total_max}): the last {kept} are \
             kept for tenants holding at most {share}, and this {whose} holds more; try again \
             later"
        ))
    }

    /// `tenant` holds one more subscription, of `levels` levels.
    fn add_to(
        tenants: &mut HashMap<Tenant, Held>,
        total: &mut Held,
        tenant: &Tenant,
        levels: usize,
    ) {
        let h = tenants.entry(tenant.clone()).or_default();
        for h in [h, total] {
            h.subs += 1;
            h.bytes += cost(levels);
        }
    }

    /// Checks ([`SubQuota::refusal`]) and takes one more subscription for `tenant` in one
    /// step, so that concurrent `Sub`s cannot all pass the check before any is counted (a
    /// durable `Sub` may wait seconds on a JetStream store between the two, and every
    /// connection of the tenant could pass meanwhile). The reservation is given back when
    /// dropped, unless [`Reservation::keep`] says the subscription was made.
    pub(crate) fn reserve<'a>(
        &'a self,
        tenant: &Tenant,
        levels: usize,
        replacing: Option<usize>,
    ) -> Result<Reservation<'a>, String> {
        let mut st = self.state();
        if let Some(why) = self.refusal_in(&st, tenant, levels, replacing) {
            return Err(why);
        }
        let (tenants, total) = &mut *st;
        Self::add_to(tenants, total, tenant, levels);
        Ok(Reservation {
            quota: self,
            tenant: tenant.clone(),
            levels,
            kept: false,
        })
    }

    /// `tenant` holds fewer: one of `levels` levels each (an unsubscribe, a replaced
    /// subscription, a closed connection); a tenant holding none is forgotten.
    pub(crate) fn remove(&self, tenant: &Tenant, levels: impl IntoIterator<Item = usize>) {
        let (n, bytes) = levels
            .into_iter()
            .fold((0, 0), |(n, b), l| (n + 1, b + cost(l)));
        if n == 0 {
            return;
        }
        let (tenants, total) = &mut *self.state();
        total.subs = total.subs.saturating_sub(n);
        total.bytes = total.bytes.saturating_sub(bytes);
        if let Some(h) = tenants.get_mut(tenant) {
            h.subs = h.subs.saturating_sub(n);
            h.bytes = h.bytes.saturating_sub(bytes);
            if h.subs == 0 {
                tenants.remove(tenant);
            }
        }
    }

    /// Subscriptions `tenant` holds.
    #[cfg(test)]
    pub(crate) fn of(&self, tenant: &Tenant) -> usize {
        self.state().0.get(tenant).map_or(0, |h| h.subs)
    }
}

/// One subscription counted by [`SubQuota::reserve`]; given back on drop unless kept.
#[derive(Debug)]
#[must_use = "dropping a reservation gives it back"]
pub(crate) struct Reservation<'a> {
    quota: &'a SubQuota,
    tenant: Tenant,
    levels: usize,
    kept: bool,
}

impl Reservation<'_> {
    /// The subscription was made: it stays counted (until [`SubQuota::remove`]).
    pub(crate) fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.quota.remove(&self.tenant, [self.levels]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review finding: the check and the count were two steps, and a durable `Sub` could
    /// wait seconds between them (JetStream calls), so every concurrent `Sub` of a tenant
    /// passed the check. A reservation counts at once; one given up is given back.
    #[test]
    fn a_reservation_counts_at_once_and_is_given_back_unless_kept() {
        let q = SubQuota::new((1, 0), (0, 0), (0, 1));
        let a = Tenant::Address("10.0.0.1".parse().unwrap());
        let first = q.reserve(&a, 3, None).unwrap();
        assert!(
            q.reserve(&a, 3, None).is_err(),
            "a second Sub in flight is refused while the first is pending"
        );
        drop(first);
        assert_eq!(
            q.of(&a),
            0,
            "a Sub that made no subscription gives its place back"
        );
        q.reserve(&a, 3, None).unwrap().keep();
        assert_eq!(q.of(&a), 1);
        assert!(q.reserve(&a, 3, None).is_err());
        // Replacing its own subscription takes over its share.
        q.reserve(&a, 3, Some(3)).unwrap().keep();
        q.remove(&a, [3]);
        assert_eq!(q.of(&a), 1);
    }

    #[test]
    fn a_tenant_at_its_cap_is_refused_others_are_not_and_the_total_binds_everyone() {
        let q = SubQuota::new((2, 0), (5, 0), (0, 1));
        let (a, b, c) = (
            Tenant::Address("10.0.0.1".parse().unwrap()),
            Tenant::Account([7; 32]),
            Tenant::Address("10.0.0.2".parse().unwrap()),
        );
        q.reserve(&a, 3, None).unwrap().keep();
        q.reserve(&a, 3, None).unwrap().keep();
        assert!(q
            .refusal(&a, 3, None)
            .unwrap()
            .contains("per source address"));
        assert_eq!(q.refusal(&b, 3, None), None);
        q.reserve(&b, 1, None).unwrap().keep();
        q.reserve(&b, 1, None).unwrap().keep();
        assert!(q.refusal(&b, 1, None).unwrap().contains("per account"));
        q.remove(&a, [3]);
        assert_eq!(
            q.refusal(&a, 3, None),
            None,
            "room again after an unsubscribe"
        );
        q.reserve(&c, 2, None).unwrap().keep();
        q.reserve(&c, 2, None).unwrap().keep();
        assert!(
            q.refusal(&a, 3, None).unwrap().contains("relay holds"),
            "the total binds"
        );
        q.remove(&b, [1, 1]);
        assert_eq!(q.of(&b), 0);
        assert!(
            !q.state().0.contains_key(&b),
            "a tenant holding none is forgotten"
        );
        let unlimited = SubQuota::new((0, 0), (0, 0), (0, 1));
        unlimited.reserve(&a, 32, None).unwrap().keep();
        assert_eq!(unlimited.refusal(&a, 32, None), None);
    }

    /// Deep filters cost more: a memory cap admits many shallow subscriptions but few deep
    /// ones (the index holds a node per unshared level).
    #[test]
    fn the_memory_cap_counts_a_filter_by_its_depth() {
        let q = SubQuota::new((0, 10 * cost(32)), (0, 0), (0, 1));
        let t = Tenant::Local;
        let mut deep = 0;
        while q.refusal(&t, 32, None).is_none() {
            q.reserve(&t, 32, None).unwrap().keep();
            deep += 1;
        }
        assert_eq!(deep, 10);
        assert!(q.refusal(&t, 32, None).unwrap().contains("memory limit"));
        q.remove(&t, [32; 10]);
        let mut shallow = 0;
        while q.refusal(&t, 2, None).is_none() {
            q.reserve(&t, 2, None).unwrap().keep();
            shallow += 1;
        }
        assert!(shallow > 8 * deep, "{shallow} shallow vs {deep} deep");
        // Replacing a shallow filter with a deep one is judged by the difference: at the
        // cap, a deep replacement is refused, a same-depth one is not.
        assert!(q.refusal(&t, 32, Some(2)).unwrap().contains("memory limit"));
        assert_eq!(q.refusal(&t, 2, Some(2)), None);
    }

    /// Review finding (Low): a byte share of the reserve below one 1-level filter (a small
    /// total_subscription_bytes, or many subscription_reserve_tenants) let no tenant ever
    /// subscribe into the reserve: the total was silently its common part. A share is
    /// at least one such filter (as a count share is at least 1).
    #[test]
    fn a_byte_share_below_one_filter_still_admits_a_tenant_into_the_reserve() {
        let (a, b) = (
            Tenant::Address("10.0.0.1".parse().unwrap()),
            Tenant::Address("10.0.0.2".parse().unwrap()),
        );
        // 20 filters' worth in all, 10 % kept (2 filters) among 100 tenants: 21 bytes each.
        let q = SubQuota::new((0, 0), (0, 20 * cost(1)), (10, 100));
        let mut n = 0;
        while let Ok(r) = q.reserve(&a, 1, None) {
            r.keep();
            n += 1;
        }
        assert_eq!(n, 18, "a fills the common part");
        q.reserve(&b, 1, None)
            .expect("a tenant holding nothing subscribes into the reserve")
            .keep();
        assert!(q.reserve(&b, 1, None).is_err(), "its share: one filter");
    }

    /// Review finding: the totals were first-come to the end — with the total four times
    /// a tenant's cap, four tenants filled it and every other tenant's Sub was refused.
    /// The last part of each total is a reserve for tenants holding at most their share:
    /// the four fill only the rest, and a fifth still subscribes (up to its share), for
    /// the count and for the bytes alike.
    #[test]
    fn a_few_tenants_filling_the_totals_leave_the_reserve_to_the_others() {
        const Q: usize = 100;
        let tenants: Vec<Tenant> = (1..=6)
            .map(|i| Tenant::Address(format!("10.0.0.{i}").parse().unwrap()))
            .collect();
        // (count caps, byte caps) of each case: the total is 4 × the tenant's cap;
        // reserve 10 % among 10 tenants (a share of 4 subscriptions).
        for (tenant_max, total_max) in [
            ((Q, 0), (4 * Q, 0)),
            ((0, Q * cost(4)), (0, 4 * Q * cost(4))),
        ] {
            let q = SubQuota::new(tenant_max, total_max, (10, 10));
            let fill = |t: &Tenant| {
                let mut n = 0;
                while let Ok(r) = q.reserve(t, 4, None) {
                    r.keep();
                    n += 1;
                }
                n
            };
            // Four tenants take all they can: the first three their cap, the fourth what
            // is left before the reserve.
            let held: Vec<usize> = tenants[..4].iter().map(fill).collect();
            // A fifth tenant still subscribes, up to its share; so does a sixth.
            q.reserve(&tenants[4], 4, None)
                .expect("a tenant below its share gets in past the line")
                .keep();
            assert_eq!(held, [Q, Q, Q, 4 * Q * 9 / 10 - 3 * Q], "{tenant_max:?}");
            assert!(
                q.refusal(&tenants[3], 4, None)
                    .unwrap()
                    .contains("kept for tenants holding at most"),
                "the fourth is refused by the reserve"
            );
            assert_eq!(1 + fill(&tenants[4]), 4, "its share");
            assert_eq!(fill(&tenants[5]), 4);
            // A replacement no deeper adds nothing: a big tenant may still make it.
            assert_eq!(q.refusal(&tenants[0], 4, Some(4)), None);
            // What the big tenants give back below the line is first-come again.
            q.remove(&tenants[0], [4; Q]);
            assert_eq!(fill(&tenants[3]), Q - (4 * Q * 9 / 10 - 3 * Q));
        }
        // 0 % = no reserve: first-come to the end (four tenants fill the total).
        let q = SubQuota::new((Q, 0), (4 * Q, 0), (0, 10));
        for t in &tenants[..4] {
            for _ in 0..Q {
                q.reserve(t, 4, None).unwrap().keep();
            }
        }
        assert!(q
            .refusal(&tenants[4], 4, None)
            .unwrap()
            .contains("relay holds its limit"));
    }
}
