//! Checkpoints of a training job (weaver-checkpoint's format): what each rank saves, who
//! commits, and loading a checkpoint of any layout into this rank ([`CheckpointDriver`]).
//!
//! Each (pp, tp) cell's data-parallel rank 0 saves its parameters and their AdamW moments
//! as pieces of the global tensors (replicated parameters from TP rank 0 only, so every
//! element is stored once); with the distributed optimizer (`parallel.shard_optimizer`)
//! every data-parallel rank saves the part of each parameter's f32 values and moments it
//! holds — a contiguous range of the parameter's flattened (TP-local) tensor, written as the
//! few boxes of the global tensor that range is made of ([`flat_boxes`]) — so the format is
//! the same global tensors whatever the optimizer, and any layout with or without it loads
//! it; world rank 0 adds the training state (`train.state`: step and
//! optimizer step) and the job's config; the data position is its own pieces (`data.sampler`,
//! or one `data.stream.NNNNN` per stream: the batch source's, see [`crate::data`]), written by
//! the rank of each replica that owns them and read back by whichever rank owns them in the
//! resuming layout. Parameters are saved in f32 — the master copy
//! when the model computes in bf16 — so that a resumed run starts from the exact optimizer
//! state. Training consumes no random numbers (no dropout; data is a function of sample
//! indices), so there is no RNG state to save. Checkpoints of the older format, whose
//! `train.state` also held the synthetic sampler's epoch and position (and whose data
//! position may be only there), still load.
//!
//! Saving stalls training only for the host copy ([`Snapshotter`], buffers reused across
//! saves); the upload runs in the background and is reported, once durable, to a
//! [`ShardSink`]: the coordinator in a cluster job, a [`LocalCommitter`] in one process.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};
use tracing::{info, warn};
use weaver_checkpoint::{
    block_on, commit, retain, Checkpoint, CheckpointError, CkptStore, Layout, PendingShard,
    SavedTensor, Selector, ShardReport, ShardWriter, SliceRequest, Snapshotter,
};
use weaver_data::source::Piece;
use weaver_models::data::SamplerState;
use weaver_models::nn::{Param, ParamStore};
use weaver_parallel::comm::{Communicator, ReduceOp};

use crate::error::WorkerError;
use crate::optim::FlatAdamW;

/// Name of the optimizer's first moment of parameter `name`.
pub fn exp_avg_name(name: &str) -> String {
    format!("optim.exp_avg.{name}")
}

/// Name of the optimizer's second moment of parameter `name`.
pub fn exp_avg_sq_name(name: &str) -> String {
    format!("optim.exp_avg_sq.{name}")
}

/// The training state tensor: `[step, optimizer step]` (older checkpoints:
/// `[step, sampler epoch, sampler position, optimizer step]`).
pub const STATE: &str = "train.state";
/// The job's config (TOML bytes).
pub const CONFIG: &str = "train.config";

/// Prefixes of the checkpoint pieces that are not model parameters: optimizer moments,
/// the training state and config, and the data position (`data.sampler`,
/// `data.stream.NNNNN`).
pub const NON_PARAM_PREFIXES: [&str; 3] = ["optim.", "train.", "data."];

/// Whether a checkpoint tensor is a model parameter (what `weaver ckpt export` keeps).
pub fn is_param(name: &str) -> bool {
    !NON_PARAM_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Reads the data-position piece `name` of `ckpt` (`None` when the checkpoint has none):
/// what a batch source resumes from (weaver-data's `PieceReader`).
pub fn read_data_piece(ckpt: &Checkpoint, name: &str) -> weaver_data::Result<Option<Vec<i64>>> {
    if !ckpt.manifest().tensors.contains_key(name) {
        return Ok(None);
    }
    block_on(ckpt.read_i64s(name))
        .map(Some)
        .map_err(|e| weaver_data::DataError::BadPosition {
            piece: name.to_string(),
            message: e.to_string(),
        })
}

impl From<CheckpointError> for WorkerError {
    fn from(e: CheckpointError) -> Self {
        WorkerError::Checkpoint(e.to_string())
    }
}

/// Where ranks report a durable shard (or that they had nothing to save) for a step.
pub trait ShardSink: Send + Sync + Debug {
    /// Rank `rank`'s part of checkpoint `step` is durable.
    fn durable(
        &self,
        step: u64,
        rank: usize,
        report: Option<ShardReport>,
    ) -> Result<(), WorkerError>;
}

/// Commits a checkpoint when every rank of an in-process world has reported (one process,
/// or ranks that are threads of one process), then applies retention; exports the final
/// checkpoint's weights when asked to ([`LocalCommitter::with_final_export`]).
#[derive(Debug)]
pub struct LocalCommitter {
    store: CkptStore,
    world: usize,
    keep: usize,
    layout: Layout,
    pending: Mutex<BTreeMap<u64, Vec<Option<ShardReport>>>>,
    final_export: Option<(u64, PathBuf)>,
}

impl LocalCommitter {
    /// A committer for `world` ranks of `layout` writing to `store`, keeping the last `keep`
    /// checkpoints (0: all).
    pub fn new(store: CkptStore, world: usize, keep: usize, layout: Layout) -> LocalCommitter {
        LocalCommitter {
            store,
            world,
            keep,
            layout,
            pending: Mutex::new(BTreeMap::new()),
            final_export: None,
        }
    }

    /// Once the checkpoint of `step` (the run's last) is committed, exports its parameters
    /// to `out` (`<run dir>/model.safetensors`).
    pub fn with_final_export(mut self, step: u64, out: PathBuf) -> LocalCommitter {
        self.final_export = Some((step, out));
        self
    }
}

/// Writes the parameters of the committed checkpoint of `step` under `url` to `out` as one
/// safetensors file of global f32 tensors (what `weaver ckpt export` writes): the final
/// weights of a run are its last checkpoint, exported by whoever commits it. Waits up to
/// `timeout` for that checkpoint to be committed (a committer may still be writing its
/// manifest when the job reports completion).
pub fn export_final(
    url: &str,
    step: u64,
    out: &Path,
    timeout: Duration,
) -> Result<(), WorkerError> {
    let store = CkptStore::open(url)?;
    let deadline = Instant::now() + timeout;
    let ckpt = loop {
        match block_on(Checkpoint::open(&store, Selector::Step(step))) {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(step, error = %e, "waiting for the final checkpoint's commit");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => {
                return Err(WorkerError::Checkpoint(format!(
                    "the final checkpoint (step {step} under {url}) was not committed within {} s, so {} was not written: {e}",
                    timeout.as_secs(),
                    out.display()
                )))
            }
        }
    };
    let tensors = export_params(&ckpt, out)?;
    info!(step, out = %out.display(), tensors, "final weights exported");
    Ok(())
}

/// Writes the parameters of `ckpt` to the safetensors file `out` (global f32 tensors under
/// their weaver names): byte for byte what the checkpoint holds, except that a LoRA run's
/// adapters are merged into their layers' weights (`weaver_models::lora::merge_all`, with
/// the scale of the checkpoint's config) so the file is a plain model whose outputs equal
/// the adapted one's. Returns the number of tensors written.
pub fn export_params(ckpt: &Checkpoint, out: &Path) -> Result<usize, WorkerError> {
    let names: Vec<String> = ckpt
        .manifest()
        .tensors
        .keys()
        .filter(|n| is_param(n))
        .cloned()
        .collect();
    if !names.iter().any(|n| weaver_models::lora::is_adapter(n)) {
        return Ok(block_on(weaver_checkpoint::export(ckpt, out, &is_param))?.tensors);
    }
    let text = block_on(ckpt.read_bytes(CONFIG))?;
    let job = weaver_models::JobConfig::parse(&String::from_utf8_lossy(&text), &[])
        .map_err(|e| WorkerError::Checkpoint(format!("{}: its config: {e}", ckpt.url())))?;
    let spec = weaver_models::lora::LoraSpec::of(&job.train).ok_or_else(|| {
        WorkerError::Checkpoint(format!(
            "{} holds LoRA adapters but its config has train.lora_rank = 0: their scale is unknown",
            ckpt.url()
        ))
    })?;
    // The whole model in memory at once (a merge needs a layer's weight and both factors).
    let mut named = Vec::with_capacity(names.len());
    for n in names {
        let t = block_on(ckpt.read_tensor(&n))?;
        named.push((n, t));
    }
    let merged = weaver_models::lora::merge_all(named, spec.scale())?;
    let mut partial = out.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    Tensor::write_safetensors(&merged, &partial)?;
    std::fs::rename(&partial, out).map_err(|e| WorkerError::io(out, e))?;
    info!(
        scale = spec.scale(),
        "LoRA adapters merged into their layers' weights"
    );
    Ok(merged.len())
}

/// Commits `reports` of `step` (the committer's side: coordinator or local), then keeps the
/// newest `keep`. Returns the checkpoint's URL.
pub fn commit_and_retain(
    store: &CkptStore,
    step: u64,
    layout: Layout,
    reports: Vec<ShardReport>,
    keep: usize,
) -> Result<String, WorkerError> {
    let manifest = block_on(commit(store, step, layout, reports))?;
    let url = format!(
        "{}/{}",
        store.url().trim_end_matches('/'),
        weaver_checkpoint::manifest::step_dir(manifest.step)
    );
    info!(step, url = %url, tensors = manifest.tensors.len(), "checkpoint committed");
    if keep > 0 {
        let deleted = block_on(retain(store, keep))?;
        if !deleted.is_empty() {
            info!(?deleted, keep, "old checkpoints deleted");
        }
    }
    Ok(url)
}

impl ShardSink for LocalCommitter {
    fn durable(
        &self,
        step: u64,
        _rank: usize,
        report: Option<ShardReport>,
    ) -> Result<(), WorkerError> {
        let ready = {
            let mut p = self
                .pending
                .lock()
                .map_err(|_| WorkerError::Checkpoint("committer lock poisoned".into()))?;
            let entry = p.entry(step).or_default();
            entry.push(report);
            if entry.len() == self.world {
                p.remove(&step)
            } else {
                None
            }
        };
        if let Some(reports) = ready {
            let reports: Vec<ShardReport> = reports.into_iter().flatten().collect();
            commit_and_retain(&self.store, step, self.layout.clone(), reports, self.keep)?;
            if let Some((last, out)) = &self.final_export {
                if *last == step {
                    export_final(&self.store.url(), step, out, Duration::ZERO)?;
                }
            }
        }
        Ok(())
    }
}

/// A rank's saving machinery.
#[derive(Debug)]
pub struct Saver {
    store: CkptStore,
    writer: ShardWriter,
    snap: Snapshotter,
    pending: Option<(u64, Option<PendingShard>)>,
    sink: std::sync::Arc<dyn ShardSink>,
    rank: usize,
}

impl Saver {
    /// Saves to `url`, reporting to `sink`.
    pub fn new(
        url: &str,
        rank: usize,
        sink: std::sync::Arc<dyn ShardSink>,
    ) -> Result<Saver, WorkerError> {
        let store = CkptStore::open(url)?;
        Ok(Saver {
            writer: ShardWriter::new(&store),
            store,
            snap: Snapshotter::new(),
            pending: None,
            sink,
            rank,
        })
    }

    /// The store.
    pub fn store(&self) -> &CkptStore {
        &self.store
    }

    /// Starts saving `tensors` as this rank's shard of `step` (none: nothing to save here);
    /// returns once they are copied to host memory. A save still uploading is finished
    /// first (one checkpoint in flight at a time).
    pub fn start(&mut self, step: u64, tensors: Vec<SavedTensor>) -> Result<(), WorkerError> {
        self.finish()?;
        let pending = if tensors.is_empty() {
            None
        } else {
            Some(self.writer.start(step, self.rank, tensors)?)
        };
        self.pending = Some((step, pending));
        Ok(())
    }

    /// Reports the save in flight if its upload is durable; does not wait.
    pub fn poll(&mut self) -> Result<(), WorkerError> {
        let done = match &self.pending {
            Some((_, Some(p))) => p.is_finished(),
            Some((_, None)) => true,
            None => false,
        };
        if done {
            self.finish()?;
        }
        Ok(())
    }

    /// Waits for the save in flight and reports it.
    pub fn finish(&mut self) -> Result<(), WorkerError> {
        if let Some((step, pending)) = self.pending.take() {
            let report = match pending {
                Some(p) => Some(p.wait()?),
                None => None,
            };
            self.sink.durable(step, self.rank, report)?;
        }
        Ok(())
    }

    /// Host copies of a parameter-shaped tensor as its piece of the global tensor `name`.
    pub fn piece(&self, name: String, t: &Tensor, p: &Param) -> Result<SavedTensor, WorkerError> {
        let global: Vec<u64> = p.global_shape.iter().map(|&d| d as u64).collect();
        let mut offset = vec![0u64; global.len()];
        if p.shard.world > 1 {
            let (dim, start, _) = p.shard.range(&p.global_shape);
            offset[dim] = start as u64;
        }
        Ok(self.snap.piece(name, t, global, offset)?)
    }

    /// Host copies of `t`, the box `local` (per-dimension ranges) of parameter `p`'s local
    /// part, as its piece of the global tensor `name`.
    pub fn box_piece(
        &self,
        name: String,
        t: &Tensor,
        p: &Param,
        local: &[Range<i64>],
    ) -> Result<SavedTensor, WorkerError> {
        let global: Vec<u64> = p.global_shape.iter().map(|&d| d as u64).collect();
        let mut offset: Vec<u64> = local.iter().map(|r| r.start as u64).collect();
        if p.shard.world > 1 {
            let (dim, start, _) = p.shard.range(&p.global_shape);
            offset[dim] += start as u64;
        }
        Ok(self.snap.piece(name, t, global, offset)?)
    }

    /// Reserves host buffers like `tensors` (so the first save does not allocate).
    pub fn reserve(&self, tensors: &[&Tensor]) -> Result<(), WorkerError> {
        Ok(self.snap.reserve(tensors)?)
    }
}

/// The global ranges of parameter `p`'s local part.
pub fn param_ranges(p: &Param) -> Vec<Range<u64>> {
    let mut r: Vec<Range<u64>> = p.global_shape.iter().map(|&d| 0..d as u64).collect();
    if p.shard.world > 1 {
        let (dim, start, len) = p.shard.range(&p.global_shape);
        r[dim] = start as u64..(start + len) as u64;
    }
    r
}

/// The boxes of a tensor of `shape` whose elements, in row-major order, are exactly the
/// elements `range` of the flattened tensor: each box's per-dimension ranges and its range
/// of the flattened tensor (contiguous, in order). At most `2·ndim − 1` boxes: a partial
/// row, whole rows, a partial row, recursively. A range of a sharded optimizer's state is
/// saved and loaded as these pieces of the global tensor.
pub fn flat_boxes(shape: &[i64], range: Range<i64>) -> Vec<(Vec<Range<i64>>, Range<i64>)> {
    let mut out = Vec::new();
    boxes_into(shape, range, &mut Vec::new(), 0, &mut out);
    out
}

fn boxes_into(
    shape: &[i64],
    range: Range<i64>,
    prefix: &mut Vec<Range<i64>>,
    base: i64,
    out: &mut Vec<(Vec<Range<i64>>, Range<i64>)>,
) {
    let (a, b) = (range.start, range.end);
    if a >= b {
        return;
    }
    let Some((_, rest)) = shape.split_first() else {
        // A scalar: its one element.
        out.push((prefix.clone(), base + a..base + b));
        return;
    };
    let row: i64 = rest.iter().product::<i64>().max(1);
    // Whole rows `r` of this dimension.
    let rows = |prefix: &[Range<i64>], r: Range<i64>| {
        let mut bx = prefix.to_vec();
        bx.push(r.clone());
        bx.extend(rest.iter().map(|&d| 0..d));
        (bx, base + r.start * row..base + r.end * row)
    };
    if a % row == 0 && b % row == 0 {
        out.push(rows(prefix, a / row..b / row));
        return;
    }
    let (first, last, end) = (a / row, (b - 1) / row, b / row);
    let mut full = first;
    if first == last || a % row != 0 {
        // A part of row `first` (all that is asked for, when it is one row).
        prefix.push(first..first + 1);
        let upto = if first == last { b - first * row } else { row };
        boxes_into(rest, a - first * row..upto, prefix, base + first * row, out);
        prefix.pop();
        if first == last {
            return;
        }
        full += 1;
    }
    if full < end {
        out.push(rows(prefix, full..end));
    }
    if b % row != 0 {
        prefix.push(end..end + 1);
        boxes_into(rest, 0..b % row, prefix, base + end * row, out);
        prefix.pop();
    }
}

/// Opens the checkpoint to resume from: `latest` (under the job's `[checkpoint] url`) or a
/// URL (a checkpoint root: its newest complete step; or a step directory).
pub fn open_resume(spec: &str, job_url: &str) -> Result<Checkpoint, WorkerError> {
    let ckpt = if spec == "latest" {
        if job_url.is_empty() {
            return Err(WorkerError::Checkpoint(
                "--resume latest needs [checkpoint] url in the config (or pass the checkpoint's URL)".into(),
            ));
        }
        let store = CkptStore::open(job_url)?;
        block_on(Checkpoint::open(&store, Selector::Latest))?
    } else {
        block_on(Checkpoint::open_url(spec))?
    };
    Ok(ckpt)
}

/// Reads `requests` from `ckpt`, falling back to older checkpoints of the same store while
/// the data turns out corrupt (a checkpoint whose manifest is fine but whose bytes are not).
pub fn read_with_fallback(
    mut ckpt: Checkpoint,
    requests: &[SliceRequest],
    fallback: bool,
) -> Result<(Checkpoint, Vec<Tensor>), WorkerError> {
    loop {
        match block_on(ckpt.read_slices(requests)) {
            Ok(t) => return Ok((ckpt, t)),
            Err(e @ CheckpointError::Corrupt { .. }) if fallback => {
                warn!(step = ckpt.step(), error = %e, "checkpoint data is corrupt; falling back to the one before");
                let store = ckpt.store().clone();
                ckpt = block_on(Checkpoint::open(&store, Selector::Before(ckpt.step())))?;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// A tensor read from a checkpoint, on `device` in `kind`.
pub fn to_param(t: &Tensor, kind: Kind, device: Device) -> Result<Tensor, WorkerError> {
    Ok(t.f_to_kind(kind)?.f_to_device(device)?)
}

/// Where training stands, apart from the weights, as this rank saves it: `train.state` and
/// its data-position pieces.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingState {
    /// Steps completed.
    pub step: u64,
    /// Optimizer updates taken.
    pub optimizer_step: u64,
    /// The batch source's position after `step`: the pieces this rank writes (empty when
    /// another rank of its replica writes them).
    pub data: Vec<Piece>,
}

/// What a resume loaded, apart from the weights and moments (already in place).
#[derive(Debug)]
pub struct Resumed {
    /// Steps completed.
    pub step: u64,
    /// Optimizer updates taken.
    pub optimizer_step: u64,
    /// The synthetic sampler's position when the checkpoint's `train.state` holds it (older
    /// checkpoints; the default otherwise): the fallback when there is no `data.sampler`.
    pub sampler: SamplerState,
    /// The checkpoint every rank settled on: where the data position pieces are read
    /// ([`read_data_piece`]).
    pub checkpoint: Checkpoint,
}

/// One rank's side of checkpoints: saving its shard (in the background) and loading any
/// layout's checkpoint into its parameters and optimizer state.
#[derive(Debug)]
pub struct CheckpointDriver {
    rank: usize,
    /// Whether this rank stores parameter `i` (each element once: data-parallel rank 0 only,
    /// replicated parameters from TP rank 0 only).
    saves: Vec<bool>,
    /// Whether this rank is data-parallel replica 0, which saves the frozen parameters
    /// (they have no optimizer state to shard).
    first_replica: bool,
    saver: Option<Saver>,
}

impl CheckpointDriver {
    /// The driver of world rank `rank` at data-parallel index `dp` and tensor-parallel index
    /// `tp`, for the parameters of `store`. Saving is off until [`CheckpointDriver::enable`].
    pub fn new(rank: usize, dp: usize, tp: usize, store: &ParamStore) -> CheckpointDriver {
        CheckpointDriver::build(rank, dp == 0, dp == 0, tp, store)
    }

    /// The driver of a rank of the distributed optimizer: every data-parallel replica saves
    /// the part of the state it holds ([`FlatAdamW::state_part`]).
    /// Frozen parameters (no state) are saved whole by replica `dp` 0.
    pub fn new_sharded(rank: usize, dp: usize, tp: usize, store: &ParamStore) -> CheckpointDriver {
        CheckpointDriver::build(rank, true, dp == 0, tp, store)
    }

    fn build(
        rank: usize,
        saving_replica: bool,
        first_replica: bool,
        tp: usize,
        store: &ParamStore,
    ) -> CheckpointDriver {
        let saves = store
            .params()
            .iter()
            .map(|p| saving_replica && (p.shard.world > 1 || tp == 0))
            .collect();
        CheckpointDriver {
            rank,
            saves,
            first_replica,
            saver: None,
        }
    }

    /// Saves to `url`, reporting durable shards to `sink`.
    pub fn enable(&mut self, url: &str, sink: Arc<dyn ShardSink>) -> Result<(), WorkerError> {
        if url.is_empty() {
            return Err(WorkerError::Checkpoint(
                "checkpoints need [checkpoint] url".into(),
            ));
        }
        self.saver = Some(Saver::new(url, self.rank, sink)?);
        Ok(())
    }

    /// Whether saving is on.
    pub fn enabled(&self) -> bool {
        self.saver.is_some()
    }

    /// Starts this rank's shard of a checkpoint of `state`; returns once it is copied to
    /// host memory (the upload goes on in the background). Every rank calls it at the same
    /// step.
    pub fn save(
        &mut self,
        store: &ParamStore,
        opt: &FlatAdamW,
        state: &TrainingState,
        config_toml: &str,
    ) -> Result<(), WorkerError> {
        let started = Instant::now();
        let Some(saver) = &self.saver else {
            return Err(WorkerError::Checkpoint(
                "checkpoints are not enabled on this rank".into(),
            ));
        };
        let mut tensors = Vec::new();
        for (i, p) in store.params().iter().enumerate() {
            if !self.saves[i] {
                continue;
            }
            if !opt.trains(i) {
                // Frozen: its value, and no moments (it has none; a run that trains it
                // resumes them at zero).
                if self.first_replica {
                    let value = p.tensor.f_detach()?.f_to_kind(Kind::Float)?;
                    tensors.push(saver.piece(p.name.clone(), &value, p)?);
                }
                continue;
            }
            let Some(part) = opt.state_part(i)? else {
                continue;
            };
            let value = part.value.f_detach()?;
            for (bx, flat) in flat_boxes(&p.tensor.size(), part.range.clone()) {
                let dims: Vec<i64> = bx.iter().map(|r| r.end - r.start).collect();
                let cut = |t: &Tensor| {
                    t.f_narrow(0, flat.start - part.range.start, flat.end - flat.start)?
                        .f_view(dims.as_slice())
                };
                tensors.push(saver.box_piece(p.name.clone(), &cut(&value)?, p, &bx)?);
                tensors.push(saver.box_piece(
                    exp_avg_name(&p.name),
                    &cut(&part.exp_avg)?,
                    p,
                    &bx,
                )?);
                tensors.push(saver.box_piece(
                    exp_avg_sq_name(&p.name),
                    &cut(&part.exp_avg_sq)?,
                    p,
                    &bx,
                )?);
            }
        }
        for (name, values) in &state.data {
            tensors.push(SavedTensor::from_i64s(name.clone(), values));
        }
        if self.rank == 0 {
            tensors.push(SavedTensor::from_i64s(
                STATE,
                &[state.step as i64, state.optimizer_step as i64],
            ));
            tensors.push(SavedTensor::from_bytes(CONFIG, config_toml.as_bytes()));
        }
        let n = tensors.len();
        if let Some(saver) = &mut self.saver {
            saver.start(state.step, tensors)?;
        }
        info!(
            step = state.step,
            tensors = n,
            stall_s = format!("{:.3}", started.elapsed().as_secs_f64()),
            "checkpoint started"
        );
        Ok(())
    }

    /// Reports the save in flight if it is durable; does not wait.
    pub fn poll(&mut self) -> Result<(), WorkerError> {
        match &mut self.saver {
            Some(s) => s.poll(),
            None => Ok(()),
        }
    }

    /// Waits until the save in flight is durable and reported.
    pub fn finish(&mut self) -> Result<(), WorkerError> {
        match &mut self.saver {
            Some(s) => s.finish(),
            None => Ok(()),
        }
    }

    /// Loads `ckpt` (of any layout) into this rank: its part of every parameter (into the
    /// optimizer's f32 values, and the compute-dtype parameters) and moment. Collective over
    /// `world`: all ranks settle on the same checkpoint (a rank that finds corrupt data
    /// falls back to an older one, and the others follow). Returns the training state and
    /// the checkpoint settled on (the batch source reads its position there).
    pub fn resume(
        &self,
        world: &dyn Communicator,
        ckpt: Checkpoint,
        store: &ParamStore,
        opt: &mut FlatAdamW,
        timeout: Duration,
    ) -> Result<Resumed, WorkerError> {
        let steady = world.timeout();
        world.set_timeout(timeout);
        let result = self.resume_inner(world, ckpt, store, opt);
        world.set_timeout(steady);
        result
    }

    fn resume_inner(
        &self,
        world: &dyn Communicator,
        ckpt: Checkpoint,
        store: &ParamStore,
        opt: &mut FlatAdamW,
    ) -> Result<Resumed, WorkerError> {
        let device = store.device;
        let store_url = ckpt.store().clone();
        let mut ckpt = ckpt;
        loop {
            let plan = resume_plan(store, opt, &ckpt)?;
            let requests = resume_requests(store, &plan);
            let (loaded, tensors) = read_with_fallback(ckpt, &requests, true)?;
            // Agree on the step: every rank must hold the same checkpoint.
            let mut s = Tensor::from_slice(&[loaded.step() as i64]).f_to_device(device)?;
            world
                .all_reduce(&mut s, ReduceOp::Min)
                .map_err(|e| WorkerError::Comm(e.to_string()))?;
            let agreed = crate::sync::read_i64s(&s)?[0] as u64;
            if agreed == loaded.step() {
                let (step, optimizer_step, sampler) = read_state(&loaded)?;
                apply(store, opt, &plan, tensors, device)?;
                opt.set_steps(optimizer_step)?;
                info!(step, rank = self.rank, "resumed");
                return Ok(Resumed {
                    step,
                    optimizer_step,
                    sampler,
                    checkpoint: loaded,
                });
            }
            warn!(
                mine = loaded.step(),
                agreed, "another rank fell back to an older checkpoint; following it"
            );
            ckpt = block_on(Checkpoint::open(&store_url, Selector::Step(agreed)))?;
        }
    }
}

/// What a rank loads of each parameter: the whole of its (TP-local) values, and the moments
/// of the part of the state it holds, as boxes of the local tensor and their flat ranges
/// (one box, the whole parameter, unsharded).
type ResumePlan = Vec<Vec<(Vec<Range<i64>>, Range<i64>)>>;

/// A parameter this run trains but `ckpt` holds no moments of (it was frozen in the run
/// that saved it) gets no boxes: [`apply`] starts its moments at zero.
fn resume_plan(
    store: &ParamStore,
    opt: &FlatAdamW,
    ckpt: &Checkpoint,
) -> Result<ResumePlan, WorkerError> {
    let mut fresh = 0;
    let plan = store
        .params()
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let saved = ckpt.manifest().tensors.contains_key(&exp_avg_name(&p.name));
            if opt.trains(i) && !saved {
                fresh += 1;
                return Ok(Vec::new());
            }
            Ok(match opt.state_part(i)? {
                Some(part) => flat_boxes(&p.tensor.size(), part.range),
                None => Vec::new(),
            })
        })
        .collect::<Result<ResumePlan, WorkerError>>()?;
    if fresh > 0 {
        info!(
            parameters = fresh,
            "the checkpoint has no optimizer moments for these trained parameters (they were frozen when it was saved): their moments start at zero"
        );
    }
    Ok(plan)
}

fn resume_requests(store: &ParamStore, plan: &ResumePlan) -> Vec<SliceRequest> {
    let mut out = Vec::new();
    for (p, boxes) in store.params().iter().zip(plan) {
        let r = param_ranges(p);
        // The box's global ranges: the local box moved by the TP part's offset.
        let global = |bx: &[Range<i64>]| -> Vec<Range<u64>> {
            bx.iter()
                .zip(&r)
                .map(|(b, g)| g.start + b.start as u64..g.start + b.end as u64)
                .collect()
        };
        out.push(SliceRequest::new(p.name.clone(), r.clone()));
        for (bx, _) in boxes {
            out.push(SliceRequest::new(exp_avg_name(&p.name), global(bx)));
            out.push(SliceRequest::new(exp_avg_sq_name(&p.name), global(bx)));
        }
    }
    out
}

/// The step, the optimizer step and the sampler position `train.state` holds (the default
/// position when it holds none) of `ckpt` (either format).
fn read_state(ckpt: &Checkpoint) -> Result<(u64, u64, SamplerState), WorkerError> {
    let state = block_on(ckpt.read_i64s(STATE))?;
    if state.iter().any(|&v| v < 0) {
        return Err(WorkerError::Checkpoint(format!(
            "{}: {STATE} holds negative values: {state:?}",
            ckpt.url()
        )));
    }
    match state.len() {
        2 => Ok((state[0] as u64, state[1] as u64, SamplerState::default())),
        4 => Ok((
            state[0] as u64,
            state[3] as u64,
            SamplerState {
                epoch: state[1] as u64,
                position: state[2] as u64,
            },
        )),
        n => Err(WorkerError::Checkpoint(format!(
            "{}: {STATE} holds {n} values, expected 2 (or 4 in older checkpoints)",
            ckpt.url()
        ))),
    }
}

/// Copies the tensors read for [`resume_requests`] into the parameters and the optimizer's
/// values and moments.
fn apply(
    store: &ParamStore,
    opt: &FlatAdamW,
    plan: &ResumePlan,
    tensors: Vec<Tensor>,
    device: Device,
) -> Result<(), WorkerError> {
    let mut it = tensors.into_iter();
    let short = || WorkerError::Checkpoint("fewer tensors than requested".into());
    tch::no_grad(|| -> Result<(), WorkerError> {
        for (i, (p, boxes)) in store.params().iter().zip(plan).enumerate() {
            let value = it.next().ok_or_else(short)?;
            p.tensor
                .shallow_clone()
                .f_copy_(&to_param(&value, p.tensor.kind(), device)?)?;
            opt.load_value(i, &to_param(&value, Kind::Float, device)?)?;
            let part = opt.state_part(i)?;
            if let (true, Some(part)) = (boxes.is_empty(), part.as_ref()) {
                // Trained here, frozen when saved: fresh moments.
                let _ = part.exp_avg.shallow_clone().f_zero_()?;
                let _ = part.exp_avg_sq.shallow_clone().f_zero_()?;
            }
            for (_, flat) in boxes {
                let (Some(m), Some(v), Some(part)) = (it.next(), it.next(), part.as_ref()) else {
                    return Err(short());
                };
                let at = flat.start - part.range.start;
                let len = flat.end - flat.start;
                for (dst, src) in [(&part.exp_avg, m), (&part.exp_avg_sq, v)] {
                    dst.f_narrow(0, at, len)?
                        .f_copy_(&to_param(&src, Kind::Float, device)?.f_reshape([-1])?)?;
                }
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_flat_range_is_a_few_boxes() {
        // 4×6: elements 2..19 are the rest of row 0, rows 1–2, the start of row 3.
        let b = flat_boxes(&[4, 6], 2..19);
        assert_eq!(
            b,
            vec![
                (vec![0..1, 2..6], 2..6),
                (vec![1..3, 0..6], 6..18),
                (vec![3..4, 0..1], 18..19),
            ]
        );
        assert_eq!(flat_boxes(&[4, 6], 0..24), vec![(vec![0..4, 0..6], 0..24)]);
        assert_eq!(flat_boxes(&[4, 6], 7..9), vec![(vec![1..2, 1..3], 7..9)]);
        assert_eq!(flat_boxes(&[], 0..1), vec![(vec![], 0..1)]);
        assert!(flat_boxes(&[3], 2..2).is_empty());
    }

    proptest! {
        #[test]
        fn boxes_tile_the_range_in_order(
            shape in proptest::collection::vec(1i64..5, 0..4),
            a in 0i64..200,
            len in 0i64..200,
        ) {
            let numel: i64 = shape.iter().product();
            let a = a % (numel + 1);
            let b = (a + len).min(numel);
            let t = Tensor::arange(numel, (Kind::Int64, Device::Cpu)).reshape(shape.as_slice());
            let mut next = a;
            for (bx, flat) in flat_boxes(&shape, a..b) {
                prop_assert_eq!(flat.start, next);
                next = flat.end;
                let mut v = t.shallow_clone();
                for (d, r) in bx.iter().enumerate() {
                    v = v.narrow(d as i64, r.start, r.end - r.start);
                }
                let want = Tensor::arange_start(flat.start, flat.end, (Kind::Int64, Device::Cpu));
                prop_assert!(v.reshape([-1]).equal(&want), "{:?} {:?}", bx, flat);
            }
            prop_assert_eq!(next, b.max(a));
            prop_assert!(flat_boxes(&shape, a..b).len() <= (2 * shape.len()).max(1));
        }
    }
}
