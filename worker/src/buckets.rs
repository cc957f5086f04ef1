//! How a rank's parameters are laid out in flat buckets: the plan both the gradient
//! synchroniser ([`crate::grads`]) and the optimizer ([`crate::optim::FlatAdamW`]) allocate
//! their contiguous buffers from, so that one bucket's gradients, parameters, master weights
//! and moments are views of a few large tensors with the same offsets.
//!
//! Buckets are filled in *reverse layer order* (the order backward completes layers), so
//! with overlap each bucket's all-reduce can start as soon as the backward of the last
//! micro-batch has passed its earliest layer, and buckets complete one after another.
//! Inside a bucket, parameters are grouped as sharded-with-decay, sharded-without,
//! replicated-with-decay, replicated-without: the fused AdamW then runs on two lists of
//! ranges (decay, no decay) and the gradient norm on two (sharded parameters count on every
//! tensor-parallel rank, replicated ones on TP rank 0 only).
//!
//! Fine-tuning (`train.freeze`, LoRA): frozen parameters are in no bucket (no gradient, no
//! optimizer state, no data-parallel traffic). Learning-rate multipliers
//! (`train.lr_mult`): each parameter has an lr group, and inside each of the four groups
//! above parameters are ordered by lr group, so a bucket is a list of [`Segment`]s of one
//! (decay, lr group) each and the optimizer runs one fused call per (decay, lr group).
//!
//! The distributed optimizer (`parallel.shard_optimizer`, ZeRO-1) pads each bucket to a
//! multiple of the data-parallel size ([`BucketLayout::padded`]: at most `dp − 1` zero
//! elements, which no parameter uses and no update touches) and gives replica `d` the
//! contiguous range [`BucketLayout::shard`] `d` of it, the part the reduce-scatter leaves
//! there; the groups stay ranges, so a shard of a bucket is still a handful of views
//! ([`clip`]).

use std::collections::BTreeSet;
use std::ops::Range;

/// What the plan needs to know about one parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamInfo {
    /// The model layer whose forward uses it (see `Model`: embeddings and heads belong to
    /// the layer next to them).
    pub layer: usize,
    /// Elements held on this rank.
    pub numel: i64,
    /// Split over the tensor-parallel group (else replicated on every TP rank).
    pub sharded: bool,
    /// Whether AdamW's weight decay applies.
    pub decay: bool,
    /// Index of the parameter's learning-rate multiplier (the trainer's list of distinct
    /// multipliers; 0 when there is one).
    pub lr_group: usize,
    /// Frozen: in no bucket.
    pub frozen: bool,
}

/// A run of elements with one weight-decay setting and one learning-rate group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Elements of the bucket.
    pub range: Range<i64>,
    /// Whether weight decay applies.
    pub decay: bool,
    /// The learning-rate group.
    pub lr_group: usize,
}

/// One parameter's place in its bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// Index of the parameter in the store.
    pub param: usize,
    /// First element in the bucket's flat buffers.
    pub offset: i64,
    /// Elements.
    pub numel: i64,
}

/// One bucket: its parameters, the layers they belong to, and its element groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketLayout {
    /// Parameters, in buffer order.
    pub slots: Vec<Slot>,
    /// Layers owning those parameters: the bucket's gradients are complete once every one
    /// of them has finished its last backward of the step.
    pub layers: BTreeSet<usize>,
    /// Elements in the bucket.
    pub numel: i64,
    /// Elements of sharded parameters (the first groups), then replicated ones.
    pub sharded: Range<i64>,
    /// Elements of replicated parameters.
    pub replicated: Range<i64>,
    /// Ranges of parameters with weight decay (at most two).
    pub decay: Vec<Range<i64>>,
    /// Ranges of parameters without (at most two).
    pub no_decay: Vec<Range<i64>>,
    /// The bucket cut by (decay, lr group): the ranges of one fused optimizer call each.
    pub segments: Vec<Segment>,
}

impl BucketLayout {
    /// Elements of the bucket's buffers when they are split over `parts` data-parallel
    /// replicas: `numel` rounded up to a multiple of `parts`, so every replica's shard has
    /// the same length (what NCCL's reduce-scatter and all-gather take).
    pub fn padded(&self, parts: usize) -> i64 {
        let parts = parts.max(1) as i64;
        (self.numel + parts - 1) / parts * parts
    }

    /// The range of the padded buffer replica `index` of `parts` owns (the rows
    /// `weaver_parallel::comm::shard_range` gives it: equal lengths). May reach into the
    /// padding, or lie wholly in it.
    pub fn shard(&self, parts: usize, index: usize) -> Range<i64> {
        let len = self.padded(parts) / parts.max(1) as i64;
        let start = len * index as i64;
        start..start + len
    }
}

/// The parts of `ranges` inside `within`, in the coordinates of `within` (its start is 0);
/// empty parts are left out.
pub fn clip(ranges: &[Range<i64>], within: &Range<i64>) -> Vec<Range<i64>> {
    ranges
        .iter()
        .map(|r| r.start.max(within.start) - within.start..r.end.min(within.end) - within.start)
        .filter(|r| r.start < r.end)
        .collect()
}

/// Cuts `params` (in store order) into buckets of at most `limit_bytes` of f32 gradients
/// (a parameter larger than that gets a bucket of its own), in reverse layer order.
pub fn plan(params: &[ParamInfo], limit_bytes: usize) -> Vec<BucketLayout> {
    let mut order: Vec<usize> = (0..params.len()).filter(|&i| !params[i].frozen).collect();
    // Latest layer first; inside a layer, the store's order reversed (the order autograd
    // tends to finish them). Stable, so the plan is a pure function of its inputs.
    order.sort_by(|&a, &b| params[b].layer.cmp(&params[a].layer).then(b.cmp(&a)));
    let limit = (limit_bytes / 4).max(1) as i64;
    let mut out = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut size = 0i64;
    for i in order {
        let n = params[i].numel;
        if !current.is_empty() && size + n > limit {
            out.push(layout(params, std::mem::take(&mut current)));
            size = 0;
        }
        current.push(i);
        size += n;
    }
    if !current.is_empty() {
        out.push(layout(params, current));
    }
    out
}

fn layout(params: &[ParamInfo], members: Vec<usize>) -> BucketLayout {
    let group = |p: &ParamInfo| (!p.sharded) as usize * 2 + (!p.decay) as usize;
    let mut members = members;
    // Stable: with one lr group the order is the (sharded, decay) grouping alone.
    members.sort_by_key(|&i| (group(&params[i]), params[i].lr_group));
    let mut slots = Vec::with_capacity(members.len());
    let mut ends = [0i64; 4];
    let mut offset = 0i64;
    let mut segments: Vec<Segment> = Vec::new();
    for &i in &members {
        let p = &params[i];
        slots.push(Slot {
            param: i,
            offset,
            numel: p.numel,
        });
        match segments.last_mut() {
            Some(s) if s.decay == p.decay && s.lr_group == p.lr_group && s.range.end == offset => {
                s.range.end += p.numel;
            }
            _ => segments.push(Segment {
                range: offset..offset + p.numel,
                decay: p.decay,
                lr_group: p.lr_group,
            }),
        }
        offset += p.numel;
        ends[group(p)] = offset;
    }
    // Group g spans [end of the groups before it, its own end); empty groups end where the
    // previous one did.
    let mut bounds = [0i64; 5];
    for g in 0..4 {
        bounds[g + 1] = ends[g].max(bounds[g]);
    }
    let range = |g: usize| bounds[g]..bounds[g + 1];
    let nonempty = |rs: [Range<i64>; 2]| rs.into_iter().filter(|r| !r.is_empty()).collect();
    BucketLayout {
        layers: members.iter().map(|&i| params[i].layer).collect(),
        slots,
        numel: offset,
        sharded: bounds[0]..bounds[2],
        replicated: bounds[2]..bounds[4],
        decay: nonempty([range(0), range(2)]),
        no_decay: nonempty([range(1), range(3)]),
        segments,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn info(layer: usize, numel: i64, sharded: bool, decay: bool) -> ParamInfo {
        ParamInfo {
            layer,
            numel,
            sharded,
            decay,
            lr_group: 0,
            frozen: false,
        }
    }

    #[test]
    fn frozen_parameters_are_in_no_bucket_and_lr_groups_get_segments() {
        let mut params = vec![
            info(0, 10, true, true),
            info(0, 4, false, false),
            info(1, 10, false, true),
            info(1, 6, true, true),
        ];
        params[1].frozen = true;
        params[3].lr_group = 1;
        let b = plan(&params, 1 << 20);
        assert_eq!(b.len(), 1);
        let order: Vec<usize> = b[0].slots.iter().map(|s| s.param).collect();
        // Sharded with decay (lr group 0 before 1), then replicated with decay.
        assert_eq!(order, vec![0, 3, 2]);
        assert_eq!(b[0].numel, 26);
        assert_eq!(
            b[0].segments,
            vec![
                Segment {
                    range: 0..10,
                    decay: true,
                    lr_group: 0
                },
                Segment {
                    range: 10..16,
                    decay: true,
                    lr_group: 1
                },
                Segment {
                    range: 16..26,
                    decay: true,
                    lr_group: 0
                },
            ]
        );
        assert_eq!(b[0].decay, vec![0..16, 16..26]);
    }

    #[test]
    fn buckets_follow_reverse_layer_order_and_group_their_elements() {
        let params = [
            info(0, 10, true, true),
            info(0, 4, false, false),
            info(1, 10, false, true),
            info(1, 6, true, false),
            info(2, 8, true, true),
        ];
        // 24 f32 elements per bucket.
        let b = plan(&params, 96);
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].layers, [1, 2].into_iter().collect());
        assert_eq!(b[1].layers, [0].into_iter().collect());
        // Bucket 0: layer 2's param 4, then layer 1's 3 and 2, grouped.
        let order: Vec<usize> = b[0].slots.iter().map(|s| s.param).collect();
        assert_eq!(order, vec![4, 3, 2]);
        assert_eq!(b[0].sharded, 0..14);
        assert_eq!(b[0].replicated, 14..24);
        assert_eq!(b[0].decay, vec![0..8, 14..24]);
        assert_eq!(b[0].no_decay, vec![8..14]);
        assert_eq!(b[1].decay, vec![0..10]);
        assert_eq!(b[1].no_decay, vec![10..14]);
    }

    #[test]
    fn shards_tile_the_padded_bucket() {
        let b = plan(
            &[info(0, 10, true, true), info(0, 3, false, false)],
            1 << 20,
        );
        assert_eq!(b[0].padded(1), 13);
        assert_eq!(b[0].padded(4), 16);
        let shards: Vec<_> = (0..4).map(|d| b[0].shard(4, d)).collect();
        assert_eq!(shards, vec![0..4, 4..8, 8..12, 12..16]);
        assert_eq!(clip(&b[0].decay, &shards[2]), vec![0..2]);
        assert_eq!(clip(&b[0].no_decay, &shards[2]), vec![2..4]);
        assert_eq!(clip(&b[0].no_decay, &shards[3]), vec![0..1]);
        assert!(clip(&b[0].decay, &shards[3]).is_empty());
    }

    proptest! {
        #[test]
        fn every_element_has_one_place(
            ps in proptest::collection::vec((0usize..6, 1i64..50, any::<bool>(), any::<bool>(), 0usize..3), 1..40),
            limit in 4usize..800,
        ) {
            let params: Vec<ParamInfo> = ps
                .iter()
                .map(|&(l, n, s, d, g)| ParamInfo { lr_group: g, ..info(l, n, s, d) })
                .collect();
            let b = plan(&params, limit);
            let mut seen = vec![false; params.len()];
            let mut last_min_layer = usize::MAX;
            for bucket in &b {
                let mut next = 0;
                for s in &bucket.slots {
                    prop_assert_eq!(s.offset, next);
                    prop_assert!(!seen[s.param]);
                    seen[s.param] = true;
                    next += s.numel;
                }
                prop_assert_eq!(next, bucket.numel);
                // Groups tile the bucket: decay ∪ no_decay and sharded ∪ replicated.
                let covered: i64 = bucket.decay.iter().chain(&bucket.no_decay).map(|r| r.end - r.start).sum();
                prop_assert_eq!(covered, bucket.numel);
                // Segments tile the bucket, and each parameter lies in one of its
                // (decay, lr group).
                let mut end = 0;
                for seg in &bucket.segments {
                    prop_assert_eq!(seg.range.start, end);
                    end = seg.range.end;
                }
                prop_assert_eq!(end, bucket.numel);
                for s in &bucket.slots {
                    let p = params[s.param];
                    prop_assert!(bucket.segments.iter().any(|seg| seg.decay == p.decay
                        && seg.lr_group == p.lr_group
                        && seg.range.start <= s.offset
                        && s.offset + s.numel <= seg.range.end));
                }
                prop_assert_eq!(bucket.sharded.end, bucket.replicated.start);
                prop_assert_eq!(bucket.replicated.end, bucket.numel);
                for s in &bucket.slots {
                    let p = params[s.param];
                    let inside = |rs: &[Range<i64>]| rs.iter().any(|r| r.start <= s.offset && s.offset + s.numel <= r.end);
                    let group = if p.decay { &bucket.decay } else { &bucket.no_decay };
                    prop_assert!(inside(group), "parameter {} outside its decay group", s.param);
                    let g = if p.sharded { &bucket.sharded } else { &bucket.replicated };
                    prop_assert!(g.start <= s.offset && s.offset + s.numel <= g.end, "parameter {} outside its TP group", s.param);
                }
                // Reverse layer order: no bucket holds a layer later than one a previous
                // bucket finished with.
                let max = *bucket.layers.iter().max().unwrap();
                prop_assert!(max <= last_min_layer);
                last_min_layer = *bucket.layers.iter().min().unwrap();
            }
            prop_assert!(seen.iter().all(|&s| s));
        }
    }
}
