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
    /// A sequence-parallel operation was asked of a tape that does not split sequences (a
    /// bug in the caller: the model checks [`TensorParallel::sequence_parallel`] first).
    #[error("{0} needs a sequence-parallel tape (parallel.sequence_parallel with tp >= 2)")]
    NotSequenceParallel(&'static str),
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

    /// Whether the regions between tensor-parallel blocks are split along the sequence over
    /// the group (Megatron's sequence parallelism, `parallel.sequence_parallel`): the model
    /// then keeps its residual streams as sequence shards (see [`SeqShard`]) and calls the
    /// `seq_*` methods below in place of [`TensorParallel::enter`] and
    /// [`TensorParallel::reduce_sum`].
    fn sequence_parallel(&self) -> bool {
        false
    }

    /// Sequence parallelism's `f` (Megatron's `gather_from_sequence_parallel_region` before
    /// a column-parallel layer): each of `inputs` (`[B, s, ..]`, this rank's shard of a
    /// sequence of true length `len`, see [`SeqShard`]) all-gathered along dim 1 and cut to
    /// its `len` positions; the backward sums the gradients over the group and keeps this
    /// rank's shard (a reduce-scatter). `live` as for [`TensorParallel::enter`].
    fn seq_enter(
        &mut self,
        live: &mut [&mut Tensor],
        inputs: &[(&Tensor, i64)],
    ) -> Result<Vec<Tensor>, TpError> {
        let _ = (live, inputs);
        Err(TpError::NotSequenceParallel("seq_enter"))
    }

    /// Sequence parallelism's `g` (Megatron's `reduce_scatter_to_sequence_parallel_region`
    /// after a row-parallel layer): `partial` (`[B, len, ..]`) summed over the group,
    /// padded to whole shards, and this rank's shard kept; the backward all-gathers the
    /// shard's gradient.
    fn seq_reduce(
        &mut self,
        live: &mut [&mut Tensor],
        partial: &Tensor,
    ) -> Result<Tensor, TpError> {
        let _ = (live, partial);
        Err(TpError::NotSequenceParallel("seq_reduce"))
    }

    /// The whole sequence (`[B, len, ..]`) of a shard, for code that needs every position
    /// and computes the same on every rank (poolers, heads, losses): all-gathered and cut
    /// to `len`; the backward keeps this rank's part of the (replicated) gradient, with no
    /// collective (Megatron's gather with `tensor_parallel_output_grad = False`).
    fn seq_unshard(&mut self, shard: &Tensor, len: i64) -> Result<Tensor, TpError> {
        let _ = (shard, len);
        Err(TpError::NotSequenceParallel("seq_unshard"))
    }

    /// This rank's shard of a whole sequence `full` (`[B, len, ..]`, the same on every
    /// rank), padded to whole shards; the backward all-gathers the shard's gradient
    /// (Megatron's `scatter_to_sequence_parallel_region`). `live` as for
    /// [`TensorParallel::enter`].
    fn seq_shard(&mut self, live: &mut [&mut Tensor], full: &Tensor) -> Result<Tensor, TpError> {
        let _ = (live, full);
        Err(TpError::NotSequenceParallel("seq_shard"))
    }
}

/// How a sequence of `len` positions is split over a group of `size` ranks under sequence
/// parallelism: padded at its end to `size · ceil(len / size)` positions, rank `r` holding
/// positions `[r · shard, (r + 1) · shard)`. Every gather cuts the padding off before
/// anything mixes positions (attention, pooling, the losses), and every shard is padded
/// with zeros, so the padding reaches no loss and receives no gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqShard {
    /// True sequence length.
    pub len: i64,
    /// Ranks of the group.
    pub size: i64,
}

impl SeqShard {
    /// Positions each rank holds.
    pub fn shard(&self) -> i64 {
        (self.len + self.size - 1) / self.size
    }

    /// Padded length.
    pub fn padded(&self) -> i64 {
        self.shard() * self.size
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
    /// Split the regions between tensor-parallel blocks along the sequence
    /// ([`TensorParallel::sequence_parallel`]).
    sequence: bool,
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
    /// What the leaf's gradient goes through before it seeds `out`.
    grad: LinkGrad,
}

/// The collective a cut applies to a leaf's gradient.
#[derive(Debug)]
enum LinkGrad {
    /// None: the gradient passes unchanged.
    Pass,
    /// Summed over the TP group (Megatron's `f`).
    AllReduce,
    /// For a gather cut ([`Tape::gather_with_grad`], [`TensorParallel::seq_enter`]): the
    /// leaf is `out` all-gathered (along dim 0) over this group; its gradient is
    /// reduce-scattered (summed, this rank's rows kept).
    ReduceScatter(std::sync::Arc<dyn crate::comm::Communicator>),
    /// For a sequence gather cut ([`TensorParallel::seq_enter`]): the leaf (`[B, n·s, ..]`)
    /// is `out` (`[B, s, ..]`) all-gathered along dim 1 over the TP group; its gradient is
    /// reduce-scattered along dim 1.
    SeqReduceScatter,
    /// For a sequence scatter cut ([`TensorParallel::seq_reduce`],
    /// [`TensorParallel::seq_shard`]): the leaf is this rank's positions (dim 1) of `out`
    /// (`[B, n·s, ..]`); its gradient is all-gathered along dim 1 over the TP group.
    SeqAllGather,
}

impl LinkGrad {
    /// Whether the backward of the cut is a collective every rank takes part in (with a
    /// zero gradient when its loss did not reach the leaf).
    fn collective(&self) -> bool {
        !matches!(self, LinkGrad::Pass | LinkGrad::AllReduce)
    }
}

/// `x` (`[B, s, ..]`, the same shape on every rank) all-gathered along dim 1 in rank order:
/// `[B, n·s, ..]`, contiguous, without a graph.
fn all_gather_seq(c: &dyn crate::comm::Communicator, x: &Tensor) -> Result<Tensor, TpError> {
    let n = c.size() as i64;
    let s = x.size();
    if s.len() < 2 {
        return Err(TpError::Comm(format!(
            "cannot split a tensor of shape {s:?} along its sequence (dim 1)"
        )));
    }
    let mut stacked = s.clone();
    stacked[0] *= n;
    let mut buf = Tensor::f_empty(&stacked, (x.kind(), x.device()))?;
    c.all_gather(&x.f_detach()?.f_contiguous()?, &mut buf)
        .map_err(|e| TpError::Comm(e.to_string()))?;
    let mut ranks = vec![n];
    ranks.extend_from_slice(&s);
    let mut whole = s.clone();
    whole[1] *= n;
    Ok(buf
        .f_view(ranks.as_slice())?
        .f_transpose(0, 1)?
        .f_reshape(whole.as_slice())?)
}

/// `x` (`[B, n·s, ..]`, every rank's) summed over the group along dim 1, this rank's `s`
/// positions kept: `[B, s, ..]`, without a graph.
fn reduce_scatter_seq(c: &dyn crate::comm::Communicator, x: &Tensor) -> Result<Tensor, TpError> {
    let n = c.size() as i64;
    let s = x.size();
    if s.len() < 2 || s[1] % n != 0 {
        return Err(TpError::Comm(format!(
            "cannot reduce-scatter a tensor of shape {s:?} along dim 1 over {n} ranks"
        )));
    }
    let mut split = vec![s[0], n, s[1] / n];
    split.extend_from_slice(&s[2..]);
    let mut mine_shape = s.clone();
    mine_shape[1] /= n;
    let mut stacked = mine_shape.clone();
    stacked[0] *= n;
    let by_rank = x
        .f_detach()?
        .f_reshape(split.as_slice())?
        .f_transpose(0, 1)?
        .f_contiguous()?
        .f_view(stacked.as_slice())?;
    let mut mine = Tensor::f_empty(&mine_shape, (x.kind(), x.device()))?;
    c.reduce_scatter(&by_rank, &mut mine, crate::comm::ReduceOp::Sum)
        .map_err(|e| TpError::Comm(e.to_string()))?;
    Ok(mine)
}

/// Replaces `t`'s values by one broadcast zero of the same shape, keeping its autograd
/// node: what a cut keeps of a tensor it only seeds.
fn hollow(t: &mut Tensor) -> Result<(), TpError> {
    let zero = Tensor::f_zeros([1], (t.kind(), t.device()))?.f_expand(t.size(), false)?;
    t.f_set_data(&zero)?;
    Ok(())
}

/// `x` (`[B, len, ..]`) padded with zeros along dim 1 to `padded` positions.
fn pad_seq(x: &Tensor, padded: i64) -> Result<Tensor, TpError> {
    let s = x.size();
    let len = s[1];
    if padded == len {
        return Ok(x.shallow_clone());
    }
    let mut pad = vec![0i64; 2 * (s.len() - 2)];
    pad.extend_from_slice(&[0, padded - len]);
    Ok(x.f_constant_pad_nd(pad.as_slice())?)
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
            sequence: false,
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

    /// This tape, splitting the regions between tensor-parallel blocks along the sequence
    /// over its group when `on` (Megatron's sequence parallelism; a tape of one rank never
    /// does).
    pub fn with_sequence_parallel(mut self, on: bool) -> Tape {
        self.sequence = on;
        self
    }

    /// The TP group when this tape splits sequences.
    fn sequence_comm(
        &self,
        what: &'static str,
    ) -> Result<std::sync::Arc<dyn crate::comm::Communicator>, TpError> {
        match &self.comm {
            Some(c) if self.sequence => Ok(c.clone()),
            _ => Err(TpError::NotSequenceParallel(what)),
        }
    }

    /// Bytes of the tensors this tape holds across its cuts (each link's tensor on both
    /// sides, shared storage counted once per tensor; hollow ones as nothing): what the
    /// segmented forward keeps beyond the autograd graphs themselves.
    pub fn held_bytes(&self) -> u64 {
        let bytes = |t: &Tensor| {
            // A hollow tensor (a broadcast zero standing for a seeded node) holds nothing.
            if t.numel() > 1 && t.stride().iter().all(|&s| s == 0) {
                return 0;
            }
            t.numel() as u64 * t.kind().elt_size_in_bytes() as u64
        };
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
                    grad: LinkGrad::Pass,
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
                    if !link.grad.collective() {
                        continue;
                    }
                    // The reduce-scatter is collective: a rank whose loss did not use the
                    // gathered rows still takes part, with a zero gradient.
                    g = link.leaf.f_zeros_like()?;
                }
                match &link.grad {
                    LinkGrad::Pass => {}
                    LinkGrad::AllReduce => {
                        if let Some(c) = &self.comm {
                            c.all_reduce(&mut g, crate::comm::ReduceOp::Sum)
                                .map_err(|e| TpError::Comm(e.to_string()))?;
                        }
                    }
                    LinkGrad::ReduceScatter(c) => {
                        // The all-gather's backward: every rank's gradient of the gathered
                        // rows summed, this rank's rows kept.
                        let mut mine = link.out.f_zeros_like()?.f_to_kind(g.kind())?;
                        c.reduce_scatter(&g.f_contiguous()?, &mut mine, crate::comm::ReduceOp::Sum)
                            .map_err(|e| TpError::Comm(e.to_string()))?;
                        g = mine;
                    }
                    LinkGrad::SeqReduceScatter => {
                        let c = self
                            .comm
                            .as_ref()
                            .ok_or(TpError::NotSequenceParallel("a sequence gather's backward"))?;
                        g = reduce_scatter_seq(c.as_ref(), &g)?;
                    }
                    LinkGrad::SeqAllGather => {
                        // The scatter's backward: every rank's positions of the gradient, in
                        // rank order.
                        let c = self.comm.as_ref().ok_or(TpError::NotSequenceParallel(
                            "a sequence scatter's backward",
                        ))?;
                        g = all_gather_seq(c.as_ref(), &g)?;
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

impl Tape {
    /// open_clip's `gather_with_grad` as a cut: `input` (`[b, ..]`, the same shape on every
    /// rank of `group`) is all-gathered over `group` in rank order, and the gathered tensor
    /// (`[size · b, ..]`) is returned as a fresh leaf of the next segment. Its backward is
    /// the all-gather's adjoint: the gradients every rank computed for the gathered rows are
    /// summed over the group (a reduce-scatter) and this rank's rows seed `input` in the
    /// segment before. As in [`TensorParallel::enter`], the tensors of `live` (needed later
    /// in the forward) that require grad become fresh leaves, so that each segment's
    /// backward is one autograd pass. Collective over `group`, in the forward and again in
    /// the backward: every rank of the group must cut at the same point of the same
    /// sequence.
    pub fn gather_with_grad(
        &mut self,
        group: std::sync::Arc<dyn crate::comm::Communicator>,
        live: &mut [&mut Tensor],
        input: &Tensor,
    ) -> Result<Tensor, TpError> {
        let n = group.size() as i64;
        let mut shape = input.size();
        if shape.is_empty() {
            return Err(TpError::Comm("cannot all-gather a scalar".into()));
        }
        shape[0] *= n;
        let local = input.f_detach()?.f_contiguous()?;
        let mut gathered = Tensor::f_empty(&shape, (input.kind(), input.device()))?;
        group
            .all_gather(&local, &mut gathered)
            .map_err(|e| TpError::Comm(e.to_string()))?;
        if !input.requires_grad() {
            return Ok(gathered);
        }
        let mut links = Tape::cut_live(live)?;
        let leaf = gathered.set_requires_grad(true);
        links.push(Link {
            out: input.shallow_clone(),
            leaf: leaf.shallow_clone(),
            grad: LinkGrad::ReduceScatter(group),
        });
        self.cuts.push(Cut {
            links,
            starts_layer: None,
            core: None,
        });
        Ok(leaf)
    }
}

impl Tape {
    /// A scatter cut: `mine` (this rank's positions of `whole`, without a graph) becomes a
    /// leaf of the next segment whose gradient is all-gathered into `whole`'s. `whole`'s
    /// values are released (its tensor, shared with the caller's, then reads as zeros): the
    /// caller must not read it again.
    fn scatter_cut(
        &mut self,
        live: &mut [&mut Tensor],
        whole: Tensor,
        mine: Tensor,
    ) -> Result<Tensor, TpError> {
        if !whole.requires_grad() {
            return Ok(mine);
        }
        let mut links = Tape::cut_live(live)?;
        // The backward seeds `whole` through its autograd node, which reads none of its
        // values (a row-parallel product, a padding, an embedding sum: their backwards save
        // their inputs, not their output): the tape keeps the node over one broadcast zero
        // instead of the whole sequence, which is what sequence parallelism saves. The leaf
        // only collects the shard's gradient: it holds no values either, and the shard is
        // handed on as `leaf + mine` (whose gradient reaches the leaf unchanged).
        let mut out = whole.shallow_clone();
        hollow(&mut out)?;
        drop(whole);
        let leaf = Tensor::f_zeros([1], (mine.kind(), mine.device()))?
            .f_expand(mine.size(), false)?
            .set_requires_grad(true);
        let shard = leaf.f_add(&mine)?;
        links.push(Link {
            out,
            leaf,
            grad: LinkGrad::SeqAllGather,
        });
        self.cuts.push(Cut {
            links,
            starts_layer: None,
            core: None,
        });
        Ok(shard)
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
                    grad: LinkGrad::AllReduce,
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

    fn sequence_parallel(&self) -> bool {
        self.sequence && self.comm.is_some()
    }

    fn seq_enter(
        &mut self,
        live: &mut [&mut Tensor],
        inputs: &[(&Tensor, i64)],
    ) -> Result<Vec<Tensor>, TpError> {
        let c = self.sequence_comm("seq_enter")?;
        let grad = inputs.iter().any(|(t, _)| t.requires_grad());
        let mut links = if grad {
            Tape::cut_live(live)?
        } else {
            Vec::new()
        };
        let mut out = Vec::with_capacity(inputs.len());
        for (t, len) in inputs {
            let mut whole = all_gather_seq(c.as_ref(), t)?;
            if *len > whole.size()[1] {
                return Err(TpError::Comm(format!(
                    "a sequence of {len} positions gathered from shards of {:?}",
                    t.size()
                )));
            }
            if t.requires_grad() {
                whole = whole.set_requires_grad(true);
                // A computed shard (a norm's output) is seeded through its autograd node,
                // which reads none of its values: the tape keeps the node only. (A leaf's
                // values may be saved by other ops, and are the caller's.)
                let mut out = t.shallow_clone();
                if !t.is_leaf() {
                    hollow(&mut out)?;
                }
                links.push(Link {
                    out,
                    leaf: whole.shallow_clone(),
                    grad: LinkGrad::SeqReduceScatter,
                });
            }
            out.push(whole.f_narrow(1, 0, *len)?);
        }
        if grad {
            self.cuts.push(Cut {
                links,
                starts_layer: None,
                core: None,
            });
        }
        Ok(out)
    }

    fn seq_reduce(
        &mut self,
        live: &mut [&mut Tensor],
        partial: &Tensor,
    ) -> Result<Tensor, TpError> {
        let c = self.sequence_comm("seq_reduce")?;
        let shard = SeqShard {
            len: partial.size()[1],
            size: c.size() as i64,
        };
        let padded = pad_seq(partial, shard.padded())?;
        let mine = reduce_scatter_seq(c.as_ref(), &padded)?;
        self.scatter_cut(live, padded, mine)
    }

    fn seq_unshard(&mut self, shard: &Tensor, len: i64) -> Result<Tensor, TpError> {
        let c = self.sequence_comm("seq_unshard")?;
        let whole = all_gather_seq(c.as_ref(), shard)?;
        let whole = if shard.requires_grad() {
            // This rank's positions are its own shard (with its graph): the gradient of the
            // whole sequence, the same on every rank, reaches each shard once.
            let s = shard.size()[1];
            let (n, r) = (c.size() as i64, c.rank() as i64);
            Tensor::f_cat(
                &[
                    &whole.f_narrow(1, 0, r * s)?,
                    shard,
                    &whole.f_narrow(1, (r + 1) * s, (n - r - 1) * s)?,
                ],
                1,
            )?
        } else {
            whole
        };
        if len > whole.size()[1] {
            return Err(TpError::Comm(format!(
                "a sequence of {len} positions gathered from shards of {:?}",
                shard.size()
            )));
        }
        Ok(whole.f_narrow(1, 0, len)?)
    }

    fn seq_shard(&mut self, live: &mut [&mut Tensor], full: &Tensor) -> Result<Tensor, TpError> {
        let c = self.sequence_comm("seq_shard")?;
        let shard = SeqShard {
            len: full.size()[1],
            size: c.size() as i64,
        };
        let padded = pad_seq(full, shard.padded())?;
        let s = shard.shard();
        let mine = padded
            .f_detach()?
            .f_narrow(1, c.rank() as i64 * s, s)?
            .f_contiguous()?;
        self.scatter_cut(live, padded, mine)
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
                grad: LinkGrad::Pass,
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
