//! The rendezvous key-value store kept by the coordinator: small values (NCCL unique ids,
//! tcp addresses, counters) that ranks set and wait for. Keys are namespaced by the callers
//! (the assignment's `kv_prefix`, one per generation); waiting is a `watch` channel per key,
//! so a `get` wakes exactly when its key is set and never polls.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;

use crate::error::{CoordinatorError, Result};

/// Longest key accepted.
pub const MAX_KEY_LEN: usize = 1024;
/// Largest value accepted (values are ids and addresses, not tensors).
pub const MAX_VALUE_LEN: usize = 1 << 20;

type Slot = watch::Sender<Option<Vec<u8>>>;

/// The store.
#[derive(Debug, Default)]
pub(crate) struct Kv {
    map: Mutex<HashMap<String, Slot>>,
}

fn check_key(key: &str) -> Result<()> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(CoordinatorError::InvalidRequest(format!(
            "rendezvous keys must have 1 to {MAX_KEY_LEN} bytes (got {})",
            key.len()
        )));
    }
    Ok(())
}

impl Kv {
    fn with_slot<T>(&self, key: &str, f: impl FnOnce(&Slot) -> T) -> T {
        // A poisoned lock only means another handler panicked mid-insert; the map is still
        // a valid map.
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let slot = map
            .entry(key.to_string())
            .or_insert_with(|| watch::channel(None).0);
        f(slot)
    }

    pub(crate) fn set(&self, key: &str, value: Vec<u8>) -> Result<()> {
        check_key(key)?;
        if value.len() > MAX_VALUE_LEN {
            return Err(CoordinatorError::InvalidRequest(format!(
                "rendezvous values are limited to {MAX_VALUE_LEN} bytes (key {key:?} has {})",
                value.len()
            )));
        }
        self.with_slot(key, |s| {
            s.send_replace(Some(value));
        });
        Ok(())
    }

    pub(crate) async fn get(&self, key: &str, wait: Duration) -> Result<Vec<u8>> {
        check_key(key)?;
        let mut rx = self.with_slot(key, |s| s.subscribe());
        let found = tokio::time::timeout(wait, rx.wait_for(|v| v.is_some())).await;
        match found {
            Ok(Ok(v)) => Ok(v.clone().unwrap_or_default()),
            // The sender lives in the map for the coordinator's lifetime.
            Ok(Err(_)) => Err(CoordinatorError::Unavailable(
                "the store is shutting down".into(),
            )),
            Err(_) => Err(CoordinatorError::Timeout {
                op: format!("rendezvous key {key:?}"),
                after: wait,
            }),
        }
    }

    pub(crate) fn add(&self, key: &str, delta: i64) -> Result<i64> {
        check_key(key)?;
        self.with_slot(key, |s| {
            let current = match &*s.borrow() {
                None => 0,
                Some(bytes) => std::str::from_utf8(bytes)
                    .ok()
                    .and_then(|t| t.trim().parse::<i64>().ok())
                    .ok_or_else(|| {
                        CoordinatorError::InvalidRequest(format!(
                            "rendezvous key {key:?} does not hold an integer"
                        ))
                    })?,
            };
            let next = current.checked_add(delta).ok_or_else(|| {
                CoordinatorError::InvalidRequest(format!("rendezvous counter {key:?} overflowed"))
            })?;
            s.send_replace(Some(next.to_string().into_bytes()));
            Ok(next)
        })
    }

    /// Drops the keys of generations before `generation` (prefix `g<N>/`).
    pub(crate) fn forget_before(&self, generation: u64) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|k, s| {
            let old = k
                .strip_prefix('g')
                .and_then(|r| r.split_once('/'))
                .and_then(|(n, _)| n.parse::<u64>().ok())
                .is_some_and(|g| g < generation);
            // Keep keys someone still waits on; they time out on their own.
            !old || s.receiver_count() > 0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn get_waits_for_set_and_times_out() {
        let kv = std::sync::Arc::new(Kv::default());
        let k2 = kv.clone();
        let waiter = tokio::spawn(async move { k2.get("g1/nccl", Duration::from_secs(10)).await });
        tokio::task::yield_now().await;
        kv.set("g1/nccl", b"id".to_vec()).unwrap();
        assert_eq!(waiter.await.unwrap().unwrap(), b"id");
        let e = kv
            .get("g1/missing", Duration::from_millis(20))
            .await
            .unwrap_err();
        assert!(matches!(e, CoordinatorError::Timeout { .. }), "{e}");
        assert_eq!(kv.add("g1/n", 2).unwrap(), 2);
        assert_eq!(kv.add("g1/n", 3).unwrap(), 5);
        assert!(kv.add("g1/nccl", 1).is_err());
        kv.forget_before(2);
        assert!(kv.get("g1/n", Duration::from_millis(1)).await.is_err());
    }
}
