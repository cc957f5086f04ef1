//! Tensor parallelism (Megatron-LM, Shoeybi et al. 2019): how a layer is split across the
//! ranks of a TP group, and the two collectives a split layer needs — Megatron's `f`
//! (identity forward, all-reduce of the gradient backward) at the input of a
//! column-parallel layer, and `g` (all-reduce forward, identity backward) at the output of
//! a row-parallel one.
//!
//! Model code calls them through [`TensorParallel`]; with one rank ([`NoTp`]) both are the
//! identity, so the single-process model runs with no cut and no copy.

use std::fmt::Debug;

use tch::Tensor;

/// Why a tensor-parallel operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TpError {
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Torch(#[from] tch::TchError),
    /// The collective failed.
    #[error("tensor-parallel collective failed: {0}")]
    Comm(String),
}

/// The slice of a global tensor this process holds: `dim` split into `world` equal parts,
/// part `rank` (the whole tensor when `world == 1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shard {
    /// The split dimension.
    pub dim: usize,
    /// This process's part.
    pub rank: usize,
    /// Number of parts.
    pub world: usize,
}

impl Shard {
    /// The whole tensor.
    pub const FULL: Shard = Shard {
        dim: 0,
        rank: 0,
        world: 1,
    };

    /// The shape of this part of a tensor of `global` shape.
    pub fn local_shape(&self, global: &[i64]) -> Vec<i64> {
        let mut s = global.to_vec();
        if self.world > 1 {
            s[self.dim] /= self.world as i64;
        }
        s
    }

    /// `(dim, start, len)` of this part along the split dimension.
    pub fn range(&self, global: &[i64]) -> (usize, i64, i64) {
        let len = global[self.dim] / self.world as i64;
        (self.dim, self.rank as i64 * len, len)
    }
}

/// Position in the tensor-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TpPos {
    /// This rank in the TP group.
    pub rank: usize,
    /// TP group size.
    pub size: usize,
}

impl TpPos {
    /// No tensor parallelism.
    pub const SINGLE: TpPos = TpPos { rank: 0, size: 1 };

    /// The shard of a tensor split along `dim` over this group.
    pub fn shard(&self, dim: usize) -> Shard {
        Shard {
            dim,
            rank: self.rank,
            world: self.size,
        }
    }
}

/// How a linear layer is split across tensor-parallel ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Whole on every rank.
    Replicated,
    /// Output features split (weight rows, and the bias).
    Column,
    /// Input features split (weight columns); the bias is whole and added once, after the
    /// partial products are summed.
    Row,
}

/// The tensor-parallel collectives a model calls while it runs forward.
pub trait TensorParallel: Debug {
    /// Where this process sits in its TP group.
    fn pos(&self) -> TpPos;

    /// Megatron's `f` for `inputs` (replicated tensors about to enter column-parallel
    /// layers): returns tensors equal to `inputs` whose gradients will be summed over the
    /// group. `live` are the other tensors still needed later in the forward; an
    /// implementation that cuts the autograd graph here replaces them with fresh leaves.
    fn enter(
        &mut self,
        live: &mut [&mut Tensor],
        inputs: &[&Tensor],
    ) -> Result<Vec<Tensor>, TpError>;

    /// Megatron's `g`: the sum of `partial` over the group; the gradient passes unchanged.
    fn reduce_sum(&mut self, partial: &Tensor) -> Result<Tensor, TpError>;

    /// Element-wise maximum over the group, outside autograd (vocab-parallel softmax).
    fn max_no_grad(&mut self, t: &Tensor) -> Result<Tensor, TpError>;
}

/// One rank: every collective is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoTp;

impl TensorParallel for NoTp {
    fn pos(&self) -> TpPos {
        TpPos::SINGLE
    }

    fn enter(
        &mut self,
        _live: &mut [&mut Tensor],
        inputs: &[&Tensor],
    ) -> Result<Vec<Tensor>, TpError> {
        Ok(inputs.iter().map(|t| t.shallow_clone()).collect())
    }

    fn reduce_sum(&mut self, partial: &Tensor) -> Result<Tensor, TpError> {
        Ok(partial.shallow_clone())
    }

    fn max_no_grad(&mut self, t: &Tensor) -> Result<Tensor, TpError> {
        Ok(t.shallow_clone())
    }
}
