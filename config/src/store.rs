//! The rendezvous key-value store that ranks use to find each other (tcp addresses, NCCL
//! unique ids). The coordinator's gRPC store implements it for real jobs; `comm` ships a
//! small TCP implementation for tests and standalone use.

use std::fmt::Debug;
use std::time::Duration;

/// Why a store call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// `key` did not appear within `after`.
    #[error("rendezvous key {key:?} did not appear within {after:?}")]
    Timeout {
        /// The key waited for.
        key: String,
        /// How long it waited.
        after: Duration,
    },
    /// The store's server cannot be reached or went away.
    #[error("rendezvous store unreachable: {0}")]
    Unreachable(String),
    /// The store refused the call (bad token, job finished, ...).
    #[error("rendezvous store refused the call: {0}")]
    Refused(String),
}

/// A key-value store shared by every rank of a job. Keys are written once per generation
/// (writers namespace them); `get` blocks until the key exists or the timeout passes.
pub trait Store: Send + Sync + Debug {
    /// Sets `key` to `value` (overwrites).
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Waits until `key` exists and returns its value.
    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, StoreError>;
    /// Adds `delta` to the integer at `key` (missing counts as 0) and returns the new value.
    fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError>;
}
