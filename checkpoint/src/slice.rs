//! Rectangular slices of global tensors and the arithmetic of copying between them: where a
//! slice meets another, and which contiguous runs of a row-major buffer a copy touches. Pure
//! logic, property-tested; the reader turns runs into byte ranges.

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// A rectangular block of a global tensor: per dimension, where it starts and how long it
/// is. A piece stored in a shard is a `Slice`; so is what a reader asks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Slice {
    /// First index in each dimension.
    pub offset: Vec<u64>,
    /// Extent in each dimension.
    pub len: Vec<u64>,
}

/// One contiguous copy in elements: `len` elements from `src` (linear index in the source
/// buffer) to `dst` (linear index in the destination buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Linear element index in the source buffer.
    pub src: u64,
    /// Linear element index in the destination buffer.
    pub dst: u64,
    /// Number of elements.
    pub len: u64,
}

impl Slice {
    /// The whole of a tensor of `shape`.
    pub fn full(shape: &[u64]) -> Slice {
        Slice {
            offset: vec![0; shape.len()],
            len: shape.to_vec(),
        }
    }

    /// The slice of per-dimension ranges (`start..end`; `end < start` counts as empty).
    pub fn from_ranges(ranges: &[Range<u64>]) -> Slice {
        Slice {
            offset: ranges.iter().map(|r| r.start).collect(),
            len: ranges
                .iter()
                .map(|r| r.end.saturating_sub(r.start))
                .collect(),
        }
    }

    /// Per-dimension ranges.
    pub fn ranges(&self) -> Vec<Range<u64>> {
        self.offset
            .iter()
            .zip(&self.len)
            .map(|(&o, &l)| o..o + l)
            .collect()
    }

    /// Number of dimensions.
    pub fn ndim(&self) -> usize {
        self.len.len()
    }

    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> u64 {
        self.len.iter().product()
    }

    /// Whether it lies inside a tensor of `shape` (same rank, every range within bounds).
    pub fn fits(&self, shape: &[u64]) -> bool {
        self.offset.len() == shape.len()
            && self.len.len() == shape.len()
            && self
                .offset
                .iter()
                .zip(&self.len)
                .zip(shape)
                .all(|((&o, &l), &s)| o.checked_add(l).is_some_and(|e| e <= s))
    }

    /// The common part of two slices of the same rank, `None` when they do not meet (or
    /// either is empty). Scalars always meet.
    pub fn intersect(&self, other: &Slice) -> Option<Slice> {
        if self.ndim() != other.ndim() {
            return None;
        }
        let mut offset = Vec::with_capacity(self.ndim());
        let mut len = Vec::with_capacity(self.ndim());
        for d in 0..self.ndim() {
            let start = self.offset[d].max(other.offset[d]);
            let end = (self.offset[d] + self.len[d]).min(other.offset[d] + other.len[d]);
            if end <= start {
                return None;
            }
            offset.push(start);
            len.push(end - start);
        }
        Some(Slice { offset, len })
    }

    /// Whether `other` lies inside `self`.
    pub fn contains(&self, other: &Slice) -> bool {
        self.ndim() == other.ndim()
            && (0..self.ndim()).all(|d| {
                other.offset[d] >= self.offset[d]
                    && other.offset[d] + other.len[d] <= self.offset[d] + self.len[d]
            })
    }
}

/// The contiguous runs that copy `region` out of a row-major buffer holding slice `src` into
/// a row-major buffer holding slice `dst`, in increasing source order. `region` must lie
/// inside both (callers pass an intersection); all three share one rank.
///
/// Trailing dimensions that `region` covers completely in both buffers merge into one run,
/// so a row-split (dim 0) copy is a single run and a column split gives one run per row.
pub fn copy_runs(src: &Slice, dst: &Slice, region: &Slice) -> Vec<Run> {
    let n = region.ndim();
    if region.numel() == 0 {
        return Vec::new();
    }
    let strides = |s: &Slice| {
        let mut st = vec![1u64; n];
        for d in (0..n.saturating_sub(1)).rev() {
            st[d] = st[d + 1] * s.len[d + 1];
        }
        st
    };
    let (ss, ds) = (strides(src), strides(dst));
    // Dimensions from `inner` on form one contiguous run in both buffers.
    let mut inner = n;
    let mut run = 1u64;
    while inner > 0 {
        let d = inner - 1;
        run *= region.len[d];
        inner = d;
        if region.len[d] != src.len[d] || region.len[d] != dst.len[d] {
            break;
        }
    }
    let outer = &region.len[..inner];
    let count: u64 = outer.iter().product();
    let mut runs = Vec::with_capacity(count as usize);
    let mut idx = vec![0u64; inner];
    for _ in 0..count {
        let (mut s, mut t) = (0u64, 0u64);
        for d in 0..n {
            let g = region.offset[d] + if d < inner { idx[d] } else { 0 };
            s += (g - src.offset[d]) * ss[d];
            t += (g - dst.offset[d]) * ds[d];
        }
        runs.push(Run {
            src: s,
            dst: t,
            len: run,
        });
        // Odometer increment over the outer dimensions.
        for d in (0..inner).rev() {
            idx[d] += 1;
            if idx[d] < outer[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn linear(s: &Slice, g: &[u64]) -> u64 {
        g.iter()
            .zip(&s.offset)
            .zip(&s.len)
            .fold(0, |i, ((&g, &o), &l)| i * l + (g - o))
    }

    fn elements(s: &Slice) -> Vec<Vec<u64>> {
        let mut out = vec![vec![]];
        for d in 0..s.ndim() {
            out = out
                .into_iter()
                .flat_map(|p| {
                    (s.offset[d]..s.offset[d] + s.len[d]).map(move |i| {
                        let mut q = p.clone();
                        q.push(i);
                        q
                    })
                })
                .collect();
        }
        out
    }

    fn slice_in(shape: Vec<u64>) -> impl Strategy<Value = Slice> {
        shape
            .into_iter()
            .map(|s| (0..s).prop_flat_map(move |o| (Just(o), 1..=s - o)))
            .collect::<Vec<_>>()
            .prop_map(|v| Slice {
                offset: v.iter().map(|p| p.0).collect(),
                len: v.iter().map(|p| p.1).collect(),
            })
    }

    fn shape_and_slices() -> impl Strategy<Value = (Vec<u64>, Slice, Slice)> {
        prop::collection::vec(1u64..6, 0..4).prop_flat_map(|shape| {
            (
                Just(shape.clone()),
                slice_in(shape.clone()),
                slice_in(shape),
            )
        })
    }

    #[test]
    fn examples() {
        let a = Slice::from_ranges(&[0..4, 0..8]);
        let b = Slice::from_ranges(&[2..6, 4..12]);
        assert_eq!(a.intersect(&b), Some(Slice::from_ranges(&[2..4, 4..8])));
        assert_eq!(a.intersect(&Slice::from_ranges(&[4..6, 0..8])), None);
        // Row split: one run.
        let full = Slice::full(&[4, 8]);
        let rows = Slice::from_ranges(&[2..4, 0..8]);
        assert_eq!(
            copy_runs(&full, &rows, &rows),
            vec![Run {
                src: 16,
                dst: 0,
                len: 16
            }]
        );
        // Column split: one run per row.
        let cols = Slice::from_ranges(&[0..4, 4..8]);
        let runs = copy_runs(&full, &cols, &cols);
        assert_eq!(runs.len(), 4);
        assert_eq!(
            runs[1],
            Run {
                src: 12,
                dst: 4,
                len: 4
            }
        );
        // Scalars.
        let s = Slice::full(&[]);
        assert_eq!(s.intersect(&s), Some(s.clone()));
        assert_eq!(
            copy_runs(&s, &s, &s),
            vec![Run {
                src: 0,
                dst: 0,
                len: 1
            }]
        );
    }

    proptest! {
        #[test]
        fn intersection_is_exactly_the_common_elements((shape, a, b) in shape_and_slices()) {
            prop_assert!(a.fits(&shape) && b.fits(&shape));
            let ea = elements(&a);
            let eb = elements(&b);
            let common: Vec<_> = ea.iter().filter(|e| eb.contains(e)).cloned().collect();
            match a.intersect(&b) {
                None => prop_assert!(common.is_empty()),
                Some(i) => {
                    prop_assert!(a.contains(&i) && b.contains(&i));
                    prop_assert_eq!(elements(&i), common);
                }
            }
        }

        #[test]
        fn runs_copy_exactly_the_region((_shape, a, b) in shape_and_slices()) {
            let Some(region) = a.intersect(&b) else { return Ok(()) };
            let runs = copy_runs(&a, &b, &region);
            let got: Vec<(u64, u64)> = runs
                .iter()
                .flat_map(|r| (0..r.len).map(move |k| (r.src + k, r.dst + k)))
                .collect();
            let want: Vec<(u64, u64)> = elements(&region)
                .iter()
                .map(|g| (linear(&a, g), linear(&b, g)))
                .collect();
            prop_assert_eq!(got, want);
            // Maximal runs: no two consecutive runs could have been one.
            for w in runs.windows(2) {
                prop_assert!(!(w[0].src + w[0].len == w[1].src && w[0].dst + w[0].len == w[1].dst));
            }
        }
    }
}
