//! The tokio client, split by role. [`Client`] is a cheap, cloneable handle (like
//! async-nats) over one background task, the driver, which runs the sans-IO connection
//! engine (`core::connection`) over real sockets: the handle seals in the caller's task (so
//! many tasks seal in parallel) and hands envelopes to the driver; the engine owns the
//! protocol (subscriptions, outbox, acks, heartbeat, reconnects).
//!
//! - `shared` — what the others share: commands, subscription items, state, counters;
//! - `subscription` — [`Subscription`] streams;
//! - `handle` — [`Client`]: publish, subscribe, flush, close;
//! - `typed` — [`TypedTopic`] (one type per topic) and callback [`SubscriptionHandle`]s;
//! - `builder` — connecting a [`crate::ClientBuilder`] (its settings are `options`'s);
//! - `driver` — the task that moves bytes between the engine and the socket;
//! - `pool` — the worker threads that run the engine's open jobs off the driver.
//!
//! Imports go one way: builder → handle → subscription → shared, builder → driver → shared,
//! and from here down to `options`, `transport`, `plugin`, `core` and `error`, never back
//! (`tests/import_graph.rs` fails on a circle).

mod builder;
mod driver;
mod handle;
mod pool;
mod shared;
mod subscription;
mod typed;

pub use handle::{to_cbor, Client};
pub use shared::{now_ms, ClientStats, ConnectionState, Message, PublishOptions};
pub use subscription::{Subscription, Unacked};
pub use typed::{SubscriptionHandle, TypedTopic};
