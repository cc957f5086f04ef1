//! Saving one rank's shard: take ownership of CPU tensors, return at once, and stream a
//! safetensors file (header, then each tensor's bytes without copying them) to the store with
//! a multipart upload on the I/O runtime, computing per-block CRC-32C on the way. The
//! [`PendingShard`] yields a [`ShardReport`] once the object is durable (on local disk the
//! file and its directory are fsync'd before the upload completes).
//!
//! Non-tensor state goes in as small tensors: [`SavedTensor::from_bytes`] (RNG state, a
//! config file, any serialized blob; `U8`) and [`SavedTensor::from_i64s`] (step, LR-schedule
//! step, sampler position; `I64`), read back with `Checkpoint::read_bytes` /
//! `Checkpoint::read_i64s`. State that differs per rank (RNG) is a global tensor with one row
//! per rank, each rank saving its row, or a rank-qualified name; the crate does not care.
//! Free-form strings can also go into the shard's `__metadata__`
//! ([`ShardWriter::start_with_metadata`]), which the manifest repeats per shard.
//!
//! The writer reads the tensors' memory while the upload runs: pass tensors nobody mutates,
//! from a [`Snapshotter`] (copies into reused, warm host buffers: the short stall) or from
//! [`snapshot`] (a fresh copy).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use object_store::path::Path;
use object_store::{MultipartUpload, ObjectStoreExt, PutPayloadMut};
use tch::{Device, Tensor};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::dtype::Dtype;
use crate::error::{CheckpointError, Result};
use crate::format::build_header;
use crate::manifest::{
    shard_file, step_dir, Piece, ReportedTensor, ShardInfo, ShardReport, ShardTiming,
    DEFAULT_CRC_BLOCK, FORMAT, MANIFEST_FILE,
};
use crate::runtime::{block_on, io_runtime};
use crate::slice::Slice;
use crate::store::CkptStore;

/// A contiguous CPU copy of `t` that shares no memory with it (a device→host copy for
/// device tensors, a plain copy on the CPU), in a fresh allocation; a [`Snapshotter`] does
/// the same into reused buffers, faster.
pub fn snapshot(t: &Tensor) -> Result<Tensor, tch::TchError> {
    let mut b = host_buffer(t)?;
    host_copy(&mut b, t)?;
    Ok(b)
}

/// Copies `src` into the contiguous host buffer `dst` (same kind and size). Contiguous CPU
/// sources are copied with one plain `memcpy` on the calling thread: libtorch's parallel
/// copy is several times slower when its intra-op threads compete for busy cores (measured:
/// 256 MiB in 0.26 s with 2 threads on a loaded 2-core machine, 0.05 s with memcpy), and a
/// copy is bound by memory bandwidth anyway. Everything else (device→host, strided) goes
/// through libtorch.
fn host_copy(dst: &mut Tensor, src: &Tensor) -> Result<(), tch::TchError> {
    let n = src.numel() * src.kind().elt_size_in_bytes();
    if src.device() == Device::Cpu
        && src.is_contiguous()
        && dst.is_contiguous()
        && dst.device() == Device::Cpu
        && dst.kind() == src.kind()
        && dst.size() == src.size()
    {
        if n > 0 {
            // SAFETY: both are contiguous CPU tensors of the same kind and size, so each
            // holds exactly `n` bytes at its data pointer; `dst` is a buffer of our own that
            // no other tensor aliases (fresh or taken from the pool), so the ranges do not
            // overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    src.data_ptr() as *const u8,
                    dst.data_ptr() as *mut u8,
                    n,
                );
            }
        }
        return Ok(());
    }
    dst.f_copy_(src)
}

/// A piece of a global tensor handed to the writer.
pub struct SavedTensor {
    name: String,
    tensor: Tensor,
    global_shape: Vec<u64>,
    offset: Vec<u64>,
    /// Where the host buffer goes back when the upload is done ([`Snapshotter`]).
    pool: Option<Pool>,
    /// Seconds its host copy took ([`Snapshotter`]; 0 otherwise).
    copy_s: f64,
}

impl fmt::Debug for SavedTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SavedTensor")
            .field("name", &self.name)
            .field("kind", &self.tensor.kind())
            .field("size", &self.tensor.size())
            .field("global_shape", &self.global_shape)
            .field("offset", &self.offset)
            .finish()
    }
}

impl SavedTensor {
    /// A whole tensor (the piece is the global tensor).
    pub fn whole(name: impl Into<String>, tensor: Tensor) -> SavedTensor {
        let shape: Vec<u64> = tensor.size().iter().map(|&d| d as u64).collect();
        SavedTensor {
            name: name.into(),
            offset: vec![0; shape.len()],
            global_shape: shape,
            tensor,
            pool: None,
            copy_s: 0.0,
        }
    }

    /// A piece of global tensor `name` of `global_shape`, starting at `offset` in each
    /// dimension; its extent is the tensor's size. A tensor-parallel shard of dim `d` is
    /// `offset[d] = tp_rank * size[d]`, zeros elsewhere.
    pub fn piece(
        name: impl Into<String>,
        tensor: Tensor,
        global_shape: Vec<u64>,
        offset: Vec<u64>,
    ) -> SavedTensor {
        SavedTensor {
            name: name.into(),
            tensor,
            global_shape,
            offset,
            pool: None,
            copy_s: 0.0,
        }
    }

    /// Raw bytes as a whole `U8` tensor (RNG state, a config file).
    pub fn from_bytes(name: impl Into<String>, data: &[u8]) -> SavedTensor {
        SavedTensor::whole(name, Tensor::from_slice(data))
    }

    /// Integers as a whole `I64` tensor (step, schedule step, sampler position).
    pub fn from_i64s(name: impl Into<String>, values: &[i64]) -> SavedTensor {
        SavedTensor::whole(name, Tensor::from_slice(values))
    }

    /// The global tensor's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// S3's minimum part size (all parts but the last).
const MIN_REMOTE_PART: usize = 5 << 20;

/// Tuning of uploads.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Multipart part size in bytes. Object stores need at least 5 MiB for all but the last
    /// part, so smaller values are raised to that except on local disk.
    pub part_bytes: usize,
    /// Parts in flight at once.
    pub max_concurrent_parts: usize,
    /// Bytes per checksum block; smaller blocks make ranged reads fetch less slack, larger
    /// ones make the manifest smaller (four bytes of JSON-encoded checksum per block).
    pub crc_block: u64,
}

impl Default for WriterOptions {
    fn default() -> WriterOptions {
        WriterOptions {
            part_bytes: 16 << 20,
            max_concurrent_parts: 8,
            crc_block: DEFAULT_CRC_BLOCK,
        }
    }
}

/// Starts shard uploads to one checkpoint location.
#[derive(Debug, Clone)]
pub struct ShardWriter {
    store: CkptStore,
    options: WriterOptions,
}

/// One tensor's bytes, owned: the `Bytes` handed to the store point into the tensor's
/// memory, which stays alive (and unmoved) as long as any part holds it. When the last part
/// lets go, a pooled buffer returns to its [`Snapshotter`].
struct TensorBytes {
    tensor: Option<Tensor>,
    /// The data pointer, as an address (raw pointers are not `Send`).
    addr: usize,
    len: usize,
    pool: Option<Pool>,
}

impl TensorBytes {
    fn new(tensor: Tensor, len: usize, pool: Option<Pool>) -> TensorBytes {
        let addr = if len == 0 {
            0
        } else {
            tensor.data_ptr() as usize
        };
        TensorBytes {
            tensor: Some(tensor),
            addr,
            len,
            pool,
        }
    }
}

impl AsRef<[u8]> for TensorBytes {
    fn as_ref(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `addr` is the data pointer of a defined, contiguous CPU tensor (checked in
        // `start`) of `len` bytes owned by `self`; libtorch does not move or free its storage
        // while the tensor lives, and the writer's contract is that nobody writes to it
        // meanwhile.
        unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.len) }
    }
}

impl Drop for TensorBytes {
    fn drop(&mut self) {
        if let (Some(pool), Some(t)) = (self.pool.take(), self.tensor.take()) {
            if let Some(pool) = pool.upgrade() {
                if let Ok(mut free) = pool.lock() {
                    free.push(t);
                }
            }
        }
    }
}

/// A [`Snapshotter`]'s free buffers.
type Pool = Weak<Mutex<Vec<Tensor>>>;

/// Reusable host buffers for snapshots. Copying into memory that is already mapped (and,
/// for GPU tensors, pinned) is about twice as fast as copying into a fresh allocation, which
/// pays a page fault per 4 KiB: this is what keeps the training thread's stall short. A
/// buffer goes back to the pool when the upload that owns it has finished; a snapshot taken
/// while the previous save still uploads allocates fresh buffers.
///
/// ```ignore
/// let snap = Snapshotter::new();
/// snap.reserve(&params)?;                       // once, at startup: warm buffers
/// let tensors = vec![snap.piece("layers.0.wq", &wq, vec![4096, 1024], vec![tp * 2048, 0])?];
/// let pending = writer.start(step, rank, tensors)?;
/// ```
#[derive(Debug, Clone, Default)]
pub struct Snapshotter {
    free: Arc<Mutex<Vec<Tensor>>>,
}

impl Snapshotter {
    /// An empty pool.
    pub fn new() -> Snapshotter {
        Snapshotter::default()
    }

    /// Allocates and touches one buffer like each of `like` (pinned for GPU tensors), so
    /// that even the first snapshot copies into warm memory.
    pub fn reserve(&self, like: &[&Tensor]) -> Result<(), tch::TchError> {
        let mut bufs = Vec::with_capacity(like.len());
        for t in like {
            let mut b = host_buffer(t)?;
            let _ = b.f_zero_()?;
            bufs.push(b);
        }
        if let Ok(mut free) = self.free.lock() {
            free.extend(bufs);
        }
        Ok(())
    }

    /// Drops every free buffer.
    pub fn clear(&self) {
        if let Ok(mut free) = self.free.lock() {
            free.clear();
        }
    }

    /// Buffers currently free.
    pub fn free_buffers(&self) -> usize {
        self.free.lock().map_or(0, |f| f.len())
    }

    /// A copy of `t` in a host buffer from the pool (a new one if none fits).
    fn copy(&self, t: &Tensor) -> Result<Tensor, tch::TchError> {
        let size = t.size();
        let kind = t.kind();
        let reused = self.free.lock().ok().and_then(|mut free| {
            let i = free
                .iter()
                .position(|b| b.kind() == kind && b.size() == size)?;
            Some(free.swap_remove(i))
        });
        let mut buf = match reused {
            Some(b) => b,
            None => host_buffer(t)?,
        };
        host_copy(&mut buf, t)?;
        Ok(buf)
    }

    /// A snapshot of `t` as the whole global tensor `name`.
    pub fn whole(&self, name: impl Into<String>, t: &Tensor) -> Result<SavedTensor, tch::TchError> {
        let started = std::time::Instant::now();
        let mut s = SavedTensor::whole(name, self.copy(t)?);
        s.pool = Some(Arc::downgrade(&self.free));
        s.copy_s = started.elapsed().as_secs_f64();
        Ok(s)
    }

    /// A snapshot of `t` as a piece of global tensor `name` (see [`SavedTensor::piece`]).
    pub fn piece(
        &self,
        name: impl Into<String>,
        t: &Tensor,
        global_shape: Vec<u64>,
        offset: Vec<u64>,
    ) -> Result<SavedTensor, tch::TchError> {
        let started = std::time::Instant::now();
        let mut s = SavedTensor::piece(name, self.copy(t)?, global_shape, offset);
        s.pool = Some(Arc::downgrade(&self.free));
        s.copy_s = started.elapsed().as_secs_f64();
        Ok(s)
    }
}

/// An uninitialized contiguous host tensor like `t`, pinned when `t` lives on a GPU.
fn host_buffer(t: &Tensor) -> Result<Tensor, tch::TchError> {
    let b = Tensor::f_empty(t.size().as_slice(), (t.kind(), Device::Cpu))?;
    match t.device() {
        Device::Cpu => Ok(b),
        d => b.f_pin_memory(d),
    }
}

/// Separates a tensor's name from the piece number in the safetensors key of its second
/// and later pieces in one shard (`name#1`).
pub const PIECE_KEY_SEP: char = '#';

struct Item {
    name: String,
    dtype: Dtype,
    global_shape: Vec<u64>,
    slice: Slice,
    range: (u64, u64),
    bytes: Bytes,
}

impl ShardWriter {
    /// A writer with default options.
    pub fn new(store: &CkptStore) -> ShardWriter {
        ShardWriter {
            store: store.clone(),
            options: WriterOptions::default(),
        }
    }

    /// Replaces the options.
    pub fn with_options(mut self, options: WriterOptions) -> ShardWriter {
        self.options = options;
        self
    }

    /// Takes ownership of `tensors` (contiguous CPU tensors nobody else writes to) and
    /// starts uploading `step-…/shard-<rank>.safetensors` in the background. Returns as soon
    /// as the header is built; fails here only for tensors it cannot save.
    pub fn start(&self, step: u64, rank: usize, tensors: Vec<SavedTensor>) -> Result<PendingShard> {
        self.start_with_metadata(step, rank, tensors, BTreeMap::new())
    }

    /// [`ShardWriter::start`] with strings for the shard's `__metadata__` (keys starting with
    /// `weaver.` are the crate's).
    pub fn start_with_metadata(
        &self,
        step: u64,
        rank: usize,
        tensors: Vec<SavedTensor>,
        mut metadata: BTreeMap<String, String>,
    ) -> Result<PendingShard> {
        if self.options.part_bytes == 0 || self.options.crc_block == 0 {
            return Err(CheckpointError::Layout(
                "writer options: part_bytes and crc_block must be positive".into(),
            ));
        }
        let mut options = self.options.clone();
        if !self.store.is_local() {
            options.part_bytes = options.part_bytes.max(MIN_REMOTE_PART);
        }
        let copy_s: f64 = tensors.iter().map(|t| t.copy_s).sum();
        // Pieces of each name so far: a shard may hold several disjoint pieces of one
        // tensor (a contiguous range of a sharded optimizer's state is several boxes).
        let mut seen: BTreeMap<String, Vec<Slice>> = BTreeMap::new();
        let mut checked = Vec::with_capacity(tensors.len());
        for t in tensors {
            let bad = |message: String| CheckpointError::BadTensor {
                tensor: t.name.clone(),
                message,
            };
            if t.name.is_empty() || t.name == "__metadata__" {
                return Err(bad("reserved or empty name".into()));
            }
            if !t.tensor.defined() {
                return Err(bad("undefined tensor".into()));
            }
            if t.tensor.device() != Device::Cpu {
                return Err(bad(format!(
                    "on {:?}; copy it to the CPU first (weaver_checkpoint::snapshot)",
                    t.tensor.device()
                )));
            }
            let dtype = Dtype::from_kind(t.tensor.kind())
                .ok_or_else(|| bad(format!("dtype {:?} cannot be saved", t.tensor.kind())))?;
            let size: Vec<u64> = t.tensor.size().iter().map(|&d| d as u64).collect();
            let slice = Slice {
                offset: t.offset.clone(),
                len: size,
            };
            if !slice.fits(&t.global_shape) {
                return Err(bad(format!(
                    "piece {:?} does not fit global shape {:?}",
                    slice.ranges(),
                    t.global_shape
                )));
            }
            let earlier = seen.entry(t.name.clone()).or_default();
            if earlier.iter().any(|e| e.intersect(&slice).is_some()) {
                return Err(bad("given twice to one shard (overlapping pieces)".into()));
            }
            // The safetensors key: the name for a tensor's first piece in the shard, then
            // `name#1`, `name#2`, ... (the manifest maps them back by byte range).
            let key = match earlier.len() {
                0 => t.name.clone(),
                k => format!("{}{PIECE_KEY_SEP}{k}", t.name),
            };
            earlier.push(slice.clone());
            let tensor = if t.tensor.is_contiguous() {
                t.tensor
            } else {
                t.tensor
                    .f_contiguous()
                    .map_err(|source| CheckpointError::Torch {
                        tensor: t.name.clone(),
                        source,
                    })?
            };
            checked.push((t.name, key, dtype, t.global_shape, slice, tensor, t.pool));
        }

        let slices: BTreeMap<&str, serde_json::Value> = checked
            .iter()
            .map(|(_, key, _, global, slice, _, _)| {
                (
                    key.as_str(),
                    serde_json::json!({"global_shape": global, "offset": slice.offset}),
                )
            })
            .collect();
        metadata.insert("weaver.format".into(), FORMAT.into());
        metadata.insert("weaver.step".into(), step.to_string());
        metadata.insert("weaver.rank".into(), rank.to_string());
        metadata.insert(
            "weaver.slices".into(),
            serde_json::to_string(&slices).unwrap_or_default(),
        );
        let entries: Vec<(&str, Dtype, &[u64])> = checked
            .iter()
            .map(|(_, key, dtype, _, slice, _, _)| (key.as_str(), *dtype, slice.len.as_slice()))
            .collect();
        let (header, ranges) = build_header(&entries, &metadata);
        let header_bytes = header.len() as u64;
        let size = ranges.last().map_or(header_bytes, |r| r.1);
        let items: Vec<Item> = checked
            .into_iter()
            .zip(ranges)
            .map(
                |((name, _, dtype, global_shape, slice, tensor, pool), range)| {
                    let len = (range.1 - range.0) as usize;
                    Item {
                        name,
                        dtype,
                        global_shape,
                        slice,
                        range,
                        bytes: Bytes::from_owner(TensorBytes::new(tensor, len, pool)),
                    }
                },
            )
            .collect();

        let file = shard_file(rank);
        let dir = step_dir(step);
        let path = self.store.path(&format!("{dir}/{file}"));
        let object = self.store.display(&path);
        let written = Arc::new(AtomicU64::new(0));
        let job = Upload {
            store: self.store.clone(),
            manifest: self.store.path(&format!("{dir}/{MANIFEST_FILE}")),
            path,
            header: Bytes::from(header),
            items,
            options,
            written: written.clone(),
            shard: ShardInfo {
                file,
                rank,
                size,
                header_bytes,
                metadata,
            },
            step,
            copy_s,
        };
        let span = tracing::info_span!("ckpt_upload", object = %object, step, rank, bytes = size);
        let handle = io_runtime()?.spawn(job.run().instrument(span));
        Ok(PendingShard {
            object,
            handle,
            written,
            total: size,
        })
    }
}

struct Upload {
    store: CkptStore,
    manifest: Path,
    path: Path,
    header: Bytes,
    items: Vec<Item>,
    options: WriterOptions,
    written: Arc<AtomicU64>,
    shard: ShardInfo,
    step: u64,
    copy_s: f64,
}

impl Upload {
    async fn run(self) -> Result<ShardReport> {
        let store = self.store.object_store().clone();
        // Never overwrite a committed checkpoint's shards.
        match store.head(&self.manifest).await {
            Ok(_) => {
                return Err(CheckpointError::AlreadyCommitted {
                    object: self.store.display(&self.manifest),
                    step: self.step,
                })
            }
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(self.store.err(&self.manifest, e)),
        }
        let started = std::time::Instant::now();
        let upload = store
            .put_multipart(&self.path)
            .await
            .map_err(|e| self.store.err(&self.path, e))?;
        let mut parts = Parts {
            upload,
            tasks: JoinSet::new(),
            buffer: PutPayloadMut::new(),
            part_bytes: self.options.part_bytes,
            max: self.options.max_concurrent_parts.max(1),
            written: self.written.clone(),
        };
        let mut pieces = Vec::with_capacity(self.items.len());
        let result = async {
            parts.put(self.header.clone()).await?;
            for item in &self.items {
                parts.put(item.bytes.clone()).await?;
                // Checksums while the parts just handed over are being written.
                let block = self.options.crc_block as usize;
                let block_crc32c: Vec<u32> = item.bytes.chunks(block).map(crc32c::crc32c).collect();
                let mut piece = Piece {
                    file: self.shard.file.clone(),
                    slice: item.slice.clone(),
                    bytes: [item.range.0, item.range.1],
                    crc32c: 0,
                    crc_block: self.options.crc_block,
                    block_crc32c,
                };
                piece.crc32c = crate::manifest::combine_blocks(&piece);
                pieces.push(ReportedTensor {
                    name: item.name.clone(),
                    dtype: item.dtype,
                    shape: item.global_shape.clone(),
                    piece,
                });
            }
            parts.finish().await
        }
        .await;
        if let Err(e) = result {
            // Report the first failure, not the clean-up's.
            parts.tasks.shutdown().await;
            let _ = parts.upload.abort().await;
            return Err(match e {
                PartError::Store(e) => self.store.err(&self.path, e),
                PartError::Join(message) => CheckpointError::Background {
                    object: self.store.display(&self.path),
                    message,
                },
            });
        }
        let upload_s = started.elapsed().as_secs_f64();
        tracing::debug!(secs = upload_s, "shard durable");
        Ok(ShardReport {
            step: self.step,
            shard: self.shard,
            tensors: pieces,
            timing: Some(ShardTiming {
                copy_s: self.copy_s,
                upload_s,
            }),
        })
    }
}

enum PartError {
    Store(object_store::Error),
    Join(String),
}

/// A multipart upload fed with zero-copy `Bytes`, cut into `part_bytes` parts, at most
/// `max` in flight.
struct Parts {
    upload: Box<dyn MultipartUpload>,
    tasks: JoinSet<object_store::Result<()>>,
    buffer: PutPayloadMut,
    part_bytes: usize,
    max: usize,
    written: Arc<AtomicU64>,
}

impl Parts {
    async fn put(&mut self, mut bytes: Bytes) -> Result<(), PartError> {
        while !bytes.is_empty() {
            let room = self.part_bytes - self.buffer.content_length();
            let chunk = bytes.split_to(room.min(bytes.len()));
            self.buffer.push(chunk);
            if self.buffer.content_length() == self.part_bytes {
                self.flush().await?;
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), PartError> {
        while self.tasks.len() >= self.max {
            self.join_one().await?;
        }
        let part = std::mem::take(&mut self.buffer).freeze();
        let len = part.content_length() as u64;
        self.tasks.spawn(self.upload.put_part(part));
        self.written.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    async fn join_one(&mut self) -> Result<(), PartError> {
        match self.tasks.join_next().await {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(PartError::Store(e)),
            Some(Err(e)) => Err(PartError::Join(e.to_string())),
        }
    }

    async fn finish(&mut self) -> Result<(), PartError> {
        if self.buffer.content_length() > 0 || self.tasks.is_empty() {
            self.flush().await?;
        }
        while !self.tasks.is_empty() {
            self.join_one().await?;
        }
        self.upload.complete().await.map_err(PartError::Store)?;
        Ok(())
    }
}

/// A shard upload in progress. Dropping it does not cancel the upload.
#[derive(Debug)]
pub struct PendingShard {
    object: String,
    handle: tokio::task::JoinHandle<Result<ShardReport>>,
    written: Arc<AtomicU64>,
    total: u64,
}

impl PendingShard {
    /// The object being written.
    pub fn object(&self) -> &str {
        &self.object
    }

    /// Size of the shard file.
    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// Bytes handed to the store so far (at most `max_concurrent_parts` parts ahead of what
    /// is written): for progress bars.
    pub fn bytes_written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Whether the upload has ended (successfully or not); [`PendingShard::wait`] then
    /// returns at once.
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Blocks until the shard is durable and returns its report. Call from a thread that
    /// does not run an async runtime; async code uses [`PendingShard::finish`].
    pub fn wait(self) -> Result<ShardReport> {
        block_on(self.finish())
    }

    /// Waits until the shard is durable and returns its report.
    pub async fn finish(self) -> Result<ShardReport> {
        match self.handle.await {
            Ok(r) => r,
            Err(e) => Err(CheckpointError::Background {
                object: self.object,
                message: e.to_string(),
            }),
        }
    }
}
