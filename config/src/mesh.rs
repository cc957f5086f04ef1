//! The 3-D device mesh: `ParallelDims { dp, pp, tp }`, validated once (torchtitan's
//! `ParallelDims`), the rank ↔ (dp, pp, tp) map with tp innermost, and the process groups
//! derived from it.
//!
//! Ranks are laid out row-major over (dp, pp, tp): `rank = (dp * PP + pp) * TP + tp`. With
//! consecutive ranks on one host, a TP group (the chattiest) stays inside a host, pipeline
//! neighbours are next, and data-parallel replicas are farthest apart.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a layout is impossible; the message says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid parallel layout: {0}")]
pub struct LayoutError(pub String);

/// What a layout must divide, taken from the model (the model crate fills it in).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelLimits {
    /// Every attention head count in the model (each must divide by tp).
    pub heads: Vec<(String, usize)>,
    /// Every width tp splits (MLP hidden widths, vocabulary).
    pub split_widths: Vec<(String, usize)>,
    /// Pipeline-cuttable layers (stages need at least one each).
    pub layers: usize,
}

impl ModelLimits {
    /// The first head count or split width that `tp` does not divide, with its name
    /// (`None`: `tp` splits the model).
    pub fn undivided(&self, tp: usize) -> Option<(&str, usize)> {
        self.heads
            .iter()
            .chain(&self.split_widths)
            .find(|(_, n)| n % tp.max(1) != 0)
            .map(|(name, n)| (name.as_str(), *n))
    }
}

/// Sizes of the three mesh axes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ParallelDims {
    /// Data-parallel replicas.
    pub dp: usize,
    /// Pipeline stages.
    pub pp: usize,
    /// Tensor-parallel ranks.
    pub tp: usize,
}

/// A rank's position on the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Coord {
    /// Data-parallel index.
    pub dp: usize,
    /// Pipeline stage index.
    pub pp: usize,
    /// Tensor-parallel index.
    pub tp: usize,
}

impl fmt::Display for Coord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "(dp {}, pp {}, tp {})", self.dp, self.pp, self.tp)
    }
}

/// A mesh axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Axis {
    /// Data parallel.
    Dp,
    /// Pipeline parallel.
    Pp,
    /// Tensor parallel.
    Tp,
}

impl ParallelDims {
    /// Checks the layout against the world size and the model; everything downstream
    /// trusts a `ParallelDims` that came out of here.
    pub fn new(
        dp: usize,
        pp: usize,
        tp: usize,
        world_size: usize,
        limits: &ModelLimits,
    ) -> Result<ParallelDims, LayoutError> {
        if dp == 0 || pp == 0 || tp == 0 {
            return Err(LayoutError(format!(
                "dp, pp and tp must be at least 1 (got dp={dp}, pp={pp}, tp={tp})"
            )));
        }
        if dp * pp * tp != world_size {
            return Err(LayoutError(format!(
                "dp × pp × tp = {dp} × {pp} × {tp} = {} but there are {world_size} processes; \
                 change [parallel] or the process count so they match",
                dp * pp * tp
            )));
        }
        for (name, h) in &limits.heads {
            if h % tp != 0 {
                return Err(LayoutError(format!(
                    "tp = {tp} does not divide the {h} heads of {name}; pick tp among the divisors of {h}"
                )));
            }
        }
        for (name, w) in &limits.split_widths {
            if w % tp != 0 {
                return Err(LayoutError(format!(
                    "tp = {tp} does not divide {name} = {w}; pick a tp that divides it"
                )));
            }
        }
        if pp > limits.layers {
            return Err(LayoutError(format!(
                "pp = {pp} stages but the model has only {} layers to cut; use pp ≤ {}",
                limits.layers, limits.layers
            )));
        }
        Ok(ParallelDims { dp, pp, tp })
    }

    /// A single process.
    pub fn single() -> ParallelDims {
        ParallelDims {
            dp: 1,
            pp: 1,
            tp: 1,
        }
    }

    /// Total ranks.
    pub fn world_size(&self) -> usize {
        self.dp * self.pp * self.tp
    }

    /// Size of one axis.
    pub fn axis_size(&self, axis: Axis) -> usize {
        match axis {
            Axis::Dp => self.dp,
            Axis::Pp => self.pp,
            Axis::Tp => self.tp,
        }
    }

    /// The rank's coordinates. Panics if `rank >= world_size` (a programming error: ranks
    /// come from the layout itself).
    pub fn coord(&self, rank: usize) -> Coord {
        assert!(rank < self.world_size(), "rank {rank} outside {self:?}");
        Coord {
            dp: rank / (self.pp * self.tp),
            pp: (rank / self.tp) % self.pp,
            tp: rank % self.tp,
        }
    }

    /// The rank at `c`.
    pub fn rank(&self, c: Coord) -> usize {
        assert!(
            c.dp < self.dp && c.pp < self.pp && c.tp < self.tp,
            "{c} outside {self:?}"
        );
        (c.dp * self.pp + c.pp) * self.tp + c.tp
    }

    /// The ranks that share every coordinate of `rank` but `axis`, in axis order: the
    /// process group of that axis. A rank's index in it is its coordinate on the axis.
    pub fn group(&self, rank: usize, axis: Axis) -> Vec<usize> {
        let c = self.coord(rank);
        (0..self.axis_size(axis))
            .map(|i| {
                let mut g = c;
                match axis {
                    Axis::Dp => g.dp = i,
                    Axis::Pp => g.pp = i,
                    Axis::Tp => g.tp = i,
                }
                self.rank(g)
            })
            .collect()
    }

    /// Every distinct group of an axis (each rank in exactly one).
    pub fn all_groups(&self, axis: Axis) -> Vec<Vec<usize>> {
        let mut out: Vec<Vec<usize>> = Vec::new();
        for r in 0..self.world_size() {
            let g = self.group(r, axis);
            if g[0] == r {
                out.push(g);
            }
        }
        out
    }
}

impl fmt::Display for ParallelDims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dp={} pp={} tp={}", self.dp, self.pp, self.tp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits() -> ModelLimits {
        ModelLimits {
            heads: vec![("text".into(), 4)],
            split_widths: vec![("vocab".into(), 64)],
            layers: 8,
        }
    }

    #[test]
    fn refuses_bad_layouts_with_the_reason() {
        let e = ParallelDims::new(2, 2, 2, 6, &limits()).unwrap_err();
        assert!(e.0.contains("6 processes"), "{e}");
        let e = ParallelDims::new(1, 1, 3, 3, &limits()).unwrap_err();
        assert!(e.0.contains("heads"), "{e}");
        let e = ParallelDims::new(1, 9, 1, 9, &limits()).unwrap_err();
        assert!(e.0.contains("layers"), "{e}");
        assert!(ParallelDims::new(0, 1, 1, 0, &limits()).is_err());
    }

    #[test]
    fn tp_is_innermost() {
        let d = ParallelDims::new(2, 2, 2, 8, &limits()).unwrap();
        assert_eq!(d.group(0, Axis::Tp), vec![0, 1]);
        assert_eq!(d.group(0, Axis::Pp), vec![0, 2]);
        assert_eq!(d.group(0, Axis::Dp), vec![0, 4]);
        assert_eq!(
            d.coord(5),
            Coord {
                dp: 1,
                pp: 0,
                tp: 1
            }
        );
    }

    proptest! {
        #[test]
        fn rank_coord_roundtrip_and_groups_partition(dp in 1usize..5, pp in 1usize..5, tp in 1usize..5) {
            let d = ParallelDims { dp, pp, tp };
            for r in 0..d.world_size() {
                prop_assert_eq!(d.rank(d.coord(r)), r);
            }
            for axis in [Axis::Dp, Axis::Pp, Axis::Tp] {
                let groups = d.all_groups(axis);
                prop_assert_eq!(groups.len() * d.axis_size(axis), d.world_size());
                let mut seen = vec![false; d.world_size()];
                for g in &groups {
                    for (i, &r) in g.iter().enumerate() {
                        prop_assert!(!seen[r]);
                        seen[r] = true;
                        prop_assert_eq!(d.group(r, axis), g.clone());
                        let c = d.coord(r);
                        let idx = match axis { Axis::Dp => c.dp, Axis::Pp => c.pp, Axis::Tp => c.tp };
                        prop_assert_eq!(idx, i);
                    }
                }
                prop_assert!(seen.iter().all(|&s| s));
            }
        }
    }
}
