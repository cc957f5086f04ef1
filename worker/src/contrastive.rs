//! The contrastive loss over the global batch (`train.contrastive = "global"`), as open_clip
//! trains CLIP and CoCa: each sample's negatives are all the other samples of the step, on
//! every data-parallel rank and in every micro-batch, not only those of its micro-batch.
//!
//! Two mechanisms of open_clip, fitted to the pipeline:
//!
//! - **Gather with gradient** (open_clip's `gather_with_grad`): a micro-batch's image and text
//!   embeddings are all-gathered over the data-parallel group with their graph. tch has no
//!   custom autograd functions, so the gather is a cut in the segmented autograd
//!   ([`Tape::gather_with_grad`], like tensor parallelism's f/g): the gathered rows are a
//!   fresh leaf, and in the backward the gradients every rank computed for them are summed
//!   over the group (a reduce-scatter) before seeding this rank's embeddings.
//! - **Cache and recompute** (open_clip's `accum_freq`): with several micro-batches per step,
//!   a first forward-only pass computes every micro-batch's embeddings without graphs; they
//!   are all-gathered (values only) into the step's global set. Then the training schedule
//!   runs as usual, and each micro-batch's forward recomputes its embeddings with their
//!   graph and replaces its rows in the cached set (on every rank at once, through the
//!   gather with gradient), so its loss sees the whole batch and its gradient reaches its
//!   own embeddings.
//!
//! Where it happens in the pipeline: the embeddings are made mid-model (at the end of the
//! vision tower and of the unimodal text layers) and travel with the activations to the
//! last virtual stage, which holds the temperature and computes the losses; so the cache,
//! the gathers and the loss live on the last stage, and the data-parallel group is that of
//! this rank's (pipeline, tensor) cell: the last stage's replicas. The forward-only pass
//! runs on every stage (it is a pipeline schedule); the gradients the last stage gives the
//! embeddings flow back through the pipeline like any activation gradient. With tensor
//! parallelism every rank of the last stage holds the same (replicated) embeddings and
//! computes the same loss, each in its own data-parallel group, as the micro-batch loss
//! already is.
//!
//! Exactness (what the parity tests hold): let `L` be CLIP's loss over the global batch of
//! `dp · M` micro-batches. In micro-batch `m`'s pass every rank computes `ℓ_r` over the
//! global set in which only the rows of micro-batch `m` (of every rank) carry a graph: `L`
//! itself, or with `local_loss` the rows of rank `r`'s own samples (then `L` is the mean of
//! the `ℓ_r`). The reduce-scatter sums `∂ℓ_r/∂f` over the ranks, `dp · ∂L/∂f`; a pass is
//! seeded with `1/(dp·M)` (the trainer's micro-batch scale), so weighting the contrastive
//! term `M` times in the differentiated objective gives each micro-batch's embeddings
//! exactly `∂L/∂f` after the data-parallel sum, and the `M` passes together the whole
//! gradient. The temperature's gradient would be counted `M` times: it is taken in the
//! first micro-batch's pass only. The reported loss stays `ℓ_r` (its mean over the ranks
//! and micro-batches is `L`).
//!
//! Costs: the forward-only pass (only with several micro-batches per rank) is an extra
//! forward of the whole model, as open_clip's `accum_freq` pays; the transfers are the
//! `dp · M · b` embeddings once per step, and `dp · b` per micro-batch each way.

use std::sync::Arc;

use tch::{Kind, Tensor};
use weaver_models::model::{Acts, GlobalEmbeddings};
use weaver_parallel::comm::Communicator;
use weaver_parallel::tp::Tape;

use crate::error::WorkerError;

fn comm_err(e: weaver_parallel::comm::CommError) -> WorkerError {
    WorkerError::Comm(e.to_string())
}

/// The global contrastive batch of one rank of the last stage (see the module docs).
#[derive(Debug)]
pub struct GlobalContrast {
    /// The data-parallel group of this rank's (pipeline, tensor) cell.
    dp: Arc<dyn Communicator>,
    /// Micro-batches per rank and step.
    microbatches: usize,
    /// open_clip's `local_loss`: this rank's loss rows only.
    local_loss: bool,
    /// The step's embeddings `[dp, M, b, 2E]` (image then text), values, once cached.
    cache: Option<Tensor>,
}

impl GlobalContrast {
    /// The global batch of a rank whose data-parallel group is `dp`, accumulating
    /// `microbatches` micro-batches a step.
    pub fn new(dp: Arc<dyn Communicator>, microbatches: usize, local_loss: bool) -> Self {
        GlobalContrast {
            dp,
            microbatches,
            local_loss,
            cache: None,
        }
    }

    /// Whether a step starts with the forward-only pass that caches every micro-batch's
    /// embeddings (several micro-batches per rank).
    pub fn caches(&self) -> bool {
        self.microbatches > 1
    }

    /// The weight of the contrastive term in a pass's differentiated objective (`M`: each
    /// pass's gradient reaches one micro-batch's embeddings).
    pub fn itc_multiplier(&self) -> f64 {
        self.microbatches as f64
    }

    /// Stores the step's cache from this rank's micro-batches' embeddings
    /// `(image, text)` (`[b, E]` each, in micro-batch order), all-gathered over the
    /// data-parallel group. Collective over that group (the last stage's ranks).
    pub fn set_cache(&mut self, local: &[(Tensor, Tensor)]) -> Result<(), WorkerError> {
        let rows = local
            .iter()
            .map(|(i, t)| Tensor::f_cat(&[i.f_to_kind(Kind::Float)?, t.f_to_kind(Kind::Float)?], 1))
            .collect::<Result<Vec<_>, _>>()?;
        if rows.len() != self.microbatches {
            return Err(WorkerError::Other(format!(
                "{} micro-batches' embeddings cached for {} micro-batches a step",
                rows.len(),
                self.microbatches
            )));
        }
        let mine = Tensor::f_stack(&rows, 0)?.f_contiguous()?; // [M, b, 2E]
        let mut shape = mine.size();
        let n = self.dp.size() as i64;
        let all = if n > 1 {
            shape[0] *= n;
            let mut all = Tensor::f_empty(&shape, (Kind::Float, mine.device()))?;
            self.dp.all_gather(&mine, &mut all).map_err(comm_err)?;
            all
        } else {
            mine
        };
        let m = self.microbatches as i64;
        self.cache = Some(all.f_view([n, m, shape[1], shape[2]])?);
        Ok(())
    }

    /// The global embeddings of micro-batch `mb`'s loss on the last stage, from its
    /// activations `acts` (after the last layer) — `None` when the micro-batch is the whole
    /// batch (one rank, one micro-batch: the plain loss). With several data-parallel ranks
    /// this cuts `tape` (the gather with gradient): collective over the data-parallel group.
    pub fn embeddings(
        &self,
        tape: &mut Tape,
        acts: &mut Acts,
        mb: usize,
    ) -> Result<Option<GlobalEmbeddings>, WorkerError> {
        let n = self.dp.size() as i64;
        let m = self.microbatches as i64;
        if n == 1 && m == 1 {
            return Ok(None);
        }
        let take = |t: &Option<Tensor>, what: &str| {
            t.as_ref()
                .map(|t| t.shallow_clone())
                .ok_or_else(|| WorkerError::Other(format!("the last stage has no {what}")))
        };
        let ie = take(&acts.image_emb, "image embedding")?.f_to_kind(Kind::Float)?;
        let te = take(&acts.text_emb, "text embedding")?.f_to_kind(Kind::Float)?;
        let (b, e) = (ie.size()[0], ie.size()[1]);
        let live = Tensor::f_cat(&[&ie, &te], 1)?;
        // Every rank's rows of micro-batch `mb`, `[dp · b, 2E]`, in rank order.
        let gathered = if n > 1 {
            tape.gather_with_grad(self.dp.clone(), &mut acts.present_mut(), &live)
                .map_err(|e| WorkerError::Comm(e.to_string()))?
        } else {
            live
        };
        let full = if m > 1 {
            let cache = self.cache.as_ref().ok_or_else(|| {
                WorkerError::Other(
                    "the step's embeddings were not cached before its micro-batches".into(),
                )
            })?;
            let mb = mb as i64;
            let mut parts = Vec::with_capacity(3);
            if mb > 0 {
                parts.push(cache.f_narrow(1, 0, mb)?);
            }
            parts.push(gathered.f_view([n, 1, b, 2 * e])?);
            if mb + 1 < m {
                parts.push(cache.f_narrow(1, mb + 1, m - mb - 1)?);
            }
            Tensor::f_cat(&parts, 1)?.f_reshape([n * m * b, 2 * e])?
        } else {
            gathered
        };
        let total = n * m * b;
        let rows = if self.local_loss && n > 1 {
            (self.dp.rank() as i64 * m * b, m * b)
        } else {
            (0, total)
        };
        Ok(Some(GlobalEmbeddings {
            image: full.f_narrow(1, 0, e)?,
            text: full.f_narrow(1, e, e)?,
            rows,
            scale_grad: mb == 0,
        }))
    }

    /// Drops the step's cache (its tensors are the step's).
    pub fn clear(&mut self) {
        self.cache = None;
    }
}
