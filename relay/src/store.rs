//! The seam between "a publish arrived" and "it is accepted": sequence assignment today,
//! a durable store with retention, replay and acknowledgements later.
//!
//! The router calls [`Store::append`] under its routing lock, right before it fans the
//! message out, so sequence numbers are assigned in ONE place and every subscriber sees them
//! in increasing order. A durable implementation must therefore be quick here (batch or
//! group-commit behind it); a failure is reported to the publisher as `Err(StoreFailed)`
//! and the message is not delivered.

use std::fmt;

use thiserror::Error;
use whispeer_protocol::{Envelope, TokenPath};

use crate::ids::Seq;

/// Why a store refused a message.
#[derive(Debug, Clone, Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store cannot take messages right now.
    #[error("store unavailable: {0}")]
    Unavailable(String),
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
}

/// Accepts published messages and assigns their relay sequence numbers.
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Accepts one message; returns its sequence, strictly greater than every earlier one.
    fn append(&self, msg: Append<'_>) -> Result<Seq, StoreError>;
    /// The last sequence assigned (`Seq(0)` before the first message).
    fn last_seq(&self) -> Seq;
}

/// Live fan-out only: assigns sequence numbers and keeps nothing.
#[derive(Debug, Default)]
pub struct MemoryStore {
    last: std::sync::atomic::AtomicU64,
}

impl MemoryStore {
    /// A store starting at sequence 0.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Store for MemoryStore {
    fn append(&self, _msg: Append<'_>) -> Result<Seq, StoreError> {
        use std::sync::atomic::Ordering;
        Ok(Seq(self.last.fetch_add(1, Ordering::Relaxed) + 1))
    }

    fn last_seq(&self) -> Seq {
        Seq(self.last.load(std::sync::atomic::Ordering::Relaxed))
    }
}
