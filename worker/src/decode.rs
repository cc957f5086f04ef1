//! Caption decoding on a tensor- and pipeline-parallel layout (`weaver infer --task
//! caption` with `tp`/`pp > 1`): the key/value-cache decoder of
//! [`weaver_models::model::decode`], its searches unchanged, with the model sharded.
//!
//! - **Tensor parallelism.** Each tensor rank holds its heads' share of every layer and of
//!   the key/value caches; the decode step runs the training forward's collectives
//!   ([`Tape`] over the replica's TP group: the row-parallel projections all-reduced, the
//!   vocabulary-parallel logits placed in the whole vocabulary and summed), so every tensor
//!   rank sees the same logits and takes the same decisions.
//! - **Pipeline parallelism.** Each stage holds its layers (one [`Model`] over its layer
//!   range) and only its text layers' caches. A batch's images go through the image
//!   encoder stage by stage (p2p, the memory the decoder attends to passed on to the stages
//!   that hold multimodal layers); with `prefix` fusion the image prefix runs through the
//!   multimodal layers stage by stage too. Every decode step passes the new positions' text
//!   states from stage to stage (p2p send/recv, under the communicator's timeout); the last
//!   stage turns them into log-probabilities and broadcasts each row's best candidates
//!   (values and token ids: 1 for greedy decoding, `2·beam` for beam search, which is every
//!   candidate either search can pick) to the pipeline group. Every stage then runs the
//!   same search ([`greedy_search`], [`beam_search`]) on the same numbers, so all of them
//!   choose the same tokens and reorder or drop the same rows of their caches, and the
//!   first stage embeds the chosen tokens at the next step.
//! - **Limits.** One chunk per pipeline rank (`parallel.virtual_stages = 1`); the layout is
//!   otherwise free. The searches' decisions equal the single-process decoder's up to the
//!   floating-point differences of the sharded sums (tested: identical tokens on tp = 2 and
//!   pp = 2).

use std::sync::Arc;

use tch::{Device, Kind, Tensor};
use weaver_models::data::Batch;
use weaver_models::model::decode::{
    beam_search, greedy_search, GenerateOptions, Generated, Stepper,
};
use weaver_models::model::{ActField, Acts};
use weaver_models::{Model, ModelError};
use weaver_parallel::comm::Communicator;
use weaver_parallel::tp::Tape;

/// This rank's part of a sharded captioning decoder: its pipeline stage's layers (its
/// tensor-parallel slices).
#[derive(Debug)]
pub struct StagedDecoder {
    model: Model,
    /// The replica's tensor-parallel group (`None`: tp = 1).
    tp: Option<Arc<dyn Communicator>>,
    /// The replica's pipeline group (stage `i` is its rank `i`).
    pp: Arc<dyn Communicator>,
    /// Layers of every stage, in pipeline order.
    stages: Vec<std::ops::Range<usize>>,
    kind: Kind,
    device: Device,
}

type Res<T> = Result<T, ModelError>;

fn comm(e: weaver_parallel::comm::CommError) -> ModelError {
    ModelError::Parallel(format!("caption decoding across the pipeline: {e}"))
}

impl StagedDecoder {
    /// The decoder of pipeline rank `pp.rank()`, holding `model` (the layers
    /// `stages[pp.rank()]`).
    pub fn new(
        model: Model,
        tp: Option<Arc<dyn Communicator>>,
        pp: Arc<dyn Communicator>,
        stages: Vec<std::ops::Range<usize>>,
        kind: Kind,
        device: Device,
    ) -> Res<StagedDecoder> {
        let me = pp.rank();
        if stages.len() != pp.size() || stages.get(me) != Some(&model.layers()) {
            return Err(ModelError::ParamMismatch(format!(
                "pipeline rank {me} of {} holds layers {:?}, but the stages are {stages:?} (one chunk per pipeline rank)",
                pp.size(),
                model.layers()
            )));
        }
        Ok(StagedDecoder {
            model,
            tp,
            pp,
            stages,
            kind,
            device,
        })
    }

    fn stage(&self) -> usize {
        self.pp.rank()
    }

    fn is_last(&self) -> bool {
        self.stage() + 1 == self.pp.size()
    }

    /// The image tensor crossing into stage `s` for `rows` images (its shape), if any.
    fn image_boundary(&self, s: usize, rows: usize) -> Option<Vec<i64>> {
        if s == 0 || s >= self.stages.len() {
            return None;
        }
        Model::boundary_layout(
            self.model.config(),
            self.stages[s].start,
            rows,
            false,
            self.kind,
        )
        .into_iter()
        .find(|(f, _, _)| *f == ActField::Image)
        .map(|(_, shape, _)| shape)
    }

    /// Runs the image encoder across the pipeline on `images` `[B, 3, H, W]` (read on the
    /// first stage only): the memory the decoder attends to, on the stages that need it.
    /// Collective over the pipeline group.
    fn encode(&self, tape: &mut Tape, images: &Tensor) -> Res<Option<Tensor>> {
        let b = images.size()[0];
        let s = self.stage();
        let mut acts = Acts::default();
        if let Some(shape) = self.image_boundary(s, b as usize) {
            let mut t = Tensor::f_empty(shape.as_slice(), (self.kind, self.device))?;
            self.pp.recv(&mut t, s - 1).map_err(comm)?;
            acts.image = Some(t);
        }
        let lv = self.model.config().vision_layers;
        let layers = self.model.layers();
        if layers.start < lv {
            let batch = Batch {
                images: images.shallow_clone(),
                tokens: Tensor::f_zeros([b, 1], (Kind::Int64, self.device))?,
                eos: Tensor::f_zeros([b], (Kind::Int64, self.device))?,
                indices: vec![0; b as usize],
                mlm: None,
                vqa: None,
            };
            let end = layers.end.min(lv);
            self.model
                .forward_until(tape, &mut acts, &batch, false, end)?;
        }
        if self.image_boundary(s + 1, b as usize).is_some() {
            let t = acts
                .image
                .as_ref()
                .ok_or_else(|| ModelError::ParamMismatch("no image tokens to pass on".into()))?;
            self.pp.send(&t.f_contiguous()?, s + 1).map_err(comm)?;
        }
        Ok(if self.model.needs_memory() {
            acts.image
        } else {
            None
        })
    }

    /// Captions of `images` `[B, 3, H, W]` (only the first stage reads them; the others
    /// need their number), greedy or beam search as `opts` says; every rank of the
    /// replica returns the same captions. Collective over the replica (its pipeline and
    /// tensor-parallel groups).
    pub fn generate(&self, images: &Tensor, opts: &GenerateOptions) -> Res<Generated> {
        let cfg = self.model.config();
        if opts.beam == 0 {
            return Err(ModelError::BadConfig {
                key: "beam".into(),
                message: "beam search needs at least 1 beam (1 is greedy decoding)".into(),
            });
        }
        if opts.max_new_tokens + 1 > cfg.max_text_len {
            return Err(ModelError::BadConfig {
                key: "max_new_tokens".into(),
                message: format!(
                    "{} new tokens after BOS do not fit model.max_text_len = {}: use at most {}",
                    opts.max_new_tokens,
                    cfg.max_text_len,
                    cfg.max_text_len - 1
                ),
            });
        }
        tch::no_grad(|| {
            let mut tape = Tape::new(self.tp.clone());
            let memory = self.encode(&mut tape, images)?;
            let n = images.size()[0] as usize;
            let mut stepper = StageStepper {
                dec: self,
                tape,
                memory,
                state: None,
                rows: n as i64,
                capacity: opts.max_new_tokens + 1,
                width: if opts.beam == 1 { 1 } else { 2 * opts.beam },
            };
            if opts.beam == 1 {
                greedy_search(&mut stepper, n, opts)
            } else {
                beam_search(&mut stepper, n, opts)
            }
        })
    }
}

/// One stage as the searches' [`Stepper`].
struct StageStepper<'a> {
    dec: &'a StagedDecoder,
    tape: Tape,
    /// The memory rows (on the stages that need it).
    memory: Option<Tensor>,
    state: Option<weaver_models::model::decode::DecodeState>,
    rows: i64,
    capacity: usize,
    /// Candidates per row the last stage hands out.
    width: usize,
}

impl StageStepper<'_> {
    /// Starts the caches (collective: the prefix states of `prefix` fusion cross stages).
    fn start(&mut self) -> Res<()> {
        let d = self.dec;
        let s = d.stage();
        let cfg = d.model.config();
        let prefix_shape = [self.rows, cfg.memory_len() as i64, cfg.text_width as i64];
        let fusion_prefix = cfg.fusion == weaver_models::config::Fusion::Prefix;
        let first_mm = cfg.vision_layers + cfg.unimodal_layers;
        let layers = d.model.layers();
        let prefix_in = if fusion_prefix && layers.start > first_mm {
            let mut t = Tensor::f_empty(prefix_shape, (d.kind, d.device))?;
            d.pp.recv(&mut t, s - 1).map_err(comm)?;
            Some(t)
        } else {
            None
        };
        let (state, out) = d.model.start_stage_decoding(
            &mut self.tape,
            self.memory.as_ref(),
            prefix_in,
            self.rows,
            self.capacity,
        )?;
        if let Some(x) = out {
            d.pp.send(&x.f_contiguous()?, s + 1).map_err(comm)?;
        }
        self.state = Some(state);
        Ok(())
    }
}

impl Stepper for StageStepper<'_> {
    fn step(&mut self, last: &Tensor) -> Res<Tensor> {
        let d = self.dec;
        let s = d.stage();
        let cfg = d.model.config();
        let lv = cfg.vision_layers;
        if d.model.holds_text() && self.state.is_none() {
            self.start()?;
        }
        let tokens = last.f_unsqueeze(1)?;
        let mut out = None;
        if let Some(state) = self.state.as_mut() {
            let hidden = if d.model.layers().start > lv {
                let shape = [self.rows, 1, cfg.text_width as i64];
                let mut t = Tensor::f_empty(shape, (d.kind, d.device))?;
                d.pp.recv(&mut t, s - 1).map_err(comm)?;
                Some(t)
            } else {
                None
            };
            let y = d
                .model
                .decode_stage_step(&mut self.tape, state, &tokens, hidden.as_ref())?;
            if d.is_last() {
                out = Some(y);
            } else {
                d.pp.send(&y.f_contiguous()?, s + 1).map_err(comm)?;
            }
        }
        // The last stage's best candidates of every row, handed to every stage.
        let v = cfg.vocab_size as i64;
        let w = (self.width as i64).min(v);
        let (mut vals, mut idx) = match out {
            Some(logits) => {
                let lp = logits.f_select(1, 0)?.f_log_softmax(-1, Kind::Float)?;
                let (vals, idx) = lp.f_topk(w, 1, true, true)?;
                (vals.f_contiguous()?, idx.f_contiguous()?)
            }
            None => (
                Tensor::f_empty([self.rows, w], (Kind::Float, d.device))?,
                Tensor::f_empty([self.rows, w], (Kind::Int64, d.device))?,
            ),
        };
        if d.pp.size() > 1 {
            let root = d.pp.size() - 1;
            d.pp.broadcast(&mut vals, root).map_err(comm)?;
            d.pp.broadcast(&mut idx, root).map_err(comm)?;
        }
        let lp = Tensor::f_full([self.rows, v], f64::NEG_INFINITY, (Kind::Float, d.device))?;
        Ok(lp.f_scatter(1, &idx, &vals)?)
    }

    fn select_rows(&mut self, index: &Tensor) -> Res<()> {
        if let Some(m) = &self.memory {
            self.memory = Some(m.f_index_select(0, index)?);
        }
        if let Some(s) = &mut self.state {
            s.select_rows(index)?;
        }
        self.rows = index.size()[0];
        Ok(())
    }

    fn device(&self) -> Device {
        self.dec.device
    }

    fn repeat_images(&mut self, per_image: usize) -> Res<()> {
        let index: Vec<i64> = (0..self.rows)
            .flat_map(|i| std::iter::repeat_n(i, per_image))
            .collect();
        let index = Tensor::f_from_slice(&index)?.f_to_device(self.dec.device)?;
        self.select_rows(&index)
    }
}
