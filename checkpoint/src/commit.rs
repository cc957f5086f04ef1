//! Committing and housekeeping: turning durable shard reports into a checkpoint (the
//! create-only manifest put, then moving `latest`), listing what a checkpoint URL holds, and
//! keeping only the newest K committed checkpoints.

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use tracing::Instrument;

use crate::error::{CheckpointError, Result};
use crate::manifest::{step_dir, Layout, Manifest, ShardReport, LATEST_FILE, MANIFEST_FILE};
use crate::reader::{check_sizes, list_steps, read_latest};
use crate::store::CkptStore;

/// Commits `step`: checks that the reports form a complete, consistent layout and that every
/// shard object exists with its reported size, writes `step-…/MANIFEST.json` with a
/// create-only put (a second commit of the step fails with
/// [`CheckpointError::AlreadyCommitted`]), then moves `latest` to the step unless it already
/// names a newer one. Call it once every shard of the step is durable (every `PendingShard`
/// has yielded its report); then, if wanted, [`retain`].
pub async fn commit(
    store: &CkptStore,
    step: u64,
    layout: Layout,
    reports: Vec<ShardReport>,
) -> Result<Manifest> {
    let span = tracing::info_span!("ckpt_commit", url = %store.url(), step);
    commit_inner(store, step, layout, reports)
        .instrument(span)
        .await
}

async fn commit_inner(
    store: &CkptStore,
    step: u64,
    layout: Layout,
    reports: Vec<ShardReport>,
) -> Result<Manifest> {
    let manifest =
        Manifest::from_reports(step, layout, reports).map_err(CheckpointError::Layout)?;
    let dir = store.path(&step_dir(step));
    check_sizes(store, &dir, &manifest).await?;

    let mpath = dir.clone().join(MANIFEST_FILE);
    let opts = PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    match store
        .object_store()
        .put_opts(&mpath, PutPayload::from(manifest.to_json()), opts)
        .await
    {
        Ok(_) => {}
        Err(object_store::Error::AlreadyExists { .. }) => {
            return Err(CheckpointError::AlreadyCommitted {
                object: store.display(&mpath),
                step,
            })
        }
        Err(e) => return Err(store.err(&mpath, e)),
    }
    tracing::info!(
        step,
        shards = manifest.shards.len(),
        bytes = manifest.total_bytes(),
        "checkpoint committed"
    );

    match read_latest(store).await {
        Some(newer) if newer > step => {
            tracing::warn!(step, latest = newer, "not moving `latest` back");
        }
        _ => {
            let lpath = store.path(LATEST_FILE);
            let body = serde_json::json!({"step": step, "dir": step_dir(step)}).to_string();
            store
                .object_store()
                .put(&lpath, PutPayload::from(body.into_bytes()))
                .await
                .map_err(|e| store.err(&lpath, e))?;
        }
    }
    Ok(manifest)
}

/// The state of one step directory.
#[derive(Debug, Clone, PartialEq)]
pub enum StepState {
    /// It has a valid manifest (shard objects are not checked here; `verify` does that).
    Committed {
        /// Shard files.
        shards: usize,
        /// Global tensors.
        tensors: usize,
        /// Bytes of all shards.
        bytes: u64,
        /// The layout saved with.
        layout: Layout,
    },
    /// No manifest: a save in progress, or one that never finished.
    Uncommitted,
    /// A manifest that cannot be read or is inconsistent.
    Broken {
        /// Why.
        reason: String,
    },
}

/// A step directory under a checkpoint URL.
#[derive(Debug, Clone, PartialEq)]
pub struct ListedStep {
    /// The step.
    pub step: u64,
    /// Committed, uncommitted or broken.
    pub state: StepState,
    /// Whether `latest` names it.
    pub latest: bool,
}

/// Every step directory under `store`, ascending.
pub async fn list(store: &CkptStore) -> Result<Vec<ListedStep>> {
    let latest = read_latest(store).await;
    let mut out = Vec::new();
    for step in list_steps(store).await? {
        let mpath = store.path(&format!("{}/{MANIFEST_FILE}", step_dir(step)));
        let state = match store.object_store().get(&mpath).await {
            Err(object_store::Error::NotFound { .. }) => StepState::Uncommitted,
            Err(e) => StepState::Broken {
                reason: store.err(&mpath, e).to_string(),
            },
            Ok(r) => match r.bytes().await {
                Err(e) => StepState::Broken {
                    reason: store.err(&mpath, e).to_string(),
                },
                Ok(bytes) => {
                    match Manifest::from_json(&bytes).and_then(|m| m.validate().map(|()| m)) {
                        Err(reason) => StepState::Broken { reason },
                        Ok(m) => StepState::Committed {
                            shards: m.shards.len(),
                            tensors: m.tensors.len(),
                            bytes: m.total_bytes(),
                            layout: m.layout.clone(),
                        },
                    }
                }
            },
        };
        out.push(ListedStep {
            step,
            state,
            latest: latest == Some(step),
        });
    }
    Ok(out)
}

/// The newest step under `store` that has a manifest (a committed checkpoint, or one
/// whose manifest is there but broken), or `None` when nothing was ever committed there.
/// Reads no manifest: one listing, then one existence check per step from the newest.
pub async fn newest_committed(store: &CkptStore) -> Result<Option<u64>> {
    for step in list_steps(store).await?.into_iter().rev() {
        let mpath = store.path(&format!("{}/{MANIFEST_FILE}", step_dir(step)));
        match store.object_store().head(&mpath).await {
            Ok(_) => return Ok(Some(step)),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(store.err(&mpath, e)),
        }
    }
    Ok(None)
}

/// Refuses a checkpoint location for a new run (one that does not resume) when it holds
/// committed checkpoints, with [`CheckpointError::UrlTaken`] naming the newest: the run
/// would otherwise train until its first commit and fail there (`step N is already
/// committed`), or interleave its steps with another run's.
pub async fn ensure_unused(store: &CkptStore) -> Result<()> {
    match newest_committed(store).await? {
        Some(step) => Err(CheckpointError::UrlTaken {
            url: store.url(),
            step,
        }),
        None => Ok(()),
    }
}

/// Keeps the newest `keep` committed checkpoints (0 keeps all) and deletes older ones, plus
/// step directories without a manifest that are older than the newest committed step
/// (abandoned saves). A checkpoint's manifest is deleted first, so an interrupted deletion
/// never leaves something that looks committed. Returns the steps deleted.
pub async fn retain(store: &CkptStore, keep: usize) -> Result<Vec<u64>> {
    if keep == 0 {
        return Ok(Vec::new());
    }
    let span = tracing::info_span!("ckpt_retain", url = %store.url(), keep);
    async move {
        let listed = list(store).await?;
        let committed: Vec<u64> = listed
            .iter()
            .filter(|l| !matches!(l.state, StepState::Uncommitted))
            .map(|l| l.step)
            .collect();
        let Some(&newest) = committed.last() else {
            return Ok(Vec::new());
        };
        let kept: Vec<u64> = committed.iter().rev().take(keep).copied().collect();
        let mut deleted = Vec::new();
        for l in &listed {
            let doomed = if matches!(l.state, StepState::Uncommitted) {
                l.step < newest
            } else {
                !kept.contains(&l.step)
            };
            if doomed {
                delete_step(store, l.step).await?;
                deleted.push(l.step);
            }
        }
        if !deleted.is_empty() {
            tracing::info!(?deleted, "old checkpoints deleted");
        }
        Ok(deleted)
    }
    .instrument(span)
    .await
}

async fn delete_step(store: &CkptStore, step: u64) -> Result<()> {
    let dir = store.path(&step_dir(step));
    let mpath = dir.clone().join(MANIFEST_FILE);
    match store.object_store().delete(&mpath).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => return Err(store.err(&mpath, e)),
    }
    let objects: Vec<Path> = store
        .object_store()
        .list(Some(&dir))
        .map_ok(|m| m.location)
        .try_collect()
        .await
        .map_err(|e| store.err(&dir, e))?;
    for p in objects {
        match store.object_store().delete(&p).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(store.err(&p, e)),
        }
    }
    if let Some(local) = store.local_path(&dir) {
        // Object stores have no directories; on disk the emptied one goes too.
        let _ = std::fs::remove_dir(local);
    }
    Ok(())
}
