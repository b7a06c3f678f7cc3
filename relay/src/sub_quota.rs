//! Subscriptions per tenant and in all (`limits.tenant_max_subscriptions`,
//! `limits.max_total_subscriptions`).
//!
//! A subscription costs the relay about 2 KiB (its index entries, the session's record and
//! the pattern), and `max_subscriptions` only bounds one connection: 256 connections from
//! one address could hold 256,000 of them (~600 MiB), and addresses are cheap (an IPv6
//! /48 holds 65,536 /64s). So the tenant — the relay account, or the source address when
//! accounts are off — has a cap of its own, and the relay a total. Over either, a `Sub` is
//! answered with a non-fatal `Err(too_many_subscriptions)` naming it; the connection and
//! its other subscriptions carry on.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::store::Tenant;

/// Subscriptions held per tenant.
#[derive(Debug)]
pub(crate) struct SubQuota {
    tenant_max: usize,
    total_max: usize,
    held: Mutex<HashMap<Tenant, usize>>,
}

impl SubQuota {
    /// Caps per tenant and in all (0 = unlimited).
    pub(crate) fn new(tenant_max: usize, total_max: usize) -> Self {
        let unlimited = |n: usize| if n == 0 { usize::MAX } else { n };
        Self {
            tenant_max: unlimited(tenant_max),
            total_max: unlimited(total_max),
            held: Mutex::new(HashMap::new()),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<Tenant, usize>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Why one more subscription of `tenant` is refused, with `total` held relay-wide now;
    /// `None` when it may go ahead.
    pub(crate) fn refusal(&self, tenant: &Tenant, total: usize) -> Option<String> {
        if total >= self.total_max {
            return Some(format!(
                "the relay holds its limit of {} subscriptions; try again later",
                self.total_max
            ));
        }
        let held = self.held().get(tenant).copied().unwrap_or(0);
        (held >= self.tenant_max).then(|| {
            format!(
                "subscription limit of {} per {} reached",
                self.tenant_max,
                match tenant {
                    Tenant::Account(_) => "account",
                    _ => "source address",
                }
            )
        })
    }

    /// `tenant` holds one more subscription.
    pub(crate) fn add(&self, tenant: &Tenant) {
        *self.held().entry(tenant.clone()).or_insert(0) += 1;
    }

    /// `tenant` holds `n` fewer (an unsubscribe, a replaced subscription, a closed
    /// connection); a tenant holding none is forgotten.
    pub(crate) fn remove(&self, tenant: &Tenant, n: usize) {
        if n == 0 {
            return;
        }
        let mut held = self.held();
        if let Some(h) = held.get_mut(tenant) {
            *h = h.saturating_sub(n);
            if *h == 0 {
                held.remove(tenant);
            }
        }
    }

    /// Subscriptions `tenant` holds.
    #[cfg(test)]
    pub(crate) fn of(&self, tenant: &Tenant) -> usize {
        self.held().get(tenant).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_at_its_cap_is_refused_others_are_not_and_the_total_binds_everyone() {
        let q = SubQuota::new(2, 5);
        let (a, b) = (
            Tenant::Address("10.0.0.1".parse().unwrap()),
            Tenant::Account([7; 32]),
        );
        q.add(&a);
        q.add(&a);
        assert!(q.refusal(&a, 2).unwrap().contains("per source address"));
        assert_eq!(q.refusal(&b, 2), None);
        q.add(&b);
        q.add(&b);
        assert!(q.refusal(&b, 4).unwrap().contains("per account"));
        q.remove(&a, 1);
        assert_eq!(q.refusal(&a, 3), None, "room again after an unsubscribe");
        assert!(
            q.refusal(&a, 5).unwrap().contains("relay holds"),
            "the total binds"
        );
        q.remove(&b, 2);
        assert_eq!(q.of(&b), 0);
        assert!(
            q.held().get(&b).is_none(),
            "a tenant holding none is forgotten"
        );
        let unlimited = SubQuota::new(0, 0);
        assert_eq!(unlimited.refusal(&a, usize::MAX - 1), None);
    }
}
