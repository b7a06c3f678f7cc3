//! Why the relay could not start or run.

use std::net::SocketAddr;

use thiserror::Error;

use crate::config::ConfigError;
use crate::tls::TlsError;

/// Startup and run failures of the relay as a whole (never caused by a client: client
/// mistakes become `Err` frames on that client's connection).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not bind.
    #[error("cannot listen for {listener} on {addr}: {source}")]
    Bind {
        listener: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// TLS material could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The store could not be opened (missing, foreign, damaged or in use).
    #[error("cannot open the store: {0}")]
    Store(crate::store::StoreError),
    /// The account list or the auth state file could not be loaded.
    #[error("cannot load relay accounts: {0}")]
    Accounts(crate::accounts::AccountError),
    /// The NATS connection of a cluster could not be set up.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    /// The light runtime's threads could not start (`runtime.light_workers`).
    #[error("cannot start the light runtime (runtime.light_workers): {0}")]
    Runtime(std::io::Error),
}
