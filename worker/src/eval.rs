//! Held-out evaluation: image→text and text→image recall@1/5/10 over a pool of image-caption
//! pairs with distinct captions, and exact match of greedily decoded captions — on a whole
//! model in one process ([`evaluate`], [`evaluate_weights`]: `weaver eval`, the reference
//! trainer), and on a parallel layout with each rank holding its shard ([`Evaluator`]: what
//! every training rank runs), which gives the same numbers.

use std::time::Instant;

use tch::{Device, Kind, Tensor};
use weaver_models::data::{Batch, Dataset, Split};
use weaver_models::model::decode::GenerateOptions;
use weaver_models::model::Acts;
use weaver_models::nn::{ParamStore, TpPos};
use weaver_models::objectives::{synthetic_qa, Objectives, TextRows};
use weaver_models::Model;
use weaver_parallel::comm::{shard_range, MeshComms, ReduceOp};
use weaver_parallel::mesh::{Coord, ParallelDims};
use weaver_parallel::tp::{NoTp, Tape};

use crate::decode::StagedDecoder;
use crate::error::WorkerError;
use crate::metrics::EvalMetrics;

/// The held-out pool evaluation runs on: the synthetic dataset's held-out split, or the
/// first `eval.pool` samples of the held-out shards (`data.eval_shards`).
#[derive(Debug, Clone)]
pub enum EvalPool {
    /// The synthetic held-out split (its first `eval.pool` pairs with distinct captions).
    Synthetic(Dataset),
    /// WebDataset shards, read in their seeded order with centre crops, no shuffle.
    Shards {
        /// How to read them (`train = false`, one stream; the batch is one chunk).
        cfg: Box<weaver_data::loader::LoaderConfig>,
        /// The tokenizer's dataset (to decode reference captions).
        data: Dataset,
    },
}

/// The chunks of a held-out pool a rank evaluates.
#[derive(Debug)]
pub struct PoolChunks {
    /// Samples of every chunk of the pool, in order.
    pub sizes: Vec<usize>,
    /// The chunks asked for, on the device.
    pub batches: Vec<Batch>,
    /// Their reference captions, row by row.
    pub captions: Vec<String>,
    /// The VQA rows of each chunk asked for (held-out shards read with their questions,
    /// `train.vqa_weight > 0`; empty otherwise: the synthetic pool's questions are made
    /// from the samples).
    pub qa_rows: Vec<TextRows>,
    /// The majority-answer baseline of the held-out shards' questions: the fraction of the
    /// whole pool whose answer is the pool's most frequent one (`None` without questions).
    pub majority: Option<f64>,
}

impl EvalPool {
    /// The pool of `job`: the held-out shards when `data.eval_shards` is set, else the
    /// synthetic held-out split when training on synthetic data; `None`: nothing to
    /// evaluate on (training on shards without held-out shards).
    pub fn for_job(
        job: &weaver_models::JobConfig,
        data: &Dataset,
        local_procs: usize,
    ) -> Result<Option<EvalPool>, WorkerError> {
        use weaver_models::config::DataSource;
        if !job.data.eval_shards.is_empty() {
            let mut cfg = crate::data::loader_config(job, data, local_procs)?;
            cfg.shards = weaver_data::shards::Stores::default()
                .expand("data.eval_shards", &job.data.eval_shards)?;
            cfg.train = false;
            cfg.streams = 1;
            cfg.shuffle_buffer = 1;
            cfg.max_bad_fraction = 1.0;
            cfg.prefetch = 1;
            return Ok(Some(EvalPool::Shards {
                cfg: Box::new(cfg),
                data: data.clone(),
            }));
        }
        Ok((job.data.source == DataSource::Synthetic).then(|| EvalPool::Synthetic(data.clone())))
    }

    /// The pool of `pool` samples cut into chunks of `chunk`; the chunks `which` of them
    /// (a range of chunk numbers) on `device`. Shards: the first `pool` samples in the
    /// shards' seeded order (the same on every rank and at every evaluation), an error if
    /// the shards hold fewer.
    pub fn chunks(
        &self,
        pool: usize,
        chunk: usize,
        device: Device,
        which: impl Fn(usize) -> std::ops::Range<usize>,
    ) -> Result<PoolChunks, WorkerError> {
        let chunk = chunk.max(1);
        match self {
            EvalPool::Synthetic(data) => {
                let indices = data.eval_pool(pool)?;
                let parts: Vec<&[u64]> = indices.chunks(chunk).collect();
                let sizes: Vec<usize> = parts.iter().map(|p| p.len()).collect();
                let mine = which(parts.len());
                let batches = parts[mine.clone()]
                    .iter()
                    .map(|p| Ok(data.batch(Split::Heldout, p, device)?))
                    .collect::<Result<Vec<_>, WorkerError>>()?;
                let captions = parts[mine]
                    .iter()
                    .flat_map(|p| p.iter().map(|&i| data.caption(Split::Heldout, i)))
                    .collect();
                Ok(PoolChunks {
                    sizes,
                    batches,
                    captions,
                    qa_rows: Vec::new(),
                    majority: None,
                })
            }
            EvalPool::Shards { cfg, data } => {
                use weaver_data::source::BatchSource;
                let chunk = chunk.min(pool.max(1));
                let n_chunks = pool / chunk;
                let sizes = vec![chunk; n_chunks];
                let mine = which(n_chunks);
                let mut cfg = (**cfg).clone();
                cfg.global_batch = chunk;
                // With questions, the whole pool is read (the majority answer is the pool's).
                let questions = cfg.qa.is_some();
                let place = weaver_data::source::RankPlace {
                    dp: weaver_data::loader::DpRank { dp: 1, rank: 0 },
                    microbatches: 1,
                    writes_position: false,
                };
                // Every rank reads the pool from its start (the chunks before its own are
                // read and dropped): the pool is small, and it is the same everywhere.
                let mut source = weaver_data::source::ShardSource::start(cfg, place, device, None)?;
                let mut seen = std::collections::HashSet::new();
                let (mut batches, mut captions, mut qa_rows) = (Vec::new(), Vec::new(), Vec::new());
                let tok = data.tokenizer.as_ref();
                let mut answers = std::collections::HashMap::<Vec<i64>, usize>::new();
                let last = if questions { n_chunks } else { mine.end };
                for c in 0..last {
                    let step = source.next_step()?;
                    for k in &step.keys {
                        if !seen.insert(k.clone()) {
                            return Err(WorkerError::Other(format!(
                                "data.eval_shards hold fewer than eval.pool = {pool} samples (sample {k} came round again after {} samples): lower eval.pool",
                                seen.len()
                            )));
                        }
                    }
                    if questions {
                        for b in &step.micro {
                            let rows = b.vqa.as_ref().ok_or_else(|| {
                                WorkerError::Other("held-out shards read without questions".into())
                            })?;
                            let ids = crate::sync::read_i64s(&rows.targets)?;
                            for row in ids.chunks(data.text_len) {
                                let answer: Vec<i64> =
                                    row.iter().copied().filter(|&x| x != tok.pad_id()).collect();
                                *answers.entry(answer).or_default() += 1;
                            }
                        }
                    }
                    if !mine.contains(&c) {
                        continue;
                    }
                    for mut b in step.micro {
                        if let Some(rows) = b.vqa.take() {
                            qa_rows.push(rows);
                        }
                        let t = data.text_len;
                        let ids = crate::sync::read_i64s(&b.tokens)?;
                        for row in ids.chunks(t) {
                            let end = row.iter().position(|&x| x == tok.eos_id()).unwrap_or(t);
                            // Decoded as the greedy captions are (from BOS to EOS).
                            captions.push(tok.decode(&row[..end]));
                        }
                        batches.push(b);
                    }
                }
                let majority = questions.then(|| {
                    answers.values().copied().max().unwrap_or(0) as f64
                        / (n_chunks * chunk).max(1) as f64
                });
                Ok(PoolChunks {
                    sizes,
                    batches,
                    captions,
                    qa_rows,
                    majority,
                })
            }
        }
    }
}
use crate::schedule::ScheduleExecutor;

fn comm_err(e: weaver_parallel::comm::CommError) -> WorkerError {
    WorkerError::Comm(e.to_string())
}

/// Evaluates a whole (single-process) model on the first `pool` held-out pairs, `chunk`
/// samples at a time.
pub fn evaluate(
    model: &Model,
    data: &Dataset,
    pool: usize,
    chunk: usize,
    device: Device,
    step: u64,
) -> Result<EvalMetrics, WorkerError> {
    evaluate_pool(
        model,
        &EvalPool::Synthetic(data.clone()),
        data,
        pool,
        chunk,
        device,
        step,
    )
}

/// [`evaluate`] on the held-out pool `source` (`data` gives the tokenizer).
pub fn evaluate_pool(
    model: &Model,
    source: &EvalPool,
    data: &Dataset,
    pool: usize,
    chunk: usize,
    device: Device,
    step: u64,
) -> Result<EvalMetrics, WorkerError> {
    let started = Instant::now();
    let chunk = chunk.max(1);
    let (mut image_embs, mut text_embs) = (Vec::new(), Vec::new());
    let mut exact = 0usize;
    // A model without a decoder (CLIP) captions nothing: its exact-match rate is 0.
    let captions = model.config().multimodal_layers > 0;
    let chunks = source.chunks(pool, chunk, device, |n| 0..n)?;
    let n: usize = chunks.sizes.iter().sum();
    tch::no_grad(|| -> Result<(), WorkerError> {
        let mut refs = chunks.captions.iter();
        for batch in &chunks.batches {
            let (ie, te) = model.embeddings(batch)?;
            image_embs.push(ie);
            text_embs.push(te);
            let wanted: Vec<&String> = refs.by_ref().take(batch.len()).collect();
            if !captions {
                continue;
            }
            let decoded = greedy_captions(model, data, &batch.images)?;
            exact += decoded.iter().zip(wanted).filter(|(d, w)| *d == *w).count();
        }
        Ok(())
    })?;
    let ie = Tensor::f_cat(&image_embs, 0)?;
    let te = Tensor::f_cat(&text_embs, 0)?;
    let sim = ie.f_matmul(&te.f_tr()?)?;
    let r = crate::sync::read_f64s(&recalls(&sim)?)?;
    Ok(EvalMetrics {
        eval: true,
        step,
        i2t_r1: r[0],
        t2i_r1: r[3],
        i2t_r5: r[1],
        i2t_r10: r[2],
        t2i_r5: r[4],
        t2i_r10: r[5],
        caption_exact: exact as f64 / n.max(1) as f64,
        vqa_acc: None,
        vqa_majority: None,
        pool: n,
        eval_time_s: started.elapsed().as_secs_f64(),
    })
}

/// Only the VQA rows (the held-out questions of the evaluation).
const VQA_ONLY: Objectives = Objectives {
    mlm: None,
    vqa: true,
};

/// Training samples whose answers decide the majority answer.
const MAJORITY_SAMPLES: u64 = 10_000;

/// The majority-answer baseline on the held-out samples `indices`: the fraction whose
/// answer is the most frequent answer of the first [`MAJORITY_SAMPLES`] training samples
/// (what a model that ignores image and question would score at best, in expectation).
pub fn majority_baseline(data: &Dataset, indices: &[u64]) -> Result<f64, WorkerError> {
    let mut counts = std::collections::BTreeMap::<String, u64>::new();
    for i in 0..MAJORITY_SAMPLES {
        *counts
            .entry(synthetic_qa(data, Split::Train, i).1)
            .or_default() += 1;
    }
    let majority = counts
        .iter()
        .max_by_key(|(_, &n)| n)
        .map(|(a, _)| a.clone())
        .ok_or_else(|| WorkerError::Other("no training answers".into()))?;
    let hits = indices
        .iter()
        .filter(|&&i| synthetic_qa(data, Split::Heldout, i).1 == majority)
        .count();
    Ok(hits as f64 / indices.len().max(1) as f64)
}

/// VQA accuracy of a whole (single-process) model on the held-out pool's questions, and
/// the majority-answer baseline on them: `(accuracy, baseline)`.
pub fn evaluate_vqa(
    model: &Model,
    data: &Dataset,
    pool: usize,
    chunk: usize,
    device: Device,
) -> Result<(f64, f64), WorkerError> {
    evaluate_vqa_pool(
        model,
        &EvalPool::Synthetic(data.clone()),
        data,
        pool,
        chunk,
        device,
    )
}

/// [`evaluate_vqa`] on the held-out pool `source`: the synthetic split's questions, or the
/// questions and answers of the held-out shards (the baseline then is the pool's own
/// majority answer).
pub fn evaluate_vqa_pool(
    model: &Model,
    source: &EvalPool,
    data: &Dataset,
    pool: usize,
    chunk: usize,
    device: Device,
) -> Result<(f64, f64), WorkerError> {
    let chunks = source.chunks(pool, chunk, device, |n| 0..n)?;
    let n: usize = chunks.sizes.iter().sum();
    let mut hits = 0f64;
    tch::no_grad(|| -> Result<(), WorkerError> {
        for (i, part) in chunks.batches.iter().enumerate() {
            let mut batch = part.slice(0, part.len())?;
            batch.vqa = chunks
                .qa_rows
                .get(i)
                .map(|r| r.slice(0, part.len() as i64))
                .transpose()?;
            let synthetic = matches!(source, EvalPool::Synthetic(_));
            VQA_ONLY.attach(&mut batch, data, Split::Heldout, synthetic)?;
            let mut acts = Acts::default();
            model.forward(&mut NoTp, &mut acts, &batch, false)?;
            hits += model
                .vqa_correct(&mut NoTp, &acts, &batch, false)?
                .f_sum(Kind::Double)?
                .f_double_value(&[])?;
        }
        Ok(())
    })?;
    let majority = match chunks.majority {
        Some(m) => m,
        None => majority_baseline(data, &data.eval_pool(pool)?)?,
    };
    Ok((hits / n.max(1) as f64, majority))
}

/// Retrieval recall at 1, 5 and 10 from the similarity matrix `sim` `[N, N]` of images
/// (rows) and texts (columns), pair `i` the truth of row and column `i`: image→text
/// (r@1, r@5, r@10), then text→image, as an f64 tensor `[6]` on `sim`'s device. A query's
/// hit at `k`: fewer than `k` candidates score strictly higher than its pair.
pub fn recalls(sim: &Tensor) -> Result<Tensor, WorkerError> {
    let diag = sim.f_diagonal(0, 0, 1)?;
    // Candidates above the true pair, per image (row) and per text (column).
    let above_i2t = sim.f_gt_tensor(&diag.f_unsqueeze(1)?)?.f_sum_dim_intlist(
        [1i64].as_slice(),
        false,
        Kind::Int64,
    )?;
    let above_t2i = sim.f_gt_tensor(&diag.f_unsqueeze(0)?)?.f_sum_dim_intlist(
        [0i64].as_slice(),
        false,
        Kind::Int64,
    )?;
    let mut out = Vec::with_capacity(6);
    for above in [&above_i2t, &above_t2i] {
        for k in [1i64, 5, 10] {
            out.push(
                above
                    .f_lt(k)?
                    .f_to_kind(Kind::Double)?
                    .f_mean(Kind::Double)?
                    .f_reshape([1])?,
            );
        }
    }
    Ok(Tensor::f_cat(&out, 0)?)
}

/// Builds the whole model of `job` on `device` with the global parameters `named` and
/// evaluates it (what rank 0 does with the gathered model, and `weaver eval`).
pub fn evaluate_weights(
    job: &weaver_models::JobConfig,
    named: &[(String, Tensor)],
    device: Device,
    step: u64,
) -> Result<EvalMetrics, WorkerError> {
    let mut job = job.clone();
    job.train.device = match device {
        Device::Cuda(k) => format!("cuda:{k}"),
        _ => "cpu".into(),
    };
    let mut built = crate::train::build(&job)?;
    let named: Vec<(String, Tensor)> = named
        .iter()
        .map(|(n, t)| {
            Ok((
                n.clone(),
                t.f_to_kind(built.store.kind)?.f_to_device(device)?,
            ))
        })
        .collect::<Result<_, tch::TchError>>()?;
    built.store.load_local(&named)?;
    let source = EvalPool::for_job(&job, &built.data, 1)?.ok_or_else(|| {
        WorkerError::Other(
            "nothing to evaluate on: the job trains on shards (data.source = \"shards\") and names no held-out shards; set data.eval_shards".into(),
        )
    })?;
    let mut m = evaluate_pool(
        &built.model,
        &source,
        &built.data,
        job.eval.pool,
        job.micro_batch_size(),
        device,
        step,
    )?;
    if job.train.vqa_weight > 0.0 {
        let (acc, majority) = evaluate_vqa_pool(
            &built.model,
            &source,
            &built.data,
            job.eval.pool,
            job.micro_batch_size(),
            device,
        )?;
        m.vqa_acc = Some(acc);
        m.vqa_majority = Some(majority);
    }
    Ok(m)
}

/// Greedy captions for `images`: from BOS, the most likely next token until EOS or the
/// pool's text length, decoded with the key/value cache ([`Model::generate`]: the image
/// encoder runs once, each step runs the text layers on the new position only; the tests
/// in `weaver_models::model::decode` hold it to [`Model::greedy_reference`], the plain
/// rerun of the whole model at every position that evaluation used before).
pub fn greedy_captions(
    model: &Model,
    data: &Dataset,
    images: &Tensor,
) -> Result<Vec<String>, WorkerError> {
    let tok = data.tokenizer.as_ref();
    let opts = GenerateOptions::greedy(data.text_len - 1, tok.bos_id(), tok.eos_id());
    let g = model.generate(&mut NoTp, images, &opts)?;
    Ok(g.tokens.iter().map(|ids| tok.decode(ids)).collect())
}

/// Evaluation on the layout: every rank runs its own shard of the model, forward only, with
/// the schedule executor (tensor parallelism inside each stage, activations between stages),
/// and only embeddings, next tokens and scores travel, on the communicators' device. The
/// held-out pool is cut into the chunks a single process evaluates (`chunk` samples each),
/// and the chunks are split over the data-parallel replicas, so every layout computes the
/// single process's numbers from the same per-chunk computations.
///
/// - Retrieval: each replica's last stage keeps the normalised embeddings of its chunks;
///   the replicas all-gather them (padded to equal rows) and compute recall@1/5/10 both ways
///   over the whole pool.
/// - Captioning: greedy decoding of each chunk with the key/value cache
///   ([`StageCaptioning`]: this rank's stage as one model sharing the trainer's parameters,
///   decoded across the replica's pipeline and tensor-parallel groups as `weaver infer`
///   does, [`StagedDecoder`]), the captions [`greedy_captions`] gives in one process. On an
///   interleaved layout (several chunks per pipeline rank) without the cache: one pipeline
///   forward of all the replica's chunks per position; the last stage picks the next tokens
///   (with tensor parallelism, the argmax over the vocabulary shards: each rank's best
///   value and index, all-gathered, the first maximum kept as `argmax` does) and broadcasts
///   them, with the finished flags, to the stages before it, which embed them in the next
///   forward. Exact matches are counted on the last stage and summed over the replicas.
/// - The three numbers are broadcast from the last stage over the pipeline group, so every
///   rank returns the same metrics.
#[derive(Debug)]
pub struct Evaluator {
    data: Dataset,
    pool: usize,
    chunk: usize,
    device: Device,
    comms: MeshComms,
    dims: ParallelDims,
    coord: Coord,
    embed_dim: i64,
    /// Whether the model has a decoder to caption with.
    captions: bool,
    /// Whether VQA accuracy is measured (`train.vqa_weight > 0`).
    vqa: bool,
    /// The held-out pool (the synthetic held-out split unless [`Evaluator::set_pool`]).
    source: EvalPool,
    /// Captioning with the key/value cache on the layout (one chunk per pipeline rank;
    /// without it, the cache-less pipeline forward per position of [`Evaluator::greedy`]).
    stage: Option<StageCaptioning>,
}

/// This rank's pipeline stage as one model over its layers (its tensor-parallel slices),
/// sharing the trainer's parameters, in a [`StagedDecoder`]: the layout evaluator's
/// captioning with the key/value cache, as `weaver infer` decodes on a layout.
#[derive(Debug)]
pub struct StageCaptioning {
    cfg: weaver_models::ModelConfig,
    lora: Option<weaver_models::lora::LoraSpec>,
    /// Layers of every stage, in pipeline order (one chunk per pipeline rank).
    stages: Vec<std::ops::Range<usize>>,
    tp: TpPos,
    pad_id: i64,
    kind: Kind,
    /// Built at the first evaluation: the stage model's own store of placeholders (its
    /// tensors rebound to the trainer's at every evaluation) and the decoder holding the
    /// model.
    built: Option<(ParamStore, StagedDecoder)>,
}

impl StageCaptioning {
    /// The stage decoding of a rank holding `stages[pp]` of the model `cfg` (one chunk per
    /// pipeline rank), its tensor-parallel position `tp`, its parameters in `kind`, LoRA
    /// adapters as `lora` says (the trainer's store's, so that the names match).
    pub fn new(
        cfg: weaver_models::ModelConfig,
        lora: Option<weaver_models::lora::LoraSpec>,
        stages: Vec<std::ops::Range<usize>>,
        tp: TpPos,
        pad_id: i64,
        kind: Kind,
    ) -> StageCaptioning {
        StageCaptioning {
            cfg,
            lora,
            stages,
            tp,
            pad_id,
            kind,
            built: None,
        }
    }

    /// The decoder over the trainer's current parameters `params`: built the first time
    /// (the stage's model over placeholder parameters, [`ParamStore::placeholders`]: no
    /// memory, no initial values), then each of its parameters made to share the trainer's
    /// tensor of the same name (`set_data`: no copy; the optimizer's updates are seen by
    /// reference, and a trainer that moved its parameters since is followed).
    fn decoder(
        &mut self,
        params: &ParamStore,
        comms: &MeshComms,
        dims: ParallelDims,
        pp: usize,
        device: Device,
    ) -> Result<&StagedDecoder, WorkerError> {
        if self.built.is_none() {
            let mut store = ParamStore::placeholders(device, self.kind);
            store.set_lora(self.lora.clone());
            let range = self.stages.get(pp).cloned().ok_or_else(|| {
                WorkerError::Layout(format!("no stage {pp} in {:?}", self.stages))
            })?;
            let model = Model::new(&mut store, &self.cfg, range, self.tp, self.pad_id)?;
            let tp = (dims.tp > 1).then(|| comms.tp.clone());
            let decoder = StagedDecoder::new(
                model,
                tp,
                comms.pp.clone(),
                self.stages.clone(),
                self.kind,
                device,
            )?;
            self.built = Some((store, decoder));
        }
        let (store, decoder) = self
            .built
            .as_mut()
            .ok_or_else(|| WorkerError::Other("the stage decoder was not built".into()))?;
        for p in store.params() {
            let src = params.get(&p.name).ok_or_else(|| {
                WorkerError::Other(format!(
                    "captioning on the layout: the trainer has no parameter {}",
                    p.name
                ))
            })?;
            if src.size() != p.tensor.size() || src.kind() != p.tensor.kind() {
                return Err(WorkerError::Other(format!(
                    "captioning on the layout: {} is {:?} {:?} in the trainer but {:?} {:?} in the stage's decoder",
                    p.name,
                    src.size(),
                    src.kind(),
                    p.tensor.size(),
                    p.tensor.kind()
                )));
            }
            p.tensor.shallow_clone().set_data(src);
        }
        Ok(decoder)
    }
}

impl Evaluator {
    /// The evaluator of the rank at `coord` in `dims`: `pool` held-out pairs of `data` in
    /// chunks of `chunk`, on `device`, for a model whose contrastive embeddings have
    /// `embed_dim` dimensions and that captions when `captions` (it has a decoder).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        data: Dataset,
        pool: usize,
        chunk: usize,
        embed_dim: usize,
        captions: bool,
        device: Device,
        comms: MeshComms,
        dims: ParallelDims,
        coord: Coord,
    ) -> Evaluator {
        Evaluator {
            source: EvalPool::Synthetic(data.clone()),
            data,
            pool,
            chunk: chunk.max(1),
            device,
            comms,
            dims,
            coord,
            embed_dim: embed_dim as i64,
            captions,
            vqa: false,
            stage: None,
        }
    }

    /// Captions with the key/value cache on the layout ([`StageCaptioning`]; for layouts
    /// with one chunk per pipeline rank).
    pub fn with_stage_captioning(mut self, stage: Option<StageCaptioning>) -> Evaluator {
        self.stage = stage;
        self
    }

    /// Also measures VQA accuracy on the pool's questions (`train.vqa_weight > 0`; the
    /// synthetic split's, or those of the held-out shards' samples): one more forward-only
    /// pass of the pool with its question/answer rows, each replica its chunks; the last stage counts the exact greedy answers
    /// ([`Model::vqa_correct`], its argmax across the tensor-parallel group), the replicas'
    /// counts are summed and broadcast over the pipeline.
    pub fn with_vqa(mut self, vqa: bool) -> Evaluator {
        self.vqa = vqa;
        self
    }

    /// Held-out questions answered exactly over the whole pool (see [`Evaluator::with_vqa`]);
    /// `qa_rows` are the held-out shards' rows of each chunk (empty: the synthetic
    /// questions). Collective over the world.
    fn vqa_hits(
        &self,
        exec: &mut ScheduleExecutor,
        batches: &[Batch],
        qa_rows: &[TextRows],
    ) -> Result<f64, WorkerError> {
        let with_rows = batches
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let mut q = b.slice(0, b.len())?;
                q.vqa = qa_rows
                    .get(i)
                    .map(|r| r.slice(0, b.len() as i64))
                    .transpose()?;
                let synthetic = matches!(self.source, EvalPool::Synthetic(_));
                VQA_ONLY.attach(&mut q, &self.data, Split::Heldout, synthetic)?;
                Ok(q)
            })
            .collect::<Result<Vec<_>, WorkerError>>()?;
        let tp = (self.dims.tp > 1).then(|| self.comms.tp.clone());
        let mut hits = Tensor::f_zeros([1], (Kind::Double, self.device))?;
        exec.forward_only(&with_rows, &mut |_, model, acts, batch| {
            let mut tape = Tape::new(tp.clone());
            let right = model.vqa_correct(&mut tape, acts, batch, false)?;
            hits = hits.f_add(&right.f_sum(Kind::Double)?)?;
            Ok(())
        })?;
        if self.last_stage() && self.dims.dp > 1 {
            self.comms
                .dp
                .all_reduce(&mut hits, ReduceOp::Sum)
                .map_err(comm_err)?;
        }
        if self.dims.pp > 1 {
            self.comms
                .pp
                .broadcast(&mut hits, self.dims.pp - 1)
                .map_err(comm_err)?;
        }
        Ok(crate::sync::read_f64s(&hits)?[0])
    }

    /// Evaluates on `source` (held-out shards) instead of the synthetic held-out split.
    pub fn set_pool(&mut self, source: EvalPool) {
        self.source = source;
    }

    fn last_stage(&self) -> bool {
        self.coord.pp + 1 == self.dims.pp
    }

    /// Samples of the chunks data-parallel replica `d` evaluates.
    fn rows_of(&self, parts: usize, sizes: &[usize], d: usize) -> usize {
        let r = shard_range(parts, self.dims.dp, d);
        sizes[r].iter().sum()
    }

    /// Evaluates the weights `exec` runs (the parameters of `params`), after step `step`.
    /// Collective over the world.
    pub fn evaluate(
        &mut self,
        exec: &mut ScheduleExecutor,
        params: &ParamStore,
        step: u64,
    ) -> Result<EvalMetrics, WorkerError> {
        let started = Instant::now();
        let (dp, dp_rank) = (self.dims.dp, self.coord.dp);
        let PoolChunks {
            sizes,
            batches,
            captions: references,
            qa_rows,
            majority,
        } = self
            .source
            .chunks(self.pool, self.chunk, self.device, |n| {
                shard_range(n, dp, dp_rank)
            })?;
        let n_parts = sizes.len();
        let pool_len: usize = sizes.iter().sum();
        let rows: usize = batches.iter().map(|b| b.len()).sum();

        // Retrieval embeddings.
        let mut embs: Vec<Option<(Tensor, Tensor)>> = (0..batches.len()).map(|_| None).collect();
        exec.forward_only(&batches, &mut |mb, _, acts, _| {
            let take = |t: &Option<Tensor>, what: &str| {
                t.as_ref().map(|t| t.shallow_clone()).ok_or_else(|| {
                    WorkerError::Other(format!("the last stage has no {what} to evaluate"))
                })
            };
            embs[mb] = Some((
                take(&acts.image_emb, "image embedding")?,
                take(&acts.text_emb, "text embedding")?,
            ));
            Ok(())
        })?;

        // A model without a decoder (CLIP) captions nothing: its exact-match rate is 0.
        let captions = self.captions;
        let decoded = if captions {
            self.captions_of(exec, params, &batches)?
        } else {
            Vec::new()
        };

        // Recall at 1, 5, 10 both ways, then the exact captions.
        let mut scores = Tensor::f_zeros([7], (Kind::Double, self.device))?;
        if self.last_stage() {
            // Exact matches of this replica's captions.
            let mut exact = 0usize;
            if rows > 0 && captions {
                if decoded.len() != references.len() {
                    return Err(WorkerError::Other(format!(
                        "{} captions decoded for {} references",
                        decoded.len(),
                        references.len()
                    )));
                }
                exact = decoded
                    .iter()
                    .zip(&references)
                    .filter(|(d, w)| d == w)
                    .count();
            }
            let mut count = Tensor::f_from_slice(&[exact as f64])?.f_to_device(self.device)?;
            if self.dims.dp > 1 {
                self.comms
                    .dp
                    .all_reduce(&mut count, ReduceOp::Sum)
                    .map_err(comm_err)?;
            }
            // Embeddings of the whole pool: each replica's rows, padded to the largest.
            let max_rows = (0..self.dims.dp)
                .map(|d| self.rows_of(n_parts, &sizes, d))
                .max()
                .unwrap_or(0);
            let e = self.embed_dim;
            let local = Tensor::f_zeros([max_rows as i64, 2 * e], (Kind::Float, self.device))?;
            if rows > 0 {
                let (ie, te): (Vec<Tensor>, Vec<Tensor>) = embs
                    .into_iter()
                    .map(|x| {
                        x.ok_or_else(|| WorkerError::Other("a chunk was not evaluated".into()))
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .into_iter()
                    .unzip();
                let mine = Tensor::f_cat(&[Tensor::f_cat(&ie, 0)?, Tensor::f_cat(&te, 0)?], 1)?;
                local.f_narrow(0, 0, rows as i64)?.f_copy_(&mine)?;
            }
            let full = if self.dims.dp > 1 {
                let mut all = Tensor::f_zeros(
                    [(self.dims.dp * max_rows) as i64, 2 * e],
                    (Kind::Float, self.device),
                )?;
                self.comms
                    .dp
                    .all_gather(&local, &mut all)
                    .map_err(comm_err)?;
                let pieces = (0..self.dims.dp)
                    .map(|d| {
                        all.f_narrow(
                            0,
                            (d * max_rows) as i64,
                            self.rows_of(n_parts, &sizes, d) as i64,
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Tensor::f_cat(&pieces, 0)?
            } else {
                local
            };
            let ie = full.f_narrow(1, 0, e)?;
            let te = full.f_narrow(1, e, e)?;
            let sim = ie.f_matmul(&te.f_tr()?)?;
            scores = Tensor::f_cat(&[recalls(&sim)?, count], 0)?;
        }
        if self.dims.pp > 1 {
            self.comms
                .pp
                .broadcast(&mut scores, self.dims.pp - 1)
                .map_err(comm_err)?;
        }
        let v = crate::sync::read_f64s(&scores)?;
        let vqa = if self.vqa {
            let hits = self.vqa_hits(exec, &batches, &qa_rows)?;
            let majority = match majority {
                Some(m) => m,
                None => majority_baseline(&self.data, &self.data.eval_pool(self.pool)?)?,
            };
            Some((hits, majority))
        } else {
            None
        };
        Ok(EvalMetrics {
            eval: true,
            step,
            i2t_r1: v[0],
            t2i_r1: v[3],
            i2t_r5: v[1],
            i2t_r10: v[2],
            t2i_r5: v[4],
            t2i_r10: v[5],
            caption_exact: v[6] / pool_len.max(1) as f64,
            vqa_acc: vqa.map(|(hits, _)| hits / pool_len.max(1) as f64),
            vqa_majority: vqa.map(|(_, majority)| majority),
            pool: pool_len,
            eval_time_s: started.elapsed().as_secs_f64(),
        })
    }

    /// The next token of each row from this rank's vocabulary logits `[B, V/tp]`: the
    /// argmax over the whole vocabulary (with tensor parallelism, each rank's best value and
    /// global index are all-gathered and the first maximum wins, as `argmax` picks it).
    fn vocab_argmax(&self, logits: &Tensor) -> Result<Tensor, WorkerError> {
        let tp = self.dims.tp;
        if tp == 1 {
            return Ok(logits.f_argmax(-1, false)?);
        }
        let (vals, idx) = logits.f_max_dim(-1, false)?;
        let v_local = logits.size()[1];
        let packed = Tensor::f_stack(
            &[
                vals.f_to_kind(Kind::Double)?,
                idx.f_add_scalar(self.coord.tp as i64 * v_local)?
                    .f_to_kind(Kind::Double)?,
            ],
            1,
        )?;
        let b = packed.size()[0];
        let mut all = Tensor::f_zeros([tp as i64 * b, 2], (Kind::Double, self.device))?;
        self.comms
            .tp
            .all_gather(&packed, &mut all)
            .map_err(comm_err)?;
        let all = all.f_view([tp as i64, b, 2])?;
        let best = all.f_select(2, 0)?.f_argmax(0, false)?;
        Ok(all
            .f_select(2, 1)?
            .f_gather(0, &best.f_unsqueeze(0)?, false)?
            .f_squeeze_dim(0)?
            .f_to_kind(Kind::Int64)?)
    }

    /// Greedy captions of `batches` (this replica's chunks), decoded, in row order, the same
    /// on every stage: with the key/value cache chunk by chunk as [`greedy_captions`]
    /// decodes them ([`StageCaptioning`]), or on a layout with several chunks per pipeline
    /// rank by [`Evaluator::greedy`]. Collective over the replica.
    fn captions_of(
        &mut self,
        exec: &mut ScheduleExecutor,
        params: &ParamStore,
        batches: &[Batch],
    ) -> Result<Vec<String>, WorkerError> {
        let data = self.data.clone();
        let tok = data.tokenizer.as_ref();
        let (comms, dims, pp, device) = (self.comms.clone(), self.dims, self.coord.pp, self.device);
        if let Some(stage) = self.stage.as_mut() {
            let decoder = stage.decoder(params, &comms, dims, pp, device)?;
            let opts = GenerateOptions::greedy(data.text_len - 1, tok.bos_id(), tok.eos_id());
            let mut out = Vec::new();
            for b in batches {
                let g = decoder.generate(&b.images, &opts)?;
                out.extend(g.tokens.iter().map(|ids| tok.decode(ids)));
            }
            return Ok(out);
        }
        let tokens = self.greedy(exec, batches)?;
        let mut out = Vec::new();
        if tokens.is_empty() {
            return Ok(out);
        }
        let t = data.text_len;
        let ids = crate::sync::read_i64s(&Tensor::f_cat(&tokens, 0)?)?;
        for row in ids.chunks(t) {
            let end = row.iter().position(|&x| x == tok.eos_id()).unwrap_or(t);
            out.push(tok.decode(&row[..end]));
        }
        Ok(out)
    }

    /// Greedy captions of `batches` (this replica's chunks) without a cache, for layouts
    /// with several chunks per pipeline rank: one pipeline forward of every chunk per
    /// position; the last stage picks the next tokens and broadcasts them (finished rows
    /// get padding) to the stages before it. Returns each chunk's tokens `[B, T]`, the same
    /// on every stage.
    fn greedy(
        &self,
        exec: &mut ScheduleExecutor,
        batches: &[Batch],
    ) -> Result<Vec<Tensor>, WorkerError> {
        let tok = self.data.tokenizer.as_ref();
        let t = self.data.text_len as i64;
        let dev = self.device;
        let (mut tokens, mut done, mut eos) = (Vec::new(), Vec::new(), Vec::new());
        for b in batches {
            let n = b.len() as i64;
            let x = Tensor::f_full([n, t], tok.pad_id(), (Kind::Int64, dev))?;
            let _ = x.f_narrow(1, 0, 1)?.f_fill_(tok.bos_id())?;
            tokens.push(x);
            done.push(Tensor::f_zeros([n], (Kind::Bool, dev))?);
            eos.push(Tensor::f_zeros([n], (Kind::Int64, dev))?);
        }
        let rows: i64 = batches.iter().map(|b| b.len() as i64).sum();
        if rows == 0 {
            return Ok(tokens);
        }
        for pos in 0..t - 1 {
            let step_batches: Vec<Batch> = batches
                .iter()
                .zip(tokens.iter().zip(&eos))
                .map(|(b, (x, e))| Batch {
                    images: b.images.shallow_clone(),
                    tokens: x.shallow_clone(),
                    eos: e.shallow_clone(),
                    indices: b.indices.clone(),
                    mlm: None,
                    vqa: None,
                })
                .collect();
            let mut next: Vec<Option<Tensor>> = (0..batches.len()).map(|_| None).collect();
            exec.forward_only(&step_batches, &mut |mb, model, acts, _| {
                let logits = model.head_logits(acts)?;
                next[mb] = Some(self.vocab_argmax(&logits.f_select(1, pos)?)?);
                Ok(())
            })?;
            let mut msg = if self.last_stage() {
                let mut chosen = Vec::with_capacity(batches.len());
                for (n, d) in next.iter_mut().zip(&done) {
                    let n = n.take().ok_or_else(|| {
                        WorkerError::Other("the last stage decoded no tokens for a chunk".into())
                    })?;
                    let pad = n.f_full_like(tok.pad_id())?;
                    chosen.push(pad.f_where_self(d, &n)?);
                }
                Tensor::f_cat(&chosen, 0)?
            } else {
                Tensor::f_zeros([rows], (Kind::Int64, dev))?
            };
            if self.dims.pp > 1 {
                self.comms
                    .pp
                    .broadcast(&mut msg, self.dims.pp - 1)
                    .map_err(comm_err)?;
            }
            let mut off = 0i64;
            for (x, d) in tokens.iter().zip(done.iter_mut()) {
                let b = x.size()[0];
                let n = msg.f_narrow(0, off, b)?;
                x.f_narrow(1, pos + 1, 1)?.f_copy_(&n.f_unsqueeze(1)?)?;
                *d = d.f_logical_or(&n.f_eq(tok.eos_id())?)?;
                off += b;
            }
            let finished = Tensor::f_cat(&done, 0)?.f_all()?;
            if crate::sync::read_i64s(&finished)?[0] != 0 {
                break;
            }
        }
        Ok(tokens)
    }
}
