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

    /// `core(inputs)`, for a region whose saved activations are large next to its inputs
    /// and output (attention's scaled dot product: Megatron's selective recomputation).
    /// `live` are the tensors still needed later in the forward, as for
    /// [`TensorParallel::enter`]. An implementation may keep only the inputs and run
    /// `core` again before its backward; the default runs it once, with its graph.
    fn recomputed(
        &mut self,
        live: &mut [&mut Tensor],
        inputs: &[&Tensor],
        core: Recomputed,
    ) -> Result<Tensor, TpError> {
        let _ = live;
        let inputs: Vec<Tensor> = inputs.iter().map(|t| t.shallow_clone()).collect();
        Ok(core(&inputs)?)
    }
}

/// A region of the forward that selective recomputation runs again before its backward
/// ([`TensorParallel::recomputed`]): a pure function of its inputs (it draws no random
/// numbers, so the rerun computes the same bits).
pub type Recomputed = Box<dyn Fn(&[Tensor]) -> Result<Tensor, tch::TchError>>;

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

/// Tensor parallelism over a communicator, and the segmented backward it needs.
///
/// tch has no custom autograd functions, so `f` (whose backward is an all-reduce) cuts the
/// graph: the forward is split into *segments* at each `f`; every tensor still needed later
/// becomes a fresh leaf of the next segment, and [`Tape::backward`] walks the segments in
/// reverse, summing the gradients that reach `f`'s leaves over the group before feeding
/// them to the segment before. `g` needs no cut: `partial + (sum − partial).detach()` has
/// the summed value and passes the gradient through unchanged.
///
/// The same cut at *layer* boundaries ([`Tape::begin_layer`]) makes a stage's backward run
/// layer by layer: [`Tape::backward_with`] tells its [`BackwardHooks`] when every segment of
/// a layer is done, which is when that layer's parameter gradients of this pass are complete
/// (data-parallel buckets start reducing then). A layer segment is the layer's forward
/// (the model's code for that layer, a closure over its parameters) applied to the leaves
/// the cut made of its inputs: activation recomputation keeps only those leaves, runs the
/// forward without a graph, and reruns it with one in [`BackwardHooks::seed`]'s place
/// before the layer's backward.
///
/// Selective recomputation ([`Tape::with_selective_recompute`]) cuts the same way around a
/// [`TensorParallel::recomputed`] region (attention's core): the forward runs it without a
/// graph and keeps its inputs and output; the backward, on reaching that cut, runs it again
/// with a graph from the inputs, seeds it with the output's gradient, and passes the
/// inputs' gradients on to the segment before. What the region saves for its backward (the
/// attention's log-sum-exp, or its scores on the unfused path) lives only during that
/// rerun.
///
/// With no communicator (one TP rank) and no layer cuts nothing is cut and `backward` is
/// one autograd pass, which is also what a pipeline stage without tensor parallelism uses.
#[derive(Debug)]
pub struct Tape {
    comm: Option<std::sync::Arc<dyn crate::comm::Communicator>>,
    pos: TpPos,
    /// Recompute [`TensorParallel::recomputed`] regions before their backward.
    selective: bool,
    cuts: Vec<Cut>,
    /// The layer the current segment belongs to, once [`Tape::begin_layer`] was called.
    layer: Option<usize>,
    /// The layer of the first segment.
    first_layer: Option<usize>,
}

/// One cut: the tensors crossing it, the layer that starts after it, if it is a layer
/// boundary, and the region recomputed at it, if it is a selective-recomputation cut.
#[derive(Debug)]
struct Cut {
    links: Vec<Link>,
    starts_layer: Option<usize>,
    core: Option<Core>,
}

/// A region recomputed before its backward.
struct Core {
    f: Recomputed,
    /// Its inputs (`out`: in the segment before; `leaf`: what the rerun starts from).
    inputs: Vec<Link>,
    /// The leaf standing for its output in the segment after.
    output: Tensor,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("inputs", &self.inputs)
            .field("output", &self.output)
            .finish_non_exhaustive()
    }
}

/// What a segmented backward ([`Tape::backward_with`]) delegates and reports.
pub trait BackwardHooks {
    /// Runs one autograd pass seeding each tensor with its gradient (same shape; outputs
    /// that do not require grad are skipped). The default is [`backward_pairs`].
    fn seed(&mut self, pairs: &[(Tensor, Tensor)]) -> Result<(), TpError> {
        backward_pairs(pairs)
    }

    /// Every segment of layer `layer` has run its backward: the gradients this pass gives
    /// the layer's parameters are accumulated.
    fn layer_done(&mut self, _layer: usize) -> Result<(), TpError> {
        Ok(())
    }
}

/// Hooks that only run the autograd passes.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainBackward;

impl BackwardHooks for PlainBackward {}

#[derive(Debug)]
struct Link {
    /// The tensor in the segment before the cut.
    out: Tensor,
    /// Its stand-in in the segment after.
    leaf: Tensor,
    /// Whether the leaf's gradient is summed over the group (Megatron's `f`).
    reduce: bool,
}

impl Tape {
    /// A tape over the TP group `comm` (`None`: one rank).
    pub fn new(comm: Option<std::sync::Arc<dyn crate::comm::Communicator>>) -> Tape {
        let pos = comm
            .as_ref()
            .map(|c| TpPos {
                rank: c.rank(),
                size: c.size(),
            })
            .unwrap_or(TpPos::SINGLE);
        let comm = comm.filter(|c| c.size() > 1);
        Tape {
            comm,
            pos,
            selective: false,
            cuts: Vec::new(),
            layer: None,
            first_layer: None,
        }
    }

    /// This tape, recomputing attention's core before its backward when `on` (Megatron's
    /// selective recomputation; see the type's docs).
    pub fn with_selective_recompute(mut self, on: bool) -> Tape {
        self.selective = on;
        self
    }

    /// Bytes of the tensors this tape holds across its cuts (each link's tensor on both
    /// sides, shared storage counted once per tensor): what the segmented forward keeps
    /// beyond the autograd graphs themselves.
    pub fn held_bytes(&self) -> u64 {
        let bytes = |t: &Tensor| t.numel() as u64 * t.kind().elt_size_in_bytes() as u64;
        self.cuts
            .iter()
            .map(|c| {
                let links: u64 = c.links.iter().map(|l| bytes(&l.out)).sum();
                let core = c.core.as_ref().map_or(0, |k| {
                    k.inputs.iter().map(|l| bytes(&l.out)).sum::<u64>() + bytes(&k.output)
                });
                links + core
            })
            .sum()
    }

    /// Replaces each tensor of `live` that requires grad by a fresh leaf; the links.
    fn cut_live(live: &mut [&mut Tensor]) -> Result<Vec<Link>, TpError> {
        let mut links = Vec::with_capacity(live.len());
        for t in live.iter_mut() {
            if t.requires_grad() {
                let leaf = leaf_of(t)?;
                let out = std::mem::replace(&mut **t, leaf.shallow_clone());
                links.push(Link {
                    out,
                    leaf,
                    reduce: false,
                });
            }
        }
        Ok(links)
    }

    /// Starts layer `layer` of the forward. The first call only names the layer of the
    /// segment under way; later calls cut there: each tensor of `live` (the activations
    /// entering the layer) that requires grad is replaced by a fresh leaf.
    pub fn begin_layer(&mut self, layer: usize, live: &mut [&mut Tensor]) -> Result<(), TpError> {
        if self.layer.is_none() {
            self.layer = Some(layer);
            self.first_layer = Some(layer);
            return Ok(());
        }
        let links = Tape::cut_live(live)?;
        self.cuts.push(Cut {
            links,
            starts_layer: Some(layer),
            core: None,
        });
        self.layer = Some(layer);
        Ok(())
    }

    /// Backward from `outputs` (tensors of the last segment and their gradients) through
    /// every segment: gradients accumulate in the parameters and in the leaves the forward
    /// started from.
    pub fn backward(&mut self, outputs: Vec<(Tensor, Tensor)>) -> Result<(), TpError> {
        self.backward_with(outputs, &mut PlainBackward)
    }

    /// As [`Tape::backward`], with `hooks` running the autograd passes and told when each
    /// layer named by [`Tape::begin_layer`] is done (the first layer last, when the whole
    /// backward is).
    pub fn backward_with(
        &mut self,
        outputs: Vec<(Tensor, Tensor)>,
        hooks: &mut dyn BackwardHooks,
    ) -> Result<(), TpError> {
        hooks.seed(&outputs)?;
        while let Some(cut) = self.cuts.pop() {
            if let Some(layer) = cut.starts_layer {
                hooks.layer_done(layer)?;
            }
            let mut pairs = Vec::with_capacity(cut.links.len());
            for link in cut.links {
                let mut g = link.leaf.grad();
                if !g.defined() {
                    continue;
                }
                if link.reduce {
                    if let Some(c) = &self.comm {
                        c.all_reduce(&mut g, crate::comm::ReduceOp::Sum)
                            .map_err(|e| TpError::Comm(e.to_string()))?;
                    }
                }
                pairs.push((link.out, g));
            }
            if let Some(core) = cut.core {
                let g = core.output.grad();
                if g.defined() {
                    let leaves: Vec<Tensor> =
                        core.inputs.iter().map(|l| l.leaf.shallow_clone()).collect();
                    let y = tch::with_grad(|| (core.f)(&leaves))?;
                    hooks.seed(&[(y, g)])?;
                    for link in core.inputs {
                        let g = link.leaf.grad();
                        if g.defined() {
                            pairs.push((link.out, g));
                        }
                    }
                }
            }
            hooks.seed(&pairs)?;
        }
        if let Some(layer) = self.first_layer.take() {
            hooks.layer_done(layer)?;
        }
        self.layer = None;
        Ok(())
    }
}

/// One autograd pass seeding each `out` with its gradient (`Σ (out · grad).sum()`, whose
/// derivative with respect to `out` is exactly `grad`).
pub fn backward_pairs(pairs: &[(Tensor, Tensor)]) -> Result<(), TpError> {
    let mut total: Option<Tensor> = None;
    for (out, grad) in pairs {
        if !out.requires_grad() {
            continue;
        }
        let term = out
            .f_mul(&grad.f_to_kind(out.kind())?)?
            .f_sum(tch::Kind::Float)?;
        total = Some(match total {
            None => term,
            Some(t) => t.f_add(&term)?,
        });
    }
    if let Some(t) = total {
        t.f_backward()?;
    }
    Ok(())
}

fn leaf_of(t: &Tensor) -> Result<Tensor, TpError> {
    Ok(t.f_detach()?.set_requires_grad(true))
}

impl TensorParallel for Tape {
    fn pos(&self) -> TpPos {
        self.pos
    }

    fn enter(
        &mut self,
        live: &mut [&mut Tensor],
        inputs: &[&Tensor],
    ) -> Result<Vec<Tensor>, TpError> {
        if self.comm.is_none() {
            return Ok(inputs.iter().map(|t| t.shallow_clone()).collect());
        }
        let mut links = Tape::cut_live(live)?;
        let mut entered = Vec::with_capacity(inputs.len());
        for t in inputs {
            if t.requires_grad() {
                let leaf = leaf_of(t)?;
                entered.push(leaf.shallow_clone());
                links.push(Link {
                    out: t.shallow_clone(),
                    leaf,
                    reduce: true,
                });
            } else {
                entered.push(t.shallow_clone());
            }
        }
        self.cuts.push(Cut {
            links,
            starts_layer: None,
            core: None,
        });
        Ok(entered)
    }

    fn reduce_sum(&mut self, partial: &Tensor) -> Result<Tensor, TpError> {
        let Some(c) = &self.comm else {
            return Ok(partial.shallow_clone());
        };
        let fixed = partial.f_detach()?;
        let mut sum = fixed.f_detach_copy()?;
        c.all_reduce(&mut sum, crate::comm::ReduceOp::Sum)
            .map_err(|e| TpError::Comm(e.to_string()))?;
        // Value: exactly `sum` (partial − partial is 0); gradient: the identity.
        Ok(partial.f_sub(&fixed)?.f_add(&sum)?)
    }

    fn max_no_grad(&mut self, t: &Tensor) -> Result<Tensor, TpError> {
        let mut m = t.f_detach_copy()?;
        if let Some(c) = &self.comm {
            c.all_reduce(&mut m, crate::comm::ReduceOp::Max)
                .map_err(|e| TpError::Comm(e.to_string()))?;
        }
        Ok(m)
    }

    fn recomputed(
        &mut self,
        live: &mut [&mut Tensor],
        inputs: &[&Tensor],
        core: Recomputed,
    ) -> Result<Tensor, TpError> {
        if !self.selective || !inputs.iter().any(|t| t.requires_grad()) {
            let inputs: Vec<Tensor> = inputs.iter().map(|t| t.shallow_clone()).collect();
            return Ok(core(&inputs)?);
        }
        let links = Tape::cut_live(live)?;
        let mut kept = Vec::with_capacity(inputs.len());
        for t in inputs {
            kept.push(Link {
                out: t.shallow_clone(),
                leaf: leaf_of(t)?,
                reduce: false,
            });
        }
        let detached = kept
            .iter()
            .map(|l| l.leaf.f_detach())
            .collect::<Result<Vec<_>, _>>()?;
        let output = leaf_of(&tch::no_grad(|| core(&detached))?)?;
        self.cuts.push(Cut {
            links,
            starts_layer: None,
            core: Some(Core {
                f: core,
                inputs: kept,
                output: output.shallow_clone(),
            }),
        });
        Ok(output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[derive(Default)]
    struct Record(Vec<usize>);

    impl BackwardHooks for Record {
        fn layer_done(&mut self, layer: usize) -> Result<(), TpError> {
            self.0.push(layer);
            Ok(())
        }
    }

    /// Three "layers" over one stream, cut (or not) at their boundaries; returns the
    /// gradients of the weights and of the input, and the layers reported done.
    fn run(cut: bool) -> (Vec<Tensor>, Vec<usize>) {
        let opts = (Kind::Float, Device::Cpu);
        let w: Vec<Tensor> = (0..3)
            .map(|i| Tensor::full([3], 0.5 + i as f64, opts).set_requires_grad(true))
            .collect();
        let x = Tensor::from_slice(&[0.1f32, -0.7, 2.0]).set_requires_grad(true);
        let mut tape = Tape::new(None);
        let mut h = x.shallow_clone();
        for (i, wi) in w.iter().enumerate() {
            if cut {
                tape.begin_layer(4 + i, &mut [&mut h]).unwrap();
            }
            h = (&h * wi).tanh();
        }
        let loss = h.sum(Kind::Float);
        let mut rec = Record::default();
        tape.backward_with(vec![(loss, Tensor::from(1.0f32))], &mut rec)
            .unwrap();
        let mut grads: Vec<Tensor> = w.iter().map(|t| t.grad()).collect();
        grads.push(x.grad());
        (grads, rec.0)
    }

    /// Two layers of `h ← h + softmax(h·wᵀ)·w` (a stand-in for attention's core, through
    /// [`TensorParallel::recomputed`]), with `h` live across the core; returns the
    /// gradients of the weights and the input, and the bytes the tape held after the
    /// forward.
    fn run_core(selective: bool) -> (Vec<Tensor>, u64) {
        let opts = (Kind::Float, Device::Cpu);
        let w: Vec<Tensor> = (0..2)
            .map(|i| Tensor::full([4, 3], 0.3 - i as f64, opts).set_requires_grad(true))
            .collect();
        let x = Tensor::from_slice(&[0.1f32, -0.7, 2.0, 0.4, 0.0, -1.5])
            .reshape([2, 3])
            .set_requires_grad(true);
        let mut tape = Tape::new(None).with_selective_recompute(selective);
        let mut h = x.shallow_clone();
        for (i, wi) in w.iter().enumerate() {
            tape.begin_layer(i, &mut [&mut h]).unwrap();
            let q = h.tanh();
            let k = wi.shallow_clone().matmul(&Tensor::eye(3, opts));
            let core: Recomputed = Box::new(|t: &[Tensor]| {
                t[0].f_matmul(&t[1].f_tr()?)?
                    .f_softmax(-1, Kind::Float)?
                    .f_matmul(&t[1])
            });
            let y = tape.recomputed(&mut [&mut h], &[&q, &k], core).unwrap();
            h = &h + y;
        }
        let held = tape.held_bytes();
        let loss = h.square().sum(Kind::Float);
        tape.backward(vec![(loss, Tensor::from(1.0f32))]).unwrap();
        let mut grads: Vec<Tensor> = w.iter().map(|t| t.grad()).collect();
        grads.push(x.grad());
        (grads, held)
    }

    #[test]
    fn selective_recomputation_gives_the_same_gradient_bits() {
        let (plain, held_plain) = run_core(false);
        let (recomputed, held) = run_core(true);
        for (a, b) in plain.iter().zip(&recomputed) {
            assert!(a.defined() && a.equal(b), "{a:?} vs {b:?}");
        }
        // The recomputing tape keeps the cores' inputs and outputs (and the stream on both
        // sides of each cut); the plain one only the layer cut's stream.
        assert!(held > held_plain, "{held} vs {held_plain}");
    }

    #[test]
    fn layer_cuts_leave_gradients_unchanged_and_report_layers_last_first() {
        let (plain, none) = run(false);
        let (cut, done) = run(true);
        assert!(none.is_empty());
        assert_eq!(done, vec![6, 5, 4]);
        for (a, b) in plain.iter().zip(&cut) {
            assert!(a.equal(b), "{a:?} vs {b:?}");
        }
    }
}
