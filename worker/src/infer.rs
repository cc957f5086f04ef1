//! Sharded batch inference (`[infer]`, `weaver infer`): embeddings or captions of every
//! sample of a set of input shards, written to object storage, resumable shard by shard.
//!
//! - **Work unit: a whole input shard.** The input shards (the WebDataset shards of
//!   `data.shards`, or `infer.synthetic_shards` synthetic "shards" of `infer.shard_size`
//!   held-out samples) are dealt to the data-parallel replicas round-robin in config order:
//!   shard `i` to replica `i mod dp`. A replica reads its shards whole, in order.
//! - **Model sharding.** With `tp = pp = 1` each replica holds the whole model, loaded by
//!   [`weaver_compress::load`] (float or INT8 checkpoints). With `tp`/`pp > 1` each rank
//!   builds its layers' tensor-parallel part from the checkpoint (each rank reads only its
//!   slices): embeddings run the training schedule executor's forward-only pipeline,
//!   captions the sharded key/value-cache decoder ([`crate::decode::StagedDecoder`], one
//!   stage per pipeline rank: `parallel.virtual_stages = 1`); the last stage's tensor rank
//!   0 writes the outputs.
//! - **Outputs**, under `infer.out`, one object per input shard `NAME` (the shard's file
//!   name without `.tar`, or `synthetic-00003`): `NAME.safetensors` with `image_emb` and
//!   `text_emb` (`[n, E]` f32, L2-normalised) and the samples' keys in order in the header's
//!   `__metadata__.keys` (a JSON array); or `NAME.jsonl` with one `{"key", "caption"}` line
//!   per sample. `_infer.json` records what the job computes (checkpoint, task, decoding).
//! - **Progress**: after a shard's output is written (durably: the local store fsyncs, an
//!   object store acknowledges the whole object), `_progress/NAME.json` is created with a
//!   create-only put. A shard with a marker is never computed again: a killed or preempted
//!   job, run again with the same `infer.out`, continues with the shards that have none. An
//!   output without a marker is a shard cut short, and is overwritten. `_infer.json` of
//!   another computation (other weights, task or decoding) in the same `infer.out` is refused.
//! - **Bad samples** (an image that does not decode, embeddings of a sample without a
//!   caption) are left out under the loader's policy, `data.max_bad_fraction`, applied per
//!   input shard (the unit of work, so the outcome does not depend on the layout or on what
//!   an earlier run committed): each is logged with the shard's URL and its key, recorded in
//!   the shard's marker (`skipped`: key and reason) and counted (`bad_samples` in the
//!   shard's report, `infer_bad_samples` in the summary). A shard with more bad samples
//!   than the bound allows, or one that cannot be read as an archive, fails with
//!   [`InferError::BadInput`] naming the shard and the samples. An output location that
//!   cannot be written fails with [`InferError::Output`] naming the object, before any
//!   shard is computed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};
use tracing::{info, warn};
use weaver_checkpoint::{block_on, Checkpoint, CkptStore};
use weaver_config::infer::{InferSection, InferTask, StopToken};
use weaver_data::image::{center_crop, decode_into, Normalizer, Resampler, Rgb};
use weaver_data::sample::{Fields, Grouper};
use weaver_data::shards::{ReadPolicy, Shard, ShardReader, Stores};
use weaver_data::tar::TarReader;
use weaver_models::config::{Backend, DataSource};
use weaver_models::data::{Batch, Dataset, Split};
use weaver_models::device::compute_kind;
use weaver_models::model::decode::GenerateOptions;
use weaver_models::model::LossWeights;
use weaver_models::tokenizer::encode_padded;
use weaver_models::{JobConfig, Model};
use weaver_parallel::comm::{mesh_groups, Communicator, MeshComms, ReduceOp};
use weaver_parallel::mesh::{Coord, ParallelDims};
use weaver_parallel::pp::Schedule;
use weaver_parallel::tp::{NoTp, TpPos};

use crate::decode::StagedDecoder;
use crate::error::WorkerError;
use crate::parallel::Plan;
use crate::schedule::{Chunk, ExecutorConfig, ScheduleExecutor};

/// The object recording what an output location holds.
pub const JOB_OBJECT: &str = "_infer.json";
/// The folder of the per-shard progress markers.
pub const PROGRESS_DIR: &str = "_progress";
/// Micro-batches a pipelined forward takes at once.
const PIPELINE_BATCHES: usize = 8;

/// Everything inference can fail with; each variant names what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InferError {
    /// An input shard cannot be read, or holds a sample that cannot be used.
    #[error("input shard {shard}: {message}")]
    BadInput {
        /// The shard's URL.
        shard: String,
        /// What is wrong (the sample's key, where there is one).
        message: String,
    },
    /// An output object cannot be written or read.
    #[error("output {object}: {message} (check infer.out: it must be writable)")]
    Output {
        /// The object.
        object: String,
        /// What the store said.
        message: String,
    },
    /// A setting does not fit (the key to change is named).
    #[error("{key}: {message}")]
    Config {
        /// The config key (`infer.out`, `parallel.tp`, ...).
        key: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// Loading the weights failed.
    #[error(transparent)]
    Load(#[from] weaver_compress::CompressError),
    /// The model, the tokenizer or the config.
    #[error(transparent)]
    Model(#[from] weaver_models::ModelError),
    /// A tensor operation.
    #[error("tensor operation failed: {0}")]
    Torch(#[from] tch::TchError),
    /// Listing or opening the input shards.
    #[error(transparent)]
    Data(#[from] weaver_data::DataError),
    /// Opening the checkpoint or the output store.
    #[error(transparent)]
    Checkpoint(#[from] weaver_checkpoint::CheckpointError),
    /// A collective failed (a lost peer).
    #[error("communication failed: {0}")]
    Comm(String),
    /// The pipeline (schedule executor) failed.
    #[error(transparent)]
    Worker(#[from] WorkerError),
}

impl From<InferError> for WorkerError {
    fn from(e: InferError) -> WorkerError {
        match e {
            InferError::Worker(w) => w,
            InferError::Comm(m) => WorkerError::Comm(m),
            InferError::Model(m) => WorkerError::Model(m),
            e => WorkerError::Other(e.to_string()),
        }
    }
}

impl From<weaver_models::ConfigError> for InferError {
    fn from(e: weaver_models::ConfigError) -> Self {
        InferError::Model(e.into())
    }
}

fn comm_err(e: weaver_parallel::comm::CommError) -> InferError {
    InferError::Comm(e.to_string())
}

/// One input shard.
#[derive(Debug, Clone)]
pub struct Input {
    /// Its output name (`NAME.safetensors`, `_progress/NAME.json`).
    pub name: String,
    /// Where its samples come from.
    pub source: InputSource,
}

/// Where an input shard's samples come from.
#[derive(Debug, Clone)]
pub enum InputSource {
    /// A WebDataset shard.
    Shard(Shard),
    /// Held-out synthetic samples `first..first + len`.
    Synthetic {
        /// The first sample index.
        first: u64,
        /// Samples.
        len: u64,
    },
}

impl Input {
    /// The shard's URL (synthetic: its name).
    pub fn url(&self) -> String {
        match &self.source {
            InputSource::Shard(s) => s.url.clone(),
            InputSource::Synthetic { .. } => self.name.clone(),
        }
    }
}

/// The input shards of `job`, in config order, with unique names.
pub fn inputs(job: &JobConfig) -> Result<Vec<Input>, InferError> {
    let inf = &job.file.infer;
    let list = match job.data.source {
        DataSource::Synthetic => (0..inf.synthetic_shards as u64)
            .map(|k| Input {
                name: format!("synthetic-{k:05}"),
                source: InputSource::Synthetic {
                    first: k * inf.shard_size as u64,
                    len: inf.shard_size as u64,
                },
            })
            .collect(),
        DataSource::Shards => Stores::default()
            .expand("data.shards", &job.data.shards)?
            .into_iter()
            .map(|s| {
                let base = s.url.rsplit('/').next().unwrap_or(&s.url).to_string();
                let name = base.strip_suffix(".tar").unwrap_or(&base).to_string();
                Input {
                    name,
                    source: InputSource::Shard(s),
                }
            })
            .collect::<Vec<_>>(),
    };
    let mut seen = BTreeMap::new();
    for i in &list {
        if let Some(other) = seen.insert(i.name.clone(), i.url()) {
            return Err(InferError::Config {
                key: "data.shards".into(),
                message: format!(
                    "{} and {} have the same file name {:?}: the outputs are named after it, so input shard names must be unique",
                    other,
                    i.url(),
                    i.name
                ),
            });
        }
    }
    Ok(list)
}

/// The input shards replica `dp_rank` of `dp` computes (shard `i` goes to replica `i mod dp`).
pub fn shards_of(inputs: &[Input], dp: usize, dp_rank: usize) -> Vec<Input> {
    inputs
        .iter()
        .enumerate()
        .filter(|(i, _)| i % dp.max(1) == dp_rank)
        .map(|(_, s)| s.clone())
        .collect()
}

/// An input shard's samples, ready to batch.
#[derive(Debug)]
pub struct ShardSamples {
    /// Keys, in shard order.
    pub keys: Vec<String>,
    /// `[n, 3, S, S]` f32, CLIP-normalised, centre crops.
    pub images: Tensor,
    /// `[n, T]` int64 caption tokens (BOS, words, EOS, padding).
    pub tokens: Tensor,
    /// `[n]` int64 EOS positions.
    pub eos: Tensor,
    /// The samples left out (bad, within `data.max_bad_fraction`), in shard order.
    pub skipped: Vec<SkippedSample>,
}

/// A sample of an input shard that inference left out.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SkippedSample {
    /// The sample's key.
    pub key: String,
    /// Why (the image does not decode, there is no caption, ...).
    pub reason: String,
}

impl ShardSamples {
    /// Rows `start..start + len` as a batch on `device`.
    pub fn batch(&self, start: usize, len: usize, device: Device) -> Result<Batch, InferError> {
        let (s, l) = (start as i64, len as i64);
        Ok(Batch {
            images: self.images.f_narrow(0, s, l)?.f_to_device(device)?,
            tokens: self.tokens.f_narrow(0, s, l)?.f_to_device(device)?,
            eos: self.eos.f_narrow(0, s, l)?.f_to_device(device)?,
            indices: (start as u64..(start + len) as u64).collect(),
            mlm: None,
            vqa: None,
        })
    }
}

/// Reads an input shard whole: every sample decoded, centre-cropped and resized to the
/// model's image side, normalised (the evaluation loader's preprocessing), its caption
/// tokenised. Embeddings need the captions; captioning does not (`need_caption = false`).
pub fn read_input(
    input: &Input,
    job: &JobConfig,
    data: &Dataset,
    need_caption: bool,
) -> Result<ShardSamples, InferError> {
    let shard = match &input.source {
        InputSource::Synthetic { first, len } => {
            let idx: Vec<u64> = (*first..first + len).collect();
            let b = data.batch(Split::Heldout, &idx, Device::Cpu)?;
            return Ok(ShardSamples {
                keys: idx.iter().map(|i| format!("{i:08}")).collect(),
                images: b.images,
                tokens: b.tokens,
                eos: b.eos,
                skipped: Vec::new(),
            });
        }
        InputSource::Shard(s) => s,
    };
    let bad = |message: String| InferError::BadInput {
        shard: shard.url.clone(),
        message,
    };
    let d = &job.data;
    let policy = ReadPolicy {
        retries: d.retries,
        backoff: Duration::from_millis(d.retry_backoff_ms),
        timeout: Duration::from_secs(d.timeout_s),
    };
    let fields = Fields::new(&d.image_key, &d.caption_key, &d.caption_field);
    let reader = ShardReader::open(shard, 0, policy).map_err(|e| bad(e.to_string()))?;
    let mut samples = Grouper::new(TarReader::new(reader, 0));
    let s = job.model.image_size;
    let t = job.model.max_text_len;
    let tok = data.tokenizer.as_ref();
    let (mut resampler, normalizer) = (Resampler::new(), Normalizer::clip());
    let mut rgb = Rgb {
        width: 0,
        height: 0,
        pixels: Vec::new(),
    };
    let mut square = vec![0u8; 3 * s * s];
    let (mut keys, mut pixels, mut tokens, mut eos) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut skipped = Vec::new();
    while let Some(raw) = samples.next() {
        let at = |m: String| bad(format!("sample {}: {m}", raw.key));
        if raw.lost_members > 0 {
            return Err(at(format!(
                "{} unreadable tar member(s) before it: the shard is corrupt",
                raw.lost_members
            )));
        }
        // A bad sample (its image does not decode, embeddings without a caption) is left
        // out and recorded; the shard's bound is checked below.
        let usable = (|| -> Result<String, String> {
            let bytes = fields.image(&raw).map_err(|e| e.to_string())?;
            decode_into(bytes, &mut rgb).map_err(|e| format!("image: {e}"))?;
            resampler
                .crop_resize(&rgb, center_crop(rgb.width, rgb.height), s, &mut square)
                .map_err(|e| format!("image: {e}"))?;
            match fields.caption(&raw) {
                Ok(c) => Ok(c),
                Err(e) if need_caption => Err(e.to_string()),
                Err(_) => Ok(String::new()),
            }
        })();
        let caption = match usable {
            Ok(c) => c,
            Err(reason) => {
                warn!(shard = %shard.url, key = %raw.key, %reason, "skipping a bad sample");
                skipped.push(SkippedSample {
                    key: raw.key,
                    reason,
                });
                continue;
            }
        };
        pixels.extend(normalizer.to_chw(&square));
        let ids = encode_padded(tok, &caption, t)?;
        let e = ids.iter().position(|&x| x == tok.eos_id()).unwrap_or(t - 1);
        tokens.extend(ids);
        eos.push(e as i64);
        keys.push(raw.key);
    }
    if let Some(e) = samples.failure.take() {
        return Err(bad(format!("the archive ends early: {e}")));
    }
    let lost = samples.take_lost();
    if lost > 0 {
        return Err(bad(format!("{lost} unreadable tar member(s) at its end")));
    }
    let seen = keys.len() + skipped.len();
    let limit = job.data.max_bad_fraction;
    if !skipped.is_empty() && skipped.len() as f64 > limit * seen as f64 {
        let first: Vec<String> = skipped
            .iter()
            .take(5)
            .map(|k| format!("{} ({})", k.key, k.reason))
            .collect();
        return Err(bad(format!(
            "{} of {seen} samples are bad ({:.1}% > data.max_bad_fraction = {:.1}%): {}",
            skipped.len(),
            100.0 * skipped.len() as f64 / seen as f64,
            100.0 * limit,
            first.join(", ")
        )));
    }
    if keys.is_empty() {
        return Err(bad("no usable samples in it".into()));
    }
    let n = keys.len() as i64;
    Ok(ShardSamples {
        keys,
        images: Tensor::f_from_slice(&pixels)?.f_view([n, 3, s as i64, s as i64])?,
        tokens: Tensor::f_from_slice(&tokens)?.f_view([n, t as i64])?,
        eos: Tensor::f_from_slice(&eos)?,
        skipped,
    })
}

/// Encodes embeddings and their keys as one safetensors file: `image_emb`, `text_emb`
/// (`[n, E]` f32, little-endian) and `__metadata__.keys` (the keys as a JSON array).
pub fn encode_embeddings(
    keys: &[String],
    image: &Tensor,
    text: &Tensor,
    extra: &[(&str, String)],
) -> Result<Vec<u8>, InferError> {
    let mut meta = serde_json::Map::new();
    meta.insert(
        "keys".into(),
        serde_json::Value::String(serde_json::to_string(keys).map_err(|e| InferError::Config {
            key: "keys".into(),
            message: e.to_string(),
        })?),
    );
    for (k, v) in extra {
        meta.insert((*k).into(), serde_json::Value::String(v.clone()));
    }
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::Value::Object(meta));
    let mut body = Vec::new();
    for (name, t) in [("image_emb", image), ("text_emb", text)] {
        let t = t
            .f_to_kind(Kind::Float)?
            .f_to_device(Device::Cpu)?
            .f_contiguous()?;
        let values = Vec::<f32>::try_from(&t.f_flatten(0, -1)?)?;
        let start = body.len();
        for v in values {
            body.extend_from_slice(&v.to_le_bytes());
        }
        header.insert(
            name.into(),
            serde_json::json!({
                "dtype": "F32",
                "shape": t.size(),
                "data_offsets": [start, body.len()],
            }),
        );
    }
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + body.len());
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Embeddings read back from [`encode_embeddings`]'s format: `(keys, image_emb, text_emb)`.
pub fn decode_embeddings(bytes: &[u8]) -> Result<(Vec<String>, Tensor, Tensor), String> {
    let n = u64::from_le_bytes(
        bytes
            .get(..8)
            .ok_or("shorter than a safetensors header")?
            .try_into()
            .map_err(|_| "bad header length")?,
    ) as usize;
    let header: serde_json::Value = serde_json::from_slice(
        bytes
            .get(8..8 + n)
            .ok_or("the header runs past the end of the file")?,
    )
    .map_err(|e| format!("the header is not JSON: {e}"))?;
    let keys: Vec<String> = header["__metadata__"]["keys"]
        .as_str()
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or("no __metadata__.keys")?;
    let data = &bytes[8 + n..];
    let tensor = |name: &str| -> Result<Tensor, String> {
        let h = &header[name];
        let shape: Vec<i64> = serde_json::from_value(h["shape"].clone())
            .map_err(|e| format!("{name}: shape: {e}"))?;
        let off: Vec<usize> = serde_json::from_value(h["data_offsets"].clone())
            .map_err(|e| format!("{name}: data_offsets: {e}"))?;
        let raw = data
            .get(off[0]..off[1])
            .ok_or(format!("{name}: data past the end"))?;
        let v: Vec<f32> = raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Tensor::f_from_slice(&v)
            .and_then(|t| t.f_view(shape.as_slice()))
            .map_err(|e| e.to_string())
    };
    Ok((keys, tensor("image_emb")?, tensor("text_emb")?))
}

/// A progress marker's contents (`_progress/NAME.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Marker {
    /// The input shard's name.
    pub name: String,
    /// The input shard's URL.
    pub input: String,
    /// The output object (relative to `infer.out`).
    pub output: String,
    /// Samples written.
    pub samples: usize,
    /// When the marker was written (milliseconds since the Unix epoch).
    pub written_unix_ms: u128,
    /// The world rank that wrote it.
    pub rank: usize,
    /// The samples left out as bad (`data.max_bad_fraction`), in shard order: they have
    /// no row in the output.
    #[serde(default)]
    pub skipped: Vec<SkippedSample>,
}

/// What one finished (or skipped) input shard reports.
#[derive(Debug, Clone)]
pub struct ShardDone {
    /// The input shard's name.
    pub name: String,
    /// Samples in it (0 when skipped).
    pub samples: usize,
    /// Already committed by an earlier run: not computed again.
    pub skipped: bool,
    /// Seconds it took (read, compute, write).
    pub seconds: f64,
    /// Bad samples left out of its output (recorded in its marker).
    pub bad_samples: usize,
}

/// How an inference rank ended.
#[derive(Debug, Clone, Default, Serialize)]
pub struct InferSummary {
    /// Input shards of the whole job.
    pub shards: usize,
    /// Shards this replica computed and committed now.
    pub computed: usize,
    /// Shards this replica found committed by an earlier run.
    pub skipped: usize,
    /// Samples this replica computed.
    pub samples: usize,
    /// Bad samples this replica left out (each recorded in its shard's marker).
    pub bad_samples: usize,
    /// Seconds.
    pub wall_s: f64,
    /// Stopped early (SIGTERM, the coordinator): committed shards stay committed.
    pub stopped: bool,
}

/// The model part this rank runs.
enum Engine {
    /// The whole model (tp = pp = 1).
    Whole(Box<Model>),
    /// This rank's stages, forward-only through the pipeline.
    Layout(Box<ScheduleExecutor>),
    /// This rank's stage as one model, decoding captions across the layout.
    Staged(Box<StagedDecoder>),
}

/// One rank of an inference job.
pub struct InferRank {
    job: JobConfig,
    data: Dataset,
    engine: Engine,
    comms: MeshComms,
    dims: ParallelDims,
    coord: Coord,
    rank: usize,
    device: Device,
    out: CkptStore,
    inputs: Vec<Input>,
    generate: Option<GenerateOptions>,
}

impl std::fmt::Debug for InferRank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InferRank")
            .field("rank", &self.rank)
            .field("coord", &self.coord)
            .field("out", &self.out.url())
            .finish()
    }
}

/// The decoding options of `[infer]` for a model with text length `max_text_len`.
pub fn generate_options(
    inf: &InferSection,
    max_text_len: usize,
    data: &Dataset,
) -> Result<GenerateOptions, InferError> {
    let tok = data.tokenizer.as_ref();
    let max_new = if inf.max_new_tokens == 0 {
        max_text_len.saturating_sub(1)
    } else {
        inf.max_new_tokens
    };
    Ok(GenerateOptions {
        max_new_tokens: max_new,
        beam: inf.beam,
        length_penalty: inf.length_penalty,
        stop_token: match inf.stop_token()? {
            StopToken::Eos => Some(tok.eos_id()),
            StopToken::None => None,
            StopToken::Id(id) => Some(id),
        },
        bos: tok.bos_id(),
        cache: true,
    })
}

impl InferRank {
    /// Builds the rank of `world` for the inference job `job` (`[infer]` set): loads its
    /// part of the checkpoint, lists the input shards, checks the output location.
    /// Collective over the world (the pipeline links are opened).
    pub fn new(job: &JobConfig, world: Arc<dyn Communicator>) -> Result<InferRank, InferError> {
        let inf = job.file.infer.clone();
        if !inf.enabled() {
            return Err(InferError::Config {
                key: "infer.checkpoint".into(),
                message: "not an inference job: name the weights to run".into(),
            });
        }
        let ckpt = block_on(Checkpoint::open_url(&inf.checkpoint))?;
        // The model comes from the checkpoint's own config (a pruned or imported model).
        let job = weaver_compress::load::job_for(&ckpt, job)?;
        let rank = world.rank();
        let plan = Plan::new(&job, world.size())?;
        let (dims, coord) = (plan.dims, plan.dims.coord(rank));
        if inf.task == InferTask::Caption && plan.chunks > 1 {
            return Err(InferError::Config {
                key: "parallel.virtual_stages".into(),
                message: format!(
                    "infer.task = \"caption\" decodes with one pipeline stage per rank; this layout has {} chunks per rank: set parallel.virtual_stages = 1",
                    plan.chunks
                ),
            });
        }
        if inf.task == InferTask::Caption && job.model.multimodal_layers == 0 {
            return Err(InferError::Config {
                key: "infer.task".into(),
                message: format!(
                    "the model (flavor {}) has no multimodal decoder to caption with: use infer.task = \"embed\"",
                    job.model.flavor
                ),
            });
        }
        crate::train::configure_threads(job.train.threads, 1);
        let device = weaver_models::device::parse_device(&job.train.device)?;
        weaver_models::device::check_device(device)?;
        let kind = compute_kind(&job.train.dtype, device)?;
        world.set_timeout(Duration::from_secs(job.parallel.init_timeout_s));
        let comms = mesh_groups(world.as_ref(), &dims).map_err(comm_err)?;
        if job.parallel.backend == Backend::Tcp && world.size() > 1 {
            crate::parallel::connect_pipeline(comms.pp.as_ref()).map_err(comm_err)?;
        }
        let data = crate::train::dataset(&job)?;
        let tp_pos = TpPos {
            rank: coord.tp,
            size: dims.tp,
        };
        let engine = if dims.tp == 1 && dims.pp == 1 {
            let opts = weaver_compress::LoadOptions {
                device,
                kind,
                ..weaver_compress::LoadOptions::cpu()
            };
            let loaded = weaver_compress::load_checkpoint(&ckpt, &job, &opts)?;
            Engine::Whole(Box::new(loaded.model))
        } else if inf.task == InferTask::Caption {
            // This stage's layers as one model (its tensor-parallel slices), decoding
            // across the layout.
            let opts = weaver_compress::LoadOptions {
                device,
                kind,
                layers: Some(plan.stages[coord.pp].clone()),
                tp: tp_pos,
            };
            let loaded = weaver_compress::load_checkpoint(&ckpt, &job, &opts)?;
            let tp_comm = (dims.tp > 1).then(|| comms.tp.clone());
            Engine::Staged(Box::new(StagedDecoder::new(
                loaded.model,
                tp_comm,
                comms.pp.clone(),
                plan.stages.clone(),
                kind,
                device,
            )?))
        } else {
            let tp = tp_pos;
            let p = dims.pp;
            let mut chunks = Vec::with_capacity(plan.chunks);
            for c in 0..plan.chunks {
                let vs = c * p + coord.pp;
                let mut layers = Vec::new();
                for i in plan.stages[vs].clone() {
                    let opts = weaver_compress::LoadOptions {
                        device,
                        kind,
                        layers: Some(i..i + 1),
                        tp,
                    };
                    let loaded = weaver_compress::load_checkpoint(&ckpt, &job, &opts)?;
                    layers.push((i, loaded.model));
                }
                chunks.push(Chunk { vs, layers });
            }
            let schedule = Schedule::new(plan.kind, p, 1, plan.chunks)
                .map_err(|e| WorkerError::Layout(e.to_string()))?;
            Engine::Layout(Box::new(ScheduleExecutor::new(
                ExecutorConfig {
                    model: job.model.clone(),
                    stages: plan.stages.clone(),
                    pp_rank: coord.pp,
                    pp_size: p,
                    weights: LossWeights {
                        itc: 1.0,
                        caption: 0.0,
                        itm: 0.0,
                        mlm: 0.0,
                        vqa: 0.0,
                    },
                    kind,
                    device,
                    cut_layers: false,
                    recompute: job.parallel.recompute,
                    // Forward-only: only training passes split the sequence.
                    sequence_parallel: false,
                },
                chunks,
                schedule,
                comms.pp.clone(),
                comms.tp.clone(),
            )))
        };
        let generate = (inf.task == InferTask::Caption)
            .then(|| generate_options(&inf, job.model.max_text_len, &data))
            .transpose()?;
        let out = CkptStore::open(&inf.out)?;
        let inputs = inputs(&job)?;
        let me = InferRank {
            job,
            data,
            engine,
            comms,
            dims,
            coord,
            rank,
            device,
            out,
            inputs,
            generate,
        };
        me.claim_output(&ckpt.url())?;
        Ok(me)
    }

    /// The job (with the checkpoint's model).
    pub fn job(&self) -> &JobConfig {
        &self.job
    }

    /// Whether this rank writes its replica's outputs (the last stage's tensor rank 0).
    pub fn writes(&self) -> bool {
        self.coord.pp + 1 == self.dims.pp && self.coord.tp == 0
    }

    /// Input shards of the whole job.
    pub fn inputs(&self) -> &[Input] {
        &self.inputs
    }

    fn output_name(&self, input: &Input) -> String {
        match self.job.file.infer.task {
            InferTask::Embed => format!("{}.safetensors", input.name),
            InferTask::Caption => format!("{}.jsonl", input.name),
        }
    }

    fn out_err(&self, rel: &str, e: impl std::fmt::Display) -> InferError {
        InferError::Output {
            object: self.out.display(&self.out.path(rel)),
            message: e.to_string(),
        }
    }

    /// Records what this output location holds (`_infer.json`, create-only), or checks that
    /// the record there is of this computation. Fails early on a location that cannot be
    /// written.
    fn claim_output(&self, checkpoint: &str) -> Result<(), InferError> {
        let inf = &self.job.file.infer;
        let mut want = serde_json::json!({
            "checkpoint": checkpoint,
            "task": inf.task.name(),
            "data": match self.job.data.source {
                DataSource::Synthetic => format!("synthetic ({} x {})", inf.synthetic_shards, inf.shard_size),
                DataSource::Shards => self.job.data.shards.clone(),
            },
        });
        if inf.task == InferTask::Caption {
            want["beam"] = inf.beam.into();
            want["max_new_tokens"] = inf.max_new_tokens.into();
            want["length_penalty"] = inf.length_penalty.into();
            want["stop"] = inf.stop.clone().into();
        }
        let path = self.out.path(JOB_OBJECT);
        let store = self.out.object_store().clone();
        let body = serde_json::to_vec_pretty(&want).map_err(|e| self.out_err(JOB_OBJECT, e))?;
        let created = block_on_store(async {
            store
                .put_opts(
                    &path,
                    PutPayload::from(body),
                    PutOptions {
                        mode: PutMode::Create,
                        ..Default::default()
                    },
                )
                .await
        });
        match created {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => {
                let got = block_on_store(async { store.get(&path).await?.bytes().await })
                    .map_err(|e| self.out_err(JOB_OBJECT, e))?;
                let have: serde_json::Value =
                    serde_json::from_slice(&got).map_err(|e| self.out_err(JOB_OBJECT, e))?;
                if have != want {
                    return Err(InferError::Config {
                        key: "infer.out".into(),
                        message: format!(
                            "{} holds the outputs of another inference ({have}), not of this one ({want}): choose another infer.out, or delete it to start over",
                            self.out.url()
                        ),
                    });
                }
                Ok(())
            }
            Err(e) => Err(self.out_err(JOB_OBJECT, e)),
        }
    }

    /// Whether `input` has its progress marker.
    pub fn is_committed(&self, input: &Input) -> Result<bool, InferError> {
        let rel = format!("{PROGRESS_DIR}/{}.json", input.name);
        let path = self.out.path(&rel);
        let store = self.out.object_store().clone();
        match block_on_store(async { store.head(&path).await }) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.out_err(&rel, e)),
        }
    }

    /// Whether any rank of this replica was asked to stop (collective over the replica's
    /// pipeline and tensor-parallel groups, so that they stop at the same shard).
    fn agree_stop(&self, mine: bool) -> Result<bool, InferError> {
        if self.dims.tp == 1 && self.dims.pp == 1 {
            return Ok(mine);
        }
        let mut flag = Tensor::f_from_slice(&[i64::from(mine)])?.f_to_device(self.device)?;
        for g in [&self.comms.tp, &self.comms.pp] {
            if g.size() > 1 {
                g.all_reduce(&mut flag, ReduceOp::Max).map_err(comm_err)?;
            }
        }
        Ok(crate::sync::read_i64s(&flag)?[0] != 0)
    }

    /// Computes this replica's input shards that have no marker yet, committing each, in
    /// order; `stop()` is asked between shards; `done` hears of every shard (computed or
    /// skipped). Collective over the replica.
    pub fn run(
        &mut self,
        stop: &dyn Fn() -> bool,
        done: &mut dyn FnMut(&ShardDone),
    ) -> Result<InferSummary, InferError> {
        let started = Instant::now();
        let mine = shards_of(&self.inputs, self.dims.dp, self.coord.dp);
        let mut s = InferSummary {
            shards: self.inputs.len(),
            ..InferSummary::default()
        };
        info!(
            rank = self.rank,
            coord = %self.coord,
            task = self.job.file.infer.task.name(),
            shards = mine.len(),
            of = self.inputs.len(),
            out = %self.out.url(),
            "inference: this replica's input shards"
        );
        for input in &mine {
            if self.agree_stop(stop())? {
                s.stopped = true;
                break;
            }
            if self.is_committed(input)? {
                info!(shard = %input.name, "already committed by an earlier run: skipped");
                s.skipped += 1;
                done(&ShardDone {
                    name: input.name.clone(),
                    samples: 0,
                    skipped: true,
                    seconds: 0.0,
                    bad_samples: 0,
                });
                continue;
            }
            let t0 = Instant::now();
            let (n, bad) = self.compute(input)?;
            let seconds = t0.elapsed().as_secs_f64();
            info!(shard = %input.name, samples = n, bad_samples = bad, seconds, "input shard committed");
            s.computed += 1;
            s.samples += n;
            s.bad_samples += bad;
            done(&ShardDone {
                name: input.name.clone(),
                samples: n,
                skipped: false,
                seconds,
                bad_samples: bad,
            });
        }
        s.wall_s = started.elapsed().as_secs_f64();
        Ok(s)
    }

    /// Computes one input shard and (on the writing rank) writes its output, then its
    /// marker. Returns its samples and its bad samples (left out).
    fn compute(&mut self, input: &Input) -> Result<(usize, usize), InferError> {
        let task = self.job.file.infer.task;
        let samples = read_input(input, &self.job, &self.data, task == InferTask::Embed)?;
        let n = samples.keys.len();
        let nbad = samples.skipped.len();
        let bs = self.job.file.infer.batch;
        let ranges: Vec<(usize, usize)> = (0..n).step_by(bs).map(|s| (s, bs.min(n - s))).collect();
        let body = match task {
            InferTask::Embed => {
                let (ie, te) = self.embed(&samples, &ranges)?;
                if !self.writes() {
                    return Ok((n, nbad));
                }
                encode_embeddings(
                    &samples.keys,
                    &ie,
                    &te,
                    &[
                        ("input", input.url()),
                        ("checkpoint", self.job.file.infer.checkpoint.clone()),
                    ],
                )?
            }
            InferTask::Caption => {
                let captions = self.caption(&samples, &ranges)?;
                if !self.writes() {
                    return Ok((n, nbad));
                }
                let mut out = Vec::new();
                for (k, c) in samples.keys.iter().zip(&captions) {
                    let line = serde_json::json!({"key": k, "caption": c});
                    out.extend_from_slice(line.to_string().as_bytes());
                    out.push(b'\n');
                }
                out
            }
        };
        let rel = self.output_name(input);
        let store = self.out.object_store().clone();
        let path = self.out.path(&rel);
        block_on_store(async { store.put(&path, PutPayload::from(body)).await })
            .map_err(|e| self.out_err(&rel, e))?;
        let marker = Marker {
            name: input.name.clone(),
            input: input.url(),
            output: rel,
            samples: n,
            written_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0),
            rank: self.rank,
            skipped: samples.skipped.clone(),
        };
        let mrel = format!("{PROGRESS_DIR}/{}.json", input.name);
        let mpath = self.out.path(&mrel);
        let mbody = serde_json::to_vec(&marker).map_err(|e| self.out_err(&mrel, e))?;
        let put = block_on_store(async {
            store
                .put_opts(
                    &mpath,
                    PutPayload::from(mbody),
                    PutOptions {
                        mode: PutMode::Create,
                        ..Default::default()
                    },
                )
                .await
        });
        match put {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) => {
                warn!(shard = %input.name, "another worker committed this shard first; its output was written again with the same values");
            }
            Err(e) => return Err(self.out_err(&mrel, e)),
        }
        Ok((n, nbad))
    }

    /// Normalised image and text embeddings of the shard (on the writing rank; empty
    /// elsewhere).
    fn embed(
        &mut self,
        samples: &ShardSamples,
        ranges: &[(usize, usize)],
    ) -> Result<(Tensor, Tensor), InferError> {
        let device = self.device;
        let (mut ie, mut te) = (Vec::new(), Vec::new());
        match &mut self.engine {
            Engine::Staged(_) => {
                return Err(InferError::Config {
                    key: "infer.task".into(),
                    message: "the staged decoder computes captions, not embeddings".into(),
                })
            }
            Engine::Whole(model) => {
                for &(s, l) in ranges {
                    let batch = samples.batch(s, l, device)?;
                    let (i, t) = tch::no_grad(|| model.embeddings(&batch))?;
                    ie.push(i.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?);
                    te.push(t.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?);
                }
            }
            Engine::Layout(exec) => {
                for group in ranges.chunks(PIPELINE_BATCHES) {
                    let batches = group
                        .iter()
                        .map(|&(s, l)| samples.batch(s, l, device))
                        .collect::<Result<Vec<_>, _>>()?;
                    let mut got: Vec<Option<(Tensor, Tensor)>> =
                        (0..batches.len()).map(|_| None).collect();
                    exec.forward_only(&batches, &mut |mb, _, acts, _| {
                        let take = |t: &Option<Tensor>, what: &str| {
                            t.as_ref().map(|t| t.shallow_clone()).ok_or_else(|| {
                                WorkerError::Other(format!("the last stage has no {what}"))
                            })
                        };
                        got[mb] = Some((
                            take(&acts.image_emb, "image embedding")?,
                            take(&acts.text_emb, "text embedding")?,
                        ));
                        Ok(())
                    })?;
                    for (i, t) in got.into_iter().flatten() {
                        ie.push(i.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?);
                        te.push(t.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?);
                    }
                }
            }
        }
        if ie.is_empty() {
            let e = Tensor::f_zeros([0], (Kind::Float, Device::Cpu))?;
            return Ok((e.shallow_clone(), e));
        }
        Ok((Tensor::f_cat(&ie, 0)?, Tensor::f_cat(&te, 0)?))
    }

    /// Captions of the shard's images, batched, with the key/value cache.
    fn caption(
        &mut self,
        samples: &ShardSamples,
        ranges: &[(usize, usize)],
    ) -> Result<Vec<String>, InferError> {
        let opts = self.generate.clone().ok_or_else(|| InferError::Config {
            key: "infer.task".into(),
            message: "no decoding options".into(),
        })?;
        let tok = self.data.tokenizer.as_ref();
        let mut out = Vec::with_capacity(samples.keys.len());
        for &(s, l) in ranges {
            let images = samples
                .images
                .f_narrow(0, s as i64, l as i64)?
                .f_to_device(self.device)?;
            let g = match &self.engine {
                Engine::Whole(model) => model.generate(&mut NoTp, &images, &opts)?,
                Engine::Staged(dec) => dec.generate(&images, &opts)?,
                Engine::Layout(_) => {
                    return Err(InferError::Config {
                        key: "infer.task".into(),
                        message: "the forward-only pipeline computes embeddings, not captions"
                            .into(),
                    })
                }
            };
            out.extend(g.tokens.iter().map(|ids| tok.decode(ids)));
        }
        Ok(out)
    }
}

/// Runs an object-store future on the checkpoint crate's I/O runtime.
fn block_on_store<T>(
    fut: impl std::future::Future<Output = Result<T, object_store::Error>>,
) -> Result<T, object_store::Error> {
    match block_on(async { Ok::<_, weaver_checkpoint::CheckpointError>(fut.await) }) {
        Ok(r) => r,
        Err(e) => Err(object_store::Error::Generic {
            store: "weaver",
            source: Box::new(std::io::Error::other(e.to_string())),
        }),
    }
}

/// A whole inference job in this process (`weaver infer` without workers): the world of
/// one rank.
pub fn run_solo(
    job: &JobConfig,
    stop: &dyn Fn() -> bool,
    done: &mut dyn FnMut(&ShardDone),
) -> Result<InferSummary, InferError> {
    let device = weaver_models::device::parse_device(&job.train.device)?;
    let world: Arc<dyn Communicator> = Arc::new(weaver_parallel::comm::SoloComm::on(device));
    let job = crate::parallel::collapse(job.clone());
    let mut rank = InferRank::new(&job, world)?;
    rank.run(stop, done)
}
