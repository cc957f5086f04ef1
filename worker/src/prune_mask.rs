//! `train.prune_mask`: fine-tuning a magnitude-pruned model (`weaver ckpt prune --method
//! magnitude`) with its zeros kept. The mask of each transformer-block linear weight is its
//! zero pattern as `model.init_from` loaded it (this rank's part of it, so any layout
//! works); after every optimizer step the parameter and the optimizer's f32 values of it
//! (masters, or the f32 parameters) are multiplied by the mask, so a pruned weight is
//! exactly zero at every step, in every checkpoint and in the exported model. The moments
//! of pruned entries keep moving but never reach the weights.

use tch::{Kind, Tensor};
use tracing::{info, warn};
use weaver_compress::prune::is_block_linear;
use weaver_models::nn::ParamStore;

use crate::error::WorkerError;
use crate::optim::FlatAdamW;

/// The masks of one rank's pruned parameters.
#[derive(Debug)]
pub struct PruneMask {
    /// `(parameter index, 1 where kept / 0 where pruned, in the parameter's dtype)`.
    masks: Vec<(usize, Tensor)>,
}

impl PruneMask {
    /// The masks of `store`'s block linear weights that hold zeros (call right after
    /// `model.init_from` loaded them). Collective-free: each rank masks its own part.
    pub fn from_store(store: &ParamStore) -> Result<PruneMask, WorkerError> {
        let mut masks = Vec::new();
        let mut zeros = 0i64;
        for (i, p) in store.params().iter().enumerate() {
            if !is_block_linear(&p.name) {
                continue;
            }
            let keep = p.tensor.f_ne(0.0)?;
            let z = keep.numel() as i64 - keep.f_sum(Kind::Int64)?.int64_value(&[]);
            if z > 0 {
                zeros += z;
                masks.push((i, keep.f_to_kind(p.tensor.kind())?));
            }
        }
        if masks.is_empty() {
            warn!("train.prune_mask: no block linear weight of model.init_from holds a zero on this rank, so nothing is masked (is it a `weaver ckpt prune --method magnitude` checkpoint?)");
        } else {
            info!(
                weights = masks.len(),
                zeros, "train.prune_mask: pruned entries stay zero"
            );
        }
        Ok(PruneMask { masks })
    }

    /// Weights masked on this rank.
    pub fn len(&self) -> usize {
        self.masks.len()
    }

    /// Whether this rank masks nothing.
    pub fn is_empty(&self) -> bool {
        self.masks.is_empty()
    }

    /// Zeroes the pruned entries of the parameters and of the optimizer's f32 values of
    /// them (after an optimizer step).
    pub fn apply(&self, store: &ParamStore, optimizer: &FlatAdamW) -> Result<(), WorkerError> {
        let params = store.params();
        tch::no_grad(|| -> Result<(), WorkerError> {
            for (i, mask) in &self.masks {
                let p = &params[*i];
                let _ = p.tensor.shallow_clone().f_mul_(mask)?;
                if let Some(part) = optimizer.state_part(*i)? {
                    let len = part.range.end - part.range.start;
                    let m = mask
                        .f_reshape([-1])?
                        .f_narrow(0, part.range.start, len)?
                        .f_to_kind(part.value.kind())?;
                    let _ = part.value.shallow_clone().f_mul_(&m)?;
                }
            }
            Ok(())
        })
    }
}
