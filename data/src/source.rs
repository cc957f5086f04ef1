//! What the trainer calls once per step: [`BatchSource::next_step`] hands this rank's
//! micro-batches of the step, already on the device, and [`BatchSource::position`] says where
//! the data stands after the last step handed out, as checkpoint pieces.
//!
//! Both sources prepare steps on background threads a few steps ahead (`data.prefetch`),
//! into pinned host memory when the device is CUDA; the step's tensors are then copied with
//! non-blocking copies, ordered on the device's current stream before the step's kernels, so
//! the host never waits for input. On the CPU the prepared tensors are used as they are.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError};
use tch::{Device, Tensor};
use weaver_models::data::{Batch, Dataset, Sampler, SamplerState, Split};
use weaver_models::objectives::TextRows;

use crate::error::{DataError, Result};
use crate::loader::{DataStats, DpRank, HostStep, LoaderConfig, ShardLoader};
use crate::order::{owned_streams, StreamPosition};

/// One step's input for this rank.
#[derive(Debug)]
pub struct StepData {
    /// The rank's micro-batches, in order, on the device.
    pub micro: Vec<Batch>,
    /// The samples' keys in batch order (shard keys, or synthetic indices).
    pub keys: Vec<String>,
    /// Counters of the data this rank read (zero for the synthetic source).
    pub stats: DataStats,
}

/// A named checkpoint piece of the data position (int64 values).
pub type Piece = (String, Vec<i64>);

/// A source of step batches with a checkpointable position.
pub trait BatchSource: Send + std::fmt::Debug {
    /// This rank's micro-batches of the next step.
    fn next_step(&mut self) -> Result<StepData>;
    /// The position after the last step returned: the pieces this rank writes into a
    /// checkpoint (empty when another rank of its replica writes them).
    fn position(&self) -> Vec<Piece>;
}

/// Reads one checkpoint piece by name (`None` when the checkpoint has no such piece).
pub type PieceReader<'a> = dyn FnMut(&str) -> Result<Option<Vec<i64>>> + 'a;

/// Where this rank sits, for the data.
#[derive(Debug, Clone, Copy)]
pub struct RankPlace {
    /// Data-parallel size and coordinate.
    pub dp: DpRank,
    /// Micro-batches per data-parallel rank and step.
    pub microbatches: usize,
    /// Whether this rank writes its replica's data position (one rank per replica does:
    /// pipeline stage 0, tensor-parallel rank 0).
    pub writes_position: bool,
}

/// A source with nothing to give: stands in while a trainer swaps its source (the old one
/// is dropped, and its threads stop, before the new one starts reading).
#[derive(Debug, Clone, Copy, Default)]
pub struct Stopped;

impl BatchSource for Stopped {
    fn next_step(&mut self) -> Result<StepData> {
        Err(DataError::Loader(
            "the batch source is being replaced".into(),
        ))
    }

    fn position(&self) -> Vec<Piece> {
        Vec::new()
    }
}

/// Copies a prepared host batch (with its VQA rows, when the shards give questions) to
/// `device` (non-blocking from pinned memory) and cuts it into `micro` micro-batches.
pub fn to_micro_batches(
    images: &Tensor,
    tokens: &Tensor,
    eos: &Tensor,
    vqa: Option<&TextRows>,
    indices: Vec<u64>,
    device: Device,
    micro: usize,
) -> Result<Vec<Batch>> {
    let move_to = |t: &Tensor| -> Result<Tensor> {
        if device == Device::Cpu {
            Ok(t.shallow_clone())
        } else {
            Ok(t.f_to_device_(device, t.kind(), true, false)?)
        }
    };
    let whole = Batch {
        images: move_to(images)?,
        tokens: move_to(tokens)?,
        eos: move_to(eos)?,
        indices,
        mlm: None,
        vqa: vqa
            .map(|r| -> Result<TextRows> {
                Ok(TextRows {
                    input: move_to(&r.input)?,
                    targets: move_to(&r.targets)?,
                })
            })
            .transpose()?,
    };
    let n = whole.len();
    if micro == 0 || !n.is_multiple_of(micro) {
        return Err(DataError::Loader(format!(
            "{n} samples do not cut into {micro} micro-batches"
        )));
    }
    let per = n / micro;
    (0..micro).map(|m| Ok(whole.slice(m * per, per)?)).collect()
}

fn pin_target(device: Device) -> Option<Device> {
    matches!(device, Device::Cuda(_)).then_some(device)
}

/// The synthetic dataset's steps, rendered ahead on a background thread.
#[derive(Debug)]
pub struct SyntheticSource {
    steps: Receiver<Result<(Batch, SamplerState)>>,
    device: Device,
    place: RankPlace,
    state: SamplerState,
    _stop: StopOnDrop,
}

#[derive(Debug)]
struct StopOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Name of the synthetic sampler's checkpoint piece.
pub const SAMPLER_PIECE: &str = "data.sampler";

impl SyntheticSource {
    /// Starts rendering from `state` (every rank draws the same global batch and renders its
    /// share: samples `d·B/dp .. (d+1)·B/dp`).
    pub fn start(
        data: Dataset,
        train_size: u64,
        global_batch: usize,
        place: RankPlace,
        state: SamplerState,
        device: Device,
        prefetch: usize,
    ) -> Result<SyntheticSource> {
        let DpRank { dp, rank } = place.dp;
        if dp == 0 || !global_batch.is_multiple_of(dp) {
            return Err(DataError::config(
                "train.global_batch",
                format!("{global_batch} samples do not split over dp = {dp}"),
            ));
        }
        let (tx, rx) = bounded(prefetch.max(1));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let pin = pin_target(device);
        let seed = data.seed;
        std::thread::Builder::new()
            .name("weaver-data-synthetic".into())
            .spawn(move || {
                let mut sampler = Sampler::new(seed, train_size, state);
                let per = global_batch / dp;
                loop {
                    let all = sampler.next_indices(global_batch);
                    let mine = &all[rank * per..(rank + 1) * per];
                    let batch = data
                        .batch(Split::Train, mine, Device::Cpu)
                        .map_err(DataError::from)
                        .and_then(|b| pin_batch(b, pin));
                    let failed = batch.is_err();
                    let mut msg = batch.map(|b| (b, sampler.state()));
                    loop {
                        if stop2.load(std::sync::atomic::Ordering::SeqCst) {
                            return;
                        }
                        match tx.send_timeout(msg, Duration::from_millis(100)) {
                            Ok(()) => break,
                            Err(crossbeam_channel::SendTimeoutError::Timeout(m)) => msg = m,
                            Err(_) => return,
                        }
                    }
                    if failed {
                        return;
                    }
                }
            })
            .map_err(|e| DataError::Loader(format!("cannot start a thread: {e}")))?;
        Ok(SyntheticSource {
            steps: rx,
            device,
            place,
            state,
            _stop: StopOnDrop(stop),
        })
    }

    /// Reads the sampler's position from a checkpoint (`data.sampler`: version, epoch,
    /// position).
    pub fn resume_state(read: &mut PieceReader<'_>) -> Result<Option<SamplerState>> {
        let Some(v) = read(SAMPLER_PIECE)? else {
            return Ok(None);
        };
        if v.len() != 3 || v[0] != 1 || v[1] < 0 || v[2] < 0 {
            return Err(DataError::BadPosition {
                piece: SAMPLER_PIECE.into(),
                message: format!("expected [1, epoch, position], got {v:?}"),
            });
        }
        Ok(Some(SamplerState {
            epoch: v[1] as u64,
            position: v[2] as u64,
        }))
    }

    /// The sampler's position after the last step returned.
    pub fn state(&self) -> SamplerState {
        self.state
    }
}

fn pin_batch(b: Batch, pin: Option<Device>) -> Result<Batch> {
    let Some(dev) = pin else { return Ok(b) };
    Ok(Batch {
        images: b.images.f_pin_memory(dev)?,
        tokens: b.tokens.f_pin_memory(dev)?,
        eos: b.eos.f_pin_memory(dev)?,
        indices: b.indices,
        mlm: b.mlm,
        vqa: b.vqa,
    })
}

const STALL: Duration = Duration::from_secs(600);

impl BatchSource for SyntheticSource {
    fn next_step(&mut self) -> Result<StepData> {
        let (b, state) = match self.steps.recv_timeout(STALL) {
            Ok(r) => r?,
            Err(RecvTimeoutError::Timeout) => {
                return Err(DataError::Loader(format!(
                    "no synthetic batch within {STALL:?}"
                )))
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(DataError::Loader("the rendering thread stopped".into()))
            }
        };
        self.state = state;
        let keys = b.indices.iter().map(|i| i.to_string()).collect();
        let micro = to_micro_batches(
            &b.images,
            &b.tokens,
            &b.eos,
            None,
            b.indices,
            self.device,
            self.place.microbatches,
        )?;
        Ok(StepData {
            micro,
            keys,
            stats: DataStats::default(),
        })
    }

    fn position(&self) -> Vec<Piece> {
        // The sampler is global (every rank draws the same indices): one rank writes it.
        if !self.place.writes_position || self.place.dp.rank != 0 {
            return Vec::new();
        }
        vec![(
            SAMPLER_PIECE.into(),
            vec![1, self.state.epoch as i64, self.state.position as i64],
        )]
    }
}

/// WebDataset shards through a [`ShardLoader`].
#[derive(Debug)]
pub struct ShardSource {
    loader: ShardLoader,
    device: Device,
    place: RankPlace,
    taken: u64,
}

impl ShardSource {
    /// Starts this rank's loader, its streams resumed from the checkpoint pieces `read`
    /// finds (a stream without a piece starts at the beginning).
    pub fn start(
        cfg: LoaderConfig,
        place: RankPlace,
        device: Device,
        read: Option<&mut PieceReader<'_>>,
    ) -> Result<ShardSource> {
        crate::order::check_layout(cfg.streams, place.dp.dp, cfg.global_batch)?;
        let mut positions = HashMap::new();
        if let Some(read) = read {
            for s in owned_streams(cfg.streams, place.dp.dp, place.dp.rank) {
                if let Some(v) = read(&StreamPosition::piece_name(s))? {
                    positions.insert(s, StreamPosition::from_i64s(s, &v)?);
                }
            }
        }
        let loader = ShardLoader::start(cfg, place.dp, &positions, pin_target(device))?;
        Ok(ShardSource {
            loader,
            device,
            place,
            taken: 0,
        })
    }

    /// Positions of this rank's streams after the last step returned.
    pub fn positions(&self) -> &[(usize, StreamPosition)] {
        self.loader.positions()
    }
}

impl BatchSource for ShardSource {
    fn next_step(&mut self) -> Result<StepData> {
        let HostStep {
            images,
            tokens,
            eos,
            vqa,
            keys,
            stats,
            ..
        } = self.loader.next_step()?;
        let n = keys.len() as u64;
        let indices = (self.taken..self.taken + n).collect();
        self.taken += n;
        let micro = to_micro_batches(
            &images,
            &tokens,
            &eos,
            vqa.as_ref(),
            indices,
            self.device,
            self.place.microbatches,
        )?;
        Ok(StepData { micro, keys, stats })
    }

    fn position(&self) -> Vec<Piece> {
        if !self.place.writes_position {
            return Vec::new();
        }
        self.loader
            .positions()
            .iter()
            .map(|(s, p)| (StreamPosition::piece_name(*s), p.to_i64s(*s)))
            .collect()
    }
}
