//! Loading: open a committed checkpoint (a given step, or the newest complete one) and read
//! arbitrary slices of its global tensors, assembled from whichever pieces overlap them.
//!
//! A read fetches, with ranged gets, only the checksum blocks that hold the requested
//! elements (see [`crate::manifest::Piece::block_crc32c`]), checks every fetched block's
//! CRC-32C, then copies the needed runs into the output. So every byte a load uses is
//! verified, and a rank reads little more than its slice: at most one partial block at each
//! end of each contiguous run (plus `coalesce_gap` slack when nearby blocks are merged into
//! one request). [`Checkpoint::verify`] reads everything.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::ObjectStoreExt;
use tch::{Device, Tensor};
use tracing::Instrument;

use crate::error::{CheckpointError, Result};
use crate::format::{header_len, parse_header};
use crate::manifest::{parse_step_dir, step_dir, Manifest, TensorInfo, LATEST_FILE, MANIFEST_FILE};
use crate::slice::{copy_runs, Slice};
use crate::store::{CkptStore, StoreUrl};

/// Which checkpoint to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selector {
    /// The newest complete checkpoint: the newest step whose manifest is valid and whose
    /// shard objects all exist with the recorded sizes. Incomplete or broken newer steps are
    /// passed over (each logged with the reason).
    Latest,
    /// Exactly this step (an error if it is not complete).
    Step(u64),
    /// The newest complete checkpoint older than this step: where to fall back when loading
    /// a checkpoint found corrupt data (see the crate docs for the resume loop).
    Before(u64),
}

/// Tuning of ranged reads.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// Merge two needed byte ranges of a file into one request when at most this many
    /// unneeded bytes lie between them.
    pub coalesce_gap: u64,
    /// Largest single request (blocks are never split, so a larger block is one request).
    pub max_fetch_bytes: u64,
    /// Requests in flight at once.
    pub concurrency: usize,
}

impl ReadOptions {
    /// For local files: exact ranges (a gap costs a read; a request costs little).
    pub fn local() -> ReadOptions {
        ReadOptions {
            coalesce_gap: 0,
            max_fetch_bytes: 16 << 20,
            concurrency: 4,
        }
    }

    /// For object stores: requests cost latency, so nearby ranges (within 1 MiB) merge;
    /// at most 16 × 16 MiB in flight.
    pub fn remote() -> ReadOptions {
        ReadOptions {
            coalesce_gap: 1 << 20,
            max_fetch_bytes: 16 << 20,
            concurrency: 16,
        }
    }

    /// The default for a store.
    pub fn for_store(store: &CkptStore) -> ReadOptions {
        if store.is_local() {
            ReadOptions::local()
        } else {
            ReadOptions::remote()
        }
    }
}

/// A slice of one global tensor to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceRequest {
    /// Global tensor name.
    pub name: String,
    /// Per-dimension ranges in global coordinates.
    pub ranges: Vec<Range<u64>>,
}

impl SliceRequest {
    /// The slice `ranges` of tensor `name`.
    pub fn new(name: impl Into<String>, ranges: Vec<Range<u64>>) -> SliceRequest {
        SliceRequest {
            name: name.into(),
            ranges,
        }
    }
}

/// A committed checkpoint, opened for reading.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    store: CkptStore,
    dir: Path,
    manifest: Manifest,
    options: ReadOptions,
    bytes_read: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
}

/// What [`Checkpoint::verify`] found.
#[derive(Debug)]
pub struct VerifyReport {
    /// The step verified.
    pub step: u64,
    /// Shard objects checked.
    pub objects: usize,
    /// Tensors checked.
    pub tensors: usize,
    /// Data bytes read and checksummed.
    pub bytes: u64,
    /// Everything wrong, each naming its object and tensor; empty when all is well.
    pub problems: Vec<CheckpointError>,
}

impl VerifyReport {
    /// Whether nothing is wrong.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// One copy from fetched bytes into an output buffer (all in bytes).
#[derive(Debug, Clone, Copy)]
struct CopyOp {
    out: usize,
    /// Absolute offset in the file.
    src: u64,
    /// Offset in the output.
    dst: u64,
    len: u64,
}

/// One checksum block to fetch and check.
#[derive(Debug)]
struct Block {
    start: u64,
    end: u64,
    crc: u32,
    tensor: String,
    copies: Vec<CopyOp>,
}

/// One ranged get: consecutive blocks of one file.
#[derive(Debug)]
struct Fetch {
    /// Index of the shard file in the manifest.
    file: usize,
    start: u64,
    end: u64,
    blocks: Vec<Block>,
}

impl Checkpoint {
    /// Opens the checkpoint `selector` picks under `store`.
    pub async fn open(store: &CkptStore, selector: Selector) -> Result<Checkpoint> {
        let span = tracing::info_span!("ckpt_open", url = %store.url(), ?selector);
        Checkpoint::open_inner(store, selector)
            .instrument(span)
            .await
    }

    async fn open_inner(store: &CkptStore, selector: Selector) -> Result<Checkpoint> {
        match selector {
            Selector::Step(step) => Checkpoint::open_step(store, step).await,
            Selector::Latest | Selector::Before(_) => {
                let limit = match selector {
                    Selector::Before(s) => s,
                    _ => u64::MAX,
                };
                let pointer = read_latest(store).await;
                let mut steps = list_steps(store).await?;
                steps.retain(|&s| s < limit);
                let mut skipped = Vec::new();
                for step in steps.into_iter().rev() {
                    match Checkpoint::open_step(store, step).await {
                        Ok(c) => {
                            if selector == Selector::Latest && pointer != Some(step) {
                                tracing::info!(
                                    step,
                                    latest = ?pointer,
                                    "opening the newest complete checkpoint, which `latest` does not name"
                                );
                            }
                            return Ok(c);
                        }
                        Err(e) => {
                            tracing::warn!(step, error = %e, "passing over checkpoint");
                            skipped.push(format!("{}: {e}", step_dir(step)));
                        }
                    }
                }
                Err(CheckpointError::NoCheckpoint {
                    url: match selector {
                        Selector::Before(s) => format!("{} before step {s}", store.url()),
                        _ => store.url(),
                    },
                    skipped,
                })
            }
        }
    }

    /// Opens a checkpoint named by a URL: a checkpoint root (the newest complete step) or a
    /// step directory (`…/step-00000100`, exactly that step).
    pub async fn open_url(url: &str) -> Result<Checkpoint> {
        let (store, selector) = resolve(url)?;
        Checkpoint::open(&store, selector).await
    }

    async fn open_step(store: &CkptStore, step: u64) -> Result<Checkpoint> {
        let dir = store.path(&step_dir(step));
        let mpath = dir.clone().join(MANIFEST_FILE);
        let object = store.display(&mpath);
        let bytes = match store.object_store().get(&mpath).await {
            Ok(r) => r.bytes().await.map_err(|e| store.err(&mpath, e))?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(CheckpointError::NoManifest {
                    url: store.display(&dir),
                    reason: format!("{MANIFEST_FILE} is missing (never committed, or lost)"),
                })
            }
            Err(e) => return Err(store.err(&mpath, e)),
        };
        let manifest =
            Manifest::from_json(&bytes).map_err(|message| CheckpointError::BadManifest {
                object: object.clone(),
                message,
            })?;
        manifest
            .validate()
            .map_err(|message| CheckpointError::BadManifest {
                object: object.clone(),
                message,
            })?;
        if manifest.step != step {
            return Err(CheckpointError::BadManifest {
                object,
                message: format!(
                    "records step {}, found in {}",
                    manifest.step,
                    step_dir(step)
                ),
            });
        }
        // Every shard must exist with the recorded size: catches lost and truncated objects
        // before any tensor is read.
        check_sizes(store, &dir, &manifest).await?;
        let options = ReadOptions::for_store(store);
        Ok(Checkpoint {
            store: store.clone(),
            dir,
            manifest,
            options,
            bytes_read: Arc::new(AtomicU64::new(0)),
            requests: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The step.
    pub fn step(&self) -> u64 {
        self.manifest.step
    }

    /// The step directory, for messages.
    pub fn url(&self) -> String {
        self.store.display(&self.dir)
    }

    /// The store it was opened from.
    pub fn store(&self) -> &CkptStore {
        &self.store
    }

    /// Replaces the read options.
    pub fn set_options(&mut self, options: ReadOptions) {
        self.options = options;
    }

    /// Bytes fetched from the store so far, by this handle and its clones: for progress.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// Ranged requests made so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The global tensor `name`.
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.manifest
            .tensors
            .get(name)
            .ok_or_else(|| CheckpointError::UnknownTensor {
                object: self.store.display(&self.dir.clone().join(MANIFEST_FILE)),
                tensor: name.to_string(),
            })
    }

    /// Reads the slice `ranges` (one per dimension, global coordinates) of tensor `name`.
    pub async fn read_slice(&self, name: &str, ranges: &[Range<u64>]) -> Result<Tensor> {
        let mut v = self
            .read_slices(&[SliceRequest::new(name, ranges.to_vec())])
            .await?;
        v.pop().ok_or_else(|| CheckpointError::UnknownTensor {
            object: self.url(),
            tensor: name.to_string(),
        })
    }

    /// Reads the whole of tensor `name`.
    pub async fn read_tensor(&self, name: &str) -> Result<Tensor> {
        let shape = self.tensor(name)?.shape.clone();
        self.read_slice(name, &Slice::full(&shape).ranges()).await
    }

    /// Reads several slices at once, sharing and overlapping the requests: what a rank does
    /// to load its state.
    pub async fn read_slices(&self, requests: &[SliceRequest]) -> Result<Vec<Tensor>> {
        let mut outs = Vec::with_capacity(requests.len());
        for r in requests {
            let info = self.tensor(&r.name)?;
            let shape: Vec<i64> = r
                .ranges
                .iter()
                .map(|x| x.end.saturating_sub(x.start) as i64)
                .collect();
            let t = Tensor::f_empty(shape.as_slice(), (info.dtype.kind(), Device::Cpu)).map_err(
                |source| CheckpointError::Torch {
                    tensor: r.name.clone(),
                    source,
                },
            )?;
            let n = (Slice::from_ranges(&r.ranges).numel() * info.dtype.size()) as usize;
            outs.push(Out::Tensor(t, n));
        }
        let outs = self.read_owned(requests, outs).await?;
        Ok(outs
            .into_iter()
            .filter_map(|o| match o {
                Out::Tensor(t, _) => Some(t),
                Out::Bytes(_) => None,
            })
            .collect())
    }

    /// Reads tensor `name` (saved with `SavedTensor::from_bytes`) as bytes.
    pub async fn read_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let info = self.tensor(name)?;
        let full = Slice::full(&info.shape);
        let out = Out::Bytes(vec![0u8; info.nbytes() as usize]);
        let mut outs = self
            .read_owned(&[SliceRequest::new(name, full.ranges())], vec![out])
            .await?;
        match outs.pop() {
            Some(Out::Bytes(b)) => Ok(b),
            _ => Err(CheckpointError::UnknownTensor {
                object: self.url(),
                tensor: name.to_string(),
            }),
        }
    }

    /// Reads an `I64` tensor (saved with `SavedTensor::from_i64s`) as integers.
    pub async fn read_i64s(&self, name: &str) -> Result<Vec<i64>> {
        let info = self.tensor(name)?;
        if info.dtype != crate::dtype::Dtype::I64 {
            return Err(CheckpointError::BadSlice {
                tensor: name.to_string(),
                message: format!("is {}, not I64", info.dtype),
            });
        }
        let bytes = self.read_bytes(name).await?;
        Ok(bytes
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                i64::from_le_bytes(a)
            })
            .collect())
    }

    /// Reads the requests into the given buffers (row-major bytes of each requested slice)
    /// and hands them back. The buffers are owned so that the local-file path can fill them
    /// from blocking threads that outlive a cancelled future.
    pub(crate) async fn read_owned(
        &self,
        requests: &[SliceRequest],
        outs: Vec<Out>,
    ) -> Result<Vec<Out>> {
        let span = tracing::info_span!("ckpt_read", url = %self.url(), tensors = requests.len());
        self.read_owned_inner(requests, outs).instrument(span).await
    }

    async fn read_owned_inner(
        &self,
        requests: &[SliceRequest],
        mut outs: Vec<Out>,
    ) -> Result<Vec<Out>> {
        let files = self.file_index();
        let mut blocks: BTreeMap<(usize, u64), Block> = BTreeMap::new();
        for (o, r) in requests.iter().enumerate() {
            let info = self.tensor(&r.name)?;
            let want = Slice::from_ranges(&r.ranges);
            if r.ranges.iter().any(|x| x.end < x.start) || !want.fits(&info.shape) {
                return Err(CheckpointError::BadSlice {
                    tensor: r.name.clone(),
                    message: format!("{:?} does not fit shape {:?}", r.ranges, info.shape),
                });
            }
            let esz = info.dtype.size();
            if outs.get_mut(o).map(|b| b.bytes().len() as u64) != Some(want.numel() * esz) {
                return Err(CheckpointError::BadSlice {
                    tensor: r.name.clone(),
                    message: "output buffer has the wrong size".into(),
                });
            }
            for p in &info.pieces {
                let Some(region) = p.slice.intersect(&want) else {
                    continue;
                };
                let Some(&file) = files.get(p.file.as_str()) else {
                    continue; // validated at open: every piece's file is a shard
                };
                for run in copy_runs(&p.slice, &want, &region) {
                    let (mut s, e, mut d) =
                        (run.src * esz, (run.src + run.len) * esz, run.dst * esz);
                    while s < e {
                        let b = s / p.crc_block;
                        let (bs, be) = p.block_range(b);
                        let crc = p.block_crc32c.get(b as usize).copied().unwrap_or_default();
                        let seg = e.min(be) - s;
                        let block =
                            blocks
                                .entry((file, p.bytes[0] + bs))
                                .or_insert_with(|| Block {
                                    start: p.bytes[0] + bs,
                                    end: p.bytes[0] + be,
                                    crc,
                                    tensor: r.name.clone(),
                                    copies: Vec::new(),
                                });
                        block.copies.push(CopyOp {
                            out: o,
                            src: p.bytes[0] + s,
                            dst: d,
                            len: seg,
                        });
                        s += seg;
                        d += seg;
                    }
                }
            }
        }
        let fetches = self.plan(blocks);
        let (outs, problems) = self.run(fetches, outs, false).await?;
        match problems.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(outs),
        }
    }

    /// Shard file name → index in the manifest.
    fn file_index(&self) -> HashMap<&str, usize> {
        self.manifest
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| (s.file.as_str(), i))
            .collect()
    }

    /// Groups blocks (sorted by file and offset) into ranged gets.
    fn plan(&self, blocks: BTreeMap<(usize, u64), Block>) -> Vec<Fetch> {
        let mut fetches: Vec<Fetch> = Vec::new();
        for ((file, _), block) in blocks {
            if let Some(f) = fetches.last_mut() {
                if f.file == file
                    && block.start <= f.end.saturating_add(self.options.coalesce_gap)
                    && block.end.saturating_sub(f.start) <= self.options.max_fetch_bytes
                {
                    f.end = f.end.max(block.end);
                    f.blocks.push(block);
                    continue;
                }
            }
            fetches.push(Fetch {
                file,
                start: block.start,
                end: block.end,
                blocks: vec![block],
            });
        }
        fetches
    }

    /// Runs the fetches: local files directly (blocking threads reading straight into the
    /// outputs where a fetch maps onto one contiguous output range), everything else through
    /// the object store. Returns the buffers and the problems found (only the first unless
    /// `keep_going`).
    async fn run(
        &self,
        fetches: Vec<Fetch>,
        mut outs: Vec<Out>,
        keep_going: bool,
    ) -> Result<(Vec<Out>, Vec<CheckpointError>)> {
        if let Some(dir) = self.store.direct_path(&self.dir) {
            let job = LocalRead {
                dir,
                store: self.store.clone(),
                files: self
                    .manifest
                    .shards
                    .iter()
                    .map(|s| (s.file.clone(), s.size))
                    .collect(),
                dir_path: self.dir.clone(),
                threads: self.options.concurrency.max(1),
                keep_going,
                bytes_read: self.bytes_read.clone(),
                requests: self.requests.clone(),
            };
            return tokio::task::spawn_blocking(move || job.run(fetches, outs))
                .await
                .map_err(|e| CheckpointError::Background {
                    object: self.url(),
                    message: e.to_string(),
                });
        }
        let problems = {
            let mut bufs: Vec<&mut [u8]> = outs.iter_mut().map(Out::bytes).collect();
            self.execute(fetches, &mut bufs, keep_going).await
        };
        Ok((outs, problems))
    }

    /// Runs the gets through the object store, checks every block and copies into `outs`.
    async fn execute(
        &self,
        fetches: Vec<Fetch>,
        outs: &mut [&mut [u8]],
        keep_going: bool,
    ) -> Vec<CheckpointError> {
        let mut problems = Vec::new();
        let store = self.store.clone();
        let dir = self.dir.clone();
        let bytes_read = self.bytes_read.clone();
        let requests = self.requests.clone();
        let names: Vec<String> = self
            .manifest
            .shards
            .iter()
            .map(|s| s.file.clone())
            .collect();
        let mut results = futures::stream::iter(fetches.into_iter().map(|f| {
            let store = store.clone();
            let path = dir.clone().join(names[f.file].as_str());
            let bytes_read = bytes_read.clone();
            let requests = requests.clone();
            async move {
                requests.fetch_add(1, Ordering::Relaxed);
                let r = store.object_store().get_range(&path, f.start..f.end).await;
                if let Ok(b) = &r {
                    bytes_read.fetch_add(b.len() as u64, Ordering::Relaxed);
                }
                (f, path, r)
            }
        }))
        .buffer_unordered(self.options.concurrency.max(1));
        while let Some((f, path, r)) = results.next().await {
            let outcome = match r {
                Ok(data) => check_and_copy(&self.store, &path, &f, &data, outs),
                Err(e) => Err(self.read_error(&path, e).await),
            };
            if let Err(e) = outcome {
                problems.push(e);
                if !keep_going {
                    break;
                }
            }
        }
        problems
    }

    /// A failed get: a truncated object is reported as such, whatever the store said.
    async fn read_error(&self, path: &Path, e: object_store::Error) -> CheckpointError {
        let expected = self
            .manifest
            .shards
            .iter()
            .find(|s| path.filename() == Some(s.file.as_str()))
            .map(|s| s.size);
        if let (Some(expected), Ok(meta)) = (expected, self.store.object_store().head(path).await) {
            if meta.size != expected {
                return CheckpointError::Truncated {
                    object: self.store.display(path),
                    expected,
                    actual: meta.size,
                };
            }
        }
        self.store.err(path, e)
    }

    /// Reads every byte of every shard: each safetensors header must parse and agree with
    /// the manifest, and every checksum block must match (which, with the manifest's own
    /// consistency check, also proves each whole-piece CRC). Reads `concurrency ×
    /// max_fetch_bytes` at a time.
    pub async fn verify(&self) -> VerifyReport {
        let span = tracing::info_span!("ckpt_verify", url = %self.url());
        self.verify_inner().instrument(span).await
    }

    async fn verify_inner(&self) -> VerifyReport {
        let mut problems = Vec::new();
        for shard in &self.manifest.shards {
            if let Err(e) = self.verify_header(&shard.file).await {
                problems.push(e);
            }
        }
        let files = self.file_index();
        let mut blocks = BTreeMap::new();
        let mut bytes = 0;
        for (name, t) in &self.manifest.tensors {
            for p in &t.pieces {
                let Some(&file) = files.get(p.file.as_str()) else {
                    continue;
                };
                bytes += p.nbytes();
                for (b, &crc) in p.block_crc32c.iter().enumerate() {
                    let (s, e) = p.block_range(b as u64);
                    blocks.insert(
                        (file, p.bytes[0] + s),
                        Block {
                            start: p.bytes[0] + s,
                            end: p.bytes[0] + e,
                            crc,
                            tensor: name.clone(),
                            copies: Vec::new(),
                        },
                    );
                }
            }
        }
        let fetches = self.plan(blocks);
        match self.run(fetches, Vec::new(), true).await {
            Ok((_, found)) => problems.extend(found),
            Err(e) => problems.push(e),
        }
        VerifyReport {
            step: self.step(),
            objects: self.manifest.shards.len(),
            tensors: self.manifest.tensors.len(),
            bytes,
            problems,
        }
    }

    async fn verify_header(&self, file: &str) -> Result<()> {
        let path = self.dir.clone().join(file);
        let object = self.store.display(&path);
        let bad = |message: String| CheckpointError::BadShard {
            object: object.clone(),
            message,
        };
        let shard = self
            .manifest
            .shards
            .iter()
            .find(|s| s.file == file)
            .ok_or_else(|| bad("not in the manifest".into()))?;
        if shard.header_bytes < 8 {
            return Err(bad("manifest records no header".into()));
        }
        let head = self
            .store
            .object_store()
            .get_range(&path, 0..shard.header_bytes)
            .await
            .map_err(|e| self.store.err(&path, e))?;
        let n = header_len(&head).map_err(bad)?;
        if 8 + n != shard.header_bytes {
            return Err(bad(format!(
                "header is {} bytes, the manifest says {}",
                8 + n,
                shard.header_bytes
            )));
        }
        let header = parse_header(&head[8..]).map_err(bad)?;
        if header.metadata != shard.metadata {
            return Err(bad("__metadata__ differs from the manifest".into()));
        }
        let mut expected: Vec<(&str, [u64; 2], &[u64])> = Vec::new();
        for (name, t) in &self.manifest.tensors {
            for p in t.pieces.iter().filter(|p| p.file == file) {
                expected.push((name.as_str(), p.bytes, &p.slice.len));
                // The piece's header entry: its name's, or `name#k` (a shard's later
                // pieces of one tensor), at the piece's bytes.
                let keyed = |h: &&crate::format::HeaderTensor| {
                    h.name == *name
                        || h.name
                            .strip_prefix(name.as_str())
                            .and_then(|k| k.strip_prefix(crate::writer::PIECE_KEY_SEP))
                            .is_some_and(|k| k.parse::<u64>().is_ok())
                };
                let at = |h: &&crate::format::HeaderTensor| {
                    [header.data_start + h.data.0, header.data_start + h.data.1] == p.bytes
                };
                let found = header
                    .tensors
                    .iter()
                    .filter(keyed)
                    .find(at)
                    .or_else(|| header.tensors.iter().find(|h| h.name == *name));
                let Some(h) = found else {
                    return Err(bad(format!("header lacks tensor {name}")));
                };
                let abs = [header.data_start + h.data.0, header.data_start + h.data.1];
                if h.dtype != t.dtype || h.shape != p.slice.len || abs != p.bytes {
                    return Err(bad(format!(
                        "header entry of {name} ({} {:?} at {:?}) differs from the manifest ({} {:?} at {:?})",
                        h.dtype, h.shape, abs, t.dtype, p.slice.len, p.bytes
                    )));
                }
            }
        }
        if expected.len() != header.tensors.len() {
            return Err(bad(format!(
                "header holds {} tensors, the manifest {}",
                header.tensors.len(),
                expected.len()
            )));
        }
        Ok(())
    }
}

/// Checks the CRC-32C of every block of a fetch against `data` (the fetched bytes).
fn check_blocks(store: &CkptStore, path: &Path, f: &Fetch, data: &[u8]) -> Result<()> {
    if data.len() as u64 != f.end - f.start {
        return Err(CheckpointError::Truncated {
            object: store.display(path),
            expected: f.end,
            actual: f.start + data.len() as u64,
        });
    }
    for b in &f.blocks {
        let bytes = &data[(b.start - f.start) as usize..(b.end - f.start) as usize];
        let got = crc32c::crc32c(bytes);
        if got != b.crc {
            return Err(CheckpointError::Corrupt {
                object: store.display(path),
                tensor: b.tensor.clone(),
                detail: format!(
                    "bytes {}..{} have CRC-32C {got:08x}, the manifest says {:08x}",
                    b.start, b.end, b.crc
                ),
            });
        }
    }
    Ok(())
}

/// Checks the blocks of one fetch and performs its copies.
fn check_and_copy(
    store: &CkptStore,
    path: &Path,
    f: &Fetch,
    data: &Bytes,
    outs: &mut [&mut [u8]],
) -> Result<()> {
    check_blocks(store, path, f, data)?;
    for b in &f.blocks {
        for c in &b.copies {
            let src = (c.src - f.start) as usize;
            let (dst, len) = (c.dst as usize, c.len as usize);
            if let Some(out) = outs.get_mut(c.out) {
                out[dst..dst + len].copy_from_slice(&data[src..src + len]);
            }
        }
    }
    Ok(())
}

/// An output buffer of a read: a tensor being filled (with its byte length) or bytes.
#[derive(Debug)]
pub(crate) enum Out {
    Tensor(Tensor, usize),
    Bytes(Vec<u8>),
}

impl Out {
    fn bytes(&mut self) -> &mut [u8] {
        match self {
            Out::Tensor(t, n) => tensor_bytes_mut(t, *n),
            Out::Bytes(v) => v.as_mut_slice(),
        }
    }
}

/// The output range a fetch fills when its bytes land, in order and without gaps, in one
/// output: then the fetch is read straight into it.
fn direct_target(f: &Fetch) -> Option<(usize, u64)> {
    let mut copies = f.blocks.iter().flat_map(|b| b.copies.iter());
    let first = copies.next()?;
    if first.src != f.start {
        return None;
    }
    let (mut src, mut dst) = (first.src + first.len, first.dst + first.len);
    for c in copies {
        if c.out != first.out || c.src != src || c.dst != dst {
            return None;
        }
        src += c.len;
        dst += c.len;
    }
    (src == f.end).then_some((first.out, first.dst))
}

/// Reads of local files on blocking threads: `pread` straight into the output where a
/// fetch maps onto one contiguous output range (whole tensors, row slices), else into a
/// per-thread scratch buffer, then checksums and copies. One copy instead of the object
/// store's three (zeroed buffer, read, copy out).
struct LocalRead {
    dir: std::path::PathBuf,
    store: CkptStore,
    /// Shard file names and recorded sizes, by manifest index.
    files: Vec<(String, u64)>,
    dir_path: Path,
    threads: usize,
    keep_going: bool,
    bytes_read: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
}

impl LocalRead {
    fn run(self, fetches: Vec<Fetch>, mut outs: Vec<Out>) -> (Vec<Out>, Vec<CheckpointError>) {
        use std::sync::atomic::{AtomicBool, AtomicUsize};
        use std::sync::Mutex;

        let mut problems = Vec::new();
        // Addresses, not slices: the threads below write disjoint ranges of these buffers
        // (every output byte belongs to exactly one copy of one block), and `outs` is not
        // touched again until they have all been joined.
        let targets: Vec<(usize, usize)> = outs
            .iter_mut()
            .map(|o| {
                let b = o.bytes();
                (b.as_mut_ptr() as usize, b.len())
            })
            .collect();
        let mut handles: HashMap<usize, std::fs::File> = HashMap::new();
        let mut broken = std::collections::HashSet::new();
        for f in &fetches {
            if handles.contains_key(&f.file) || broken.contains(&f.file) {
                continue;
            }
            let name = self.files.get(f.file).map_or("", |x| x.0.as_str());
            match std::fs::File::open(self.dir.join(name)) {
                Ok(h) => {
                    handles.insert(f.file, h);
                }
                Err(e) => {
                    broken.insert(f.file);
                    let path = self.dir_path.clone().join(name);
                    problems.push(if e.kind() == std::io::ErrorKind::NotFound {
                        CheckpointError::MissingObject {
                            object: self.store.display(&path),
                        }
                    } else {
                        CheckpointError::Io {
                            path: self.store.display(&path),
                            source: e,
                        }
                    });
                }
            }
        }
        if !problems.is_empty() && !self.keep_going {
            return (outs, problems);
        }
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let found = Mutex::new(problems);
        std::thread::scope(|sc| {
            for _ in 0..self.threads.min(fetches.len()) {
                sc.spawn(|| {
                    let mut scratch = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= fetches.len() || stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let f = &fetches[i];
                        let Some(h) = handles.get(&f.file) else {
                            continue;
                        };
                        if let Err(e) = self.one(f, h, &targets, &mut scratch) {
                            if let Ok(mut found) = found.lock() {
                                found.push(e);
                            }
                            if !self.keep_going {
                                stop.store(true, Ordering::Relaxed);
                            }
                        }
                    }
                });
            }
        });
        let problems = found.into_inner().unwrap_or_default();
        (outs, problems)
    }

    fn one(
        &self,
        f: &Fetch,
        h: &std::fs::File,
        targets: &[(usize, usize)],
        scratch: &mut Vec<u8>,
    ) -> Result<()> {
        use std::os::unix::fs::FileExt;

        let (name, size) = self.files.get(f.file).cloned().unwrap_or_default();
        let path = self.dir_path.clone().join(name.as_str());
        let len = (f.end - f.start) as usize;
        self.requests.fetch_add(1, Ordering::Relaxed);
        let direct = direct_target(f).and_then(|(o, dst)| {
            let (addr, olen) = *targets.get(o)?;
            (dst as usize + len <= olen).then_some(addr + dst as usize)
        });
        let buf: &mut [u8] = match direct {
            // SAFETY: a range of an output buffer that this fetch alone writes (see `run`).
            Some(addr) => unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) },
            None => {
                if scratch.len() < len {
                    scratch.resize(len, 0);
                }
                &mut scratch[..len]
            }
        };
        if let Err(e) = h.read_exact_at(buf, f.start) {
            let actual = h.metadata().map(|m| m.len()).unwrap_or(0);
            return Err(
                if e.kind() == std::io::ErrorKind::UnexpectedEof || actual != size {
                    CheckpointError::Truncated {
                        object: self.store.display(&path),
                        expected: size,
                        actual,
                    }
                } else {
                    CheckpointError::Io {
                        path: self.store.display(&path),
                        source: e,
                    }
                },
            );
        }
        self.bytes_read.fetch_add(len as u64, Ordering::Relaxed);
        check_blocks(&self.store, &path, f, buf)?;
        if direct.is_none() {
            for b in &f.blocks {
                for c in &b.copies {
                    let Some(&(addr, olen)) = targets.get(c.out) else {
                        continue;
                    };
                    let (src, dst, n) =
                        ((c.src - f.start) as usize, c.dst as usize, c.len as usize);
                    if dst + n <= olen && src + n <= buf.len() {
                        // SAFETY: `dst..dst + n` is inside the output and written by this
                        // copy alone (see `run`); `buf` is this thread's own memory.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                buf[src..].as_ptr(),
                                (addr + dst) as *mut u8,
                                n,
                            );
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// The bytes of a freshly allocated contiguous CPU tensor of `n` bytes.
fn tensor_bytes_mut(t: &mut Tensor, n: usize) -> &mut [u8] {
    if n == 0 {
        return &mut [];
    }
    // SAFETY: `t` was just created by `f_empty` on the CPU: contiguous, `n` bytes, not
    // shared with any other tensor; the borrow of `t` keeps it alive and unaliased.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut u8, n) }
}

/// Checks that every shard of `manifest` exists under `dir` with its recorded size: catches
/// lost and truncated objects before any tensor is read.
pub(crate) async fn check_sizes(store: &CkptStore, dir: &Path, manifest: &Manifest) -> Result<()> {
    // Owned inputs: futures built from borrowing closures are not provably `Send`.
    let checks: Vec<(Path, u64)> = manifest
        .shards
        .iter()
        .map(|s| (dir.clone().join(s.file.as_str()), s.size))
        .collect();
    futures::stream::iter(checks.into_iter().map(|(path, expected)| {
        let store = store.clone();
        async move {
            let meta = store
                .object_store()
                .head(&path)
                .await
                .map_err(|e| store.err(&path, e))?;
            if meta.size != expected {
                return Err(CheckpointError::Truncated {
                    object: store.display(&path),
                    expected,
                    actual: meta.size,
                });
            }
            Ok(())
        }
    }))
    .buffer_unordered(16)
    .try_collect::<Vec<()>>()
    .await?;
    Ok(())
}

/// The steps under `store` that have a step directory, ascending (committed or not).
pub(crate) async fn list_steps(store: &CkptStore) -> Result<Vec<u64>> {
    let root = store.root().clone();
    let listing = match store.object_store().list_with_delimiter(Some(&root)).await {
        Ok(l) => l,
        Err(object_store::Error::NotFound { .. }) => return Ok(Vec::new()),
        Err(e) => return Err(store.err(&root, e)),
    };
    let mut steps: Vec<u64> = listing
        .common_prefixes
        .iter()
        .filter_map(|p| p.filename().and_then(parse_step_dir))
        .collect();
    steps.sort_unstable();
    steps.dedup();
    Ok(steps)
}

/// The step `latest` names, if it exists and parses.
pub(crate) async fn read_latest(store: &CkptStore) -> Option<u64> {
    let path = store.path(LATEST_FILE);
    let bytes = store
        .object_store()
        .get(&path)
        .await
        .ok()?
        .bytes()
        .await
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("step")?.as_u64()
}

/// Splits a URL into the checkpoint root and what to open: a trailing `step-N` component
/// (`step-00000100` or `step-100`) selects that step, anything else the newest complete one.
pub fn resolve(url: &str) -> Result<(CkptStore, Selector)> {
    let step_of = |name: &str| -> Option<u64> {
        let digits = name.strip_prefix("step-")?;
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
    };
    // The last component of the parsed location (never of the raw text: `s3://step-1` is
    // the root of bucket `step-1`, and a malformed URL fails here).
    let (root, last) = match StoreUrl::parse(url)? {
        StoreUrl::Local(path) => {
            let text = path.to_string_lossy().into_owned();
            match text.rsplit_once('/') {
                Some((root, last)) => (
                    if root.is_empty() { "/" } else { root }.to_string(),
                    last.to_string(),
                ),
                None => (".".to_string(), text),
            }
        }
        StoreUrl::Cloud {
            scheme,
            bucket,
            prefix,
        } => match prefix.rsplit_once('/') {
            Some((root, last)) => (format!("{scheme}://{bucket}/{root}"), last.to_string()),
            None => (format!("{scheme}://{bucket}"), prefix),
        },
    };
    match step_of(&last) {
        Some(step) => Ok((CkptStore::open(&root)?, Selector::Step(step))),
        None => Ok((CkptStore::open(url)?, Selector::Latest)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_splits_step_directories() {
        let (s, sel) = resolve("/a/b/step-00000100").unwrap();
        assert_eq!((s.url().as_str(), sel), ("/a/b", Selector::Step(100)));
        let (s, sel) = resolve("/a/b/step-7/").unwrap();
        assert_eq!((s.url().as_str(), sel), ("/a/b", Selector::Step(7)));
        let (s, sel) = resolve("file:///a/b").unwrap();
        assert_eq!((s.url().as_str(), sel), ("/a/b", Selector::Latest));
        let (s, sel) = resolve("s3://bk/p/step-00000007").unwrap();
        assert_eq!((s.url().as_str(), sel), ("s3://bk/p", Selector::Step(7)));
        let (_, sel) = resolve("/a/step-x").unwrap();
        assert_eq!(sel, Selector::Latest);
        let (s, sel) = resolve("s3://step-1").unwrap();
        assert_eq!((s.url().as_str(), sel), ("s3://step-1", Selector::Latest));
        let (s, sel) = resolve("s3://bk/step-2/").unwrap();
        assert_eq!((s.url().as_str(), sel), ("s3://bk", Selector::Step(2)));
        for bad in ["s3://", "s3://step-3/..", "gs:/bk/step-4", "s3:step-5"] {
            assert!(
                matches!(resolve(bad), Err(CheckpointError::MalformedUrl { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn direct_target_needs_one_gapless_run() {
        let block = |start, end, copies: Vec<CopyOp>| Block {
            start,
            end,
            crc: 0,
            tensor: "t".into(),
            copies,
        };
        let c = |out, src, dst, len| CopyOp { out, src, dst, len };
        let f = Fetch {
            file: 0,
            start: 100,
            end: 200,
            blocks: vec![
                block(100, 150, vec![c(0, 100, 8, 50)]),
                block(150, 200, vec![c(0, 150, 58, 50)]),
            ],
        };
        assert_eq!(direct_target(&f), Some((0, 8)));
        let gap = Fetch {
            blocks: vec![
                block(100, 150, vec![c(0, 100, 8, 40)]),
                block(150, 200, vec![c(0, 150, 48, 50)]),
            ],
            ..f
        };
        assert_eq!(direct_target(&gap), None);
        let two = Fetch {
            file: 0,
            start: 100,
            end: 200,
            blocks: vec![block(100, 200, vec![c(0, 100, 0, 50), c(1, 150, 0, 50)])],
        };
        assert_eq!(direct_target(&two), None);
    }
}
