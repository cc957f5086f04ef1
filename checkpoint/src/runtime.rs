//! The I/O runtime: object_store is async, the training loop is not. Background uploads run
//! on one lazily started, process-wide tokio runtime (two worker threads named
//! `weaver-ckpt-io`), and [`block_on`] lets synchronous code (the trainer's step thread, the
//! CLI) wait for any of the crate's async functions. Async callers (the coordinator) simply
//! `.await` them.

use std::future::Future;
use std::sync::OnceLock;

use tokio::runtime::Runtime;

use crate::error::{CheckpointError, Result};

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// The shared I/O runtime, started on first use.
pub(crate) fn io_runtime() -> Result<&'static Runtime> {
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("weaver-ckpt-io")
        .enable_all()
        .build()
        .map_err(|source| CheckpointError::Io {
            path: "tokio runtime".into(),
            source,
        })?;
    // A racing thread may have set it first; theirs is used and ours dropped.
    let _ = RUNTIME.set(rt);
    RUNTIME.get().ok_or(CheckpointError::BlockingInAsync)
}

/// Runs one of the crate's futures to completion from synchronous code.
///
/// Fails with [`CheckpointError::BlockingInAsync`] (instead of panicking) when called from a
/// thread that is running an async runtime: there, `.await` the future instead.
pub fn block_on<T>(fut: impl Future<Output = Result<T>>) -> Result<T> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(CheckpointError::BlockingInAsync);
    }
    io_runtime()?.block_on(fut)
}
