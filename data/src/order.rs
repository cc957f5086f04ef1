//! The order of the training samples: a pure function of the seed and the shard list, the
//! same whatever the parallel layout, and resumable from a small position per stream.
//!
//! - The shards are visited as one endless sequence: epoch `e` is a seeded permutation of
//!   all `N` shards, and global shard position `g` is shard `perm_e[g mod N]` with
//!   `e = g div N`.
//! - `S = data.streams` logical streams read that sequence round-robin: stream `s` reads
//!   positions `s, s + S, s + 2S, ...` (its `k`-th shard is position `s + k·S`). Every shard
//!   is read once per `N` consecutive positions, whatever `N mod S`.
//! - Within a shard, samples are taken in windows of `data.shuffle_buffer` consecutive
//!   samples, each window in a seeded permutation (bounded memory, bounded shuffle).
//! - A step's global batch is `B / S` samples from each stream, stream 0's first. The
//!   data-parallel rank `d` of `dp` owns the contiguous block of streams
//!   `d·S/dp .. (d+1)·S/dp`, so its share of the global batch is the contiguous slice
//!   `d·B/dp .. (d+1)·B/dp` (the micro-batches the trainer has always given it) and it
//!   reads only the shards of its own streams.
//! - A stream's position is where its next sample comes from (shard `k`, sample `i` of
//!   the shard in shuffled order, the byte offset of that sample's window) plus its
//!   counters. Each stream's position is its own checkpoint piece, written by the rank that
//!   owns it; a job resumed with another `dp` hands each stream to its new owner.

use serde::{Deserialize, Serialize};
use weaver_models::data::Rng;

use crate::error::{DataError, Result};

/// Domain separators of the seeded draws (so that no two kinds of draw share a stream).
const EPOCH_PERM: u64 = 0x5348_4152; // "SHAR"
const WINDOW_PERM: u64 = 0x5749_4e44; // "WIND"
const CROP: u64 = 0x4352_4f50; // "CROP"

/// The layout-independent order of a shard set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    seed: u64,
    shards: u64,
    streams: u64,
    window: u64,
}

impl Order {
    /// The order of `shards` shards read by `streams` streams with shuffle windows of
    /// `window` samples. Checks `1 ≤ streams ≤ shards` and `window ≥ 1`.
    pub fn new(seed: u64, shards: usize, streams: usize, window: usize) -> Result<Order> {
        if streams == 0 {
            return Err(DataError::config("data.streams", "must be at least 1"));
        }
        if shards < streams {
            return Err(DataError::config(
                "data.streams",
                format!(
                    "{streams} streams but only {shards} shards: every stream needs a shard of \
                     its own; lower data.streams or add shards"
                ),
            ));
        }
        if window == 0 {
            return Err(DataError::config(
                "data.shuffle_buffer",
                "must be at least 1",
            ));
        }
        Ok(Order {
            seed,
            shards: shards as u64,
            streams: streams as u64,
            window: window as u64,
        })
    }

    /// Number of streams.
    pub fn streams(&self) -> usize {
        self.streams as usize
    }

    /// Number of shards.
    pub fn shards(&self) -> usize {
        self.shards as usize
    }

    /// Samples per shuffle window.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// Global shard position of stream `stream`'s `k`-th shard.
    pub fn global(&self, stream: usize, k: u64) -> u64 {
        stream as u64 + k * self.streams
    }

    /// The epoch of global position `g`.
    pub fn epoch_of(&self, g: u64) -> u64 {
        g / self.shards
    }

    /// The seeded shard permutation of `epoch`.
    pub fn epoch_permutation(&self, epoch: u64) -> Vec<usize> {
        permutation(self.shards as usize, Rng::new(self.seed, EPOCH_PERM, epoch))
    }

    /// The shard (index into the shard list) at global position `g`, given the permutation
    /// of its epoch.
    pub fn shard_at(&self, g: u64, perm: &[usize]) -> usize {
        perm[(g % self.shards) as usize]
    }

    /// The permutation of window `w` of the shard read at global position `g`, for a window
    /// of `len` samples (the last window of a shard may be short).
    pub fn window_permutation(&self, g: u64, w: u64, len: usize) -> Vec<usize> {
        permutation(
            len,
            Rng::new(self.seed ^ g.wrapping_mul(0x9e37_79b9), WINDOW_PERM, w),
        )
    }

    /// The generator of a sample's random crop: a function of where the sample is read, so
    /// that a resumed run crops exactly as the uninterrupted one would.
    pub fn crop_rng(&self, g: u64, sample: u64) -> Rng {
        Rng::new(self.seed ^ g.wrapping_mul(0xc2b2_ae3d), CROP, sample)
    }
}

/// A Fisher–Yates permutation of `0..n`.
fn permutation(n: usize, mut rng: Rng) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i + 1);
        p.swap(i, j);
    }
    p
}

/// The streams data-parallel rank `dp_rank` of `dp` owns (a contiguous block).
pub fn owned_streams(streams: usize, dp: usize, dp_rank: usize) -> std::ops::Range<usize> {
    let per = streams / dp.max(1);
    dp_rank * per..(dp_rank + 1) * per
}

/// Checks that a layout can read `streams` streams with a global batch of `global_batch`:
/// `dp` must divide the streams (each rank owns whole streams) and the streams must divide
/// the global batch (each step takes the same number of samples from every stream).
pub fn check_layout(streams: usize, dp: usize, global_batch: usize) -> Result<()> {
    if dp == 0 || !streams.is_multiple_of(dp) {
        return Err(DataError::config(
            "data.streams",
            format!(
                "data.streams = {streams} must be a multiple of parallel.dp = {dp} (each \
                 data-parallel rank reads whole streams); pick a streams count that every dp you \
                 will run with divides, e.g. 8 or 16"
            ),
        ));
    }
    if !global_batch.is_multiple_of(streams) {
        return Err(DataError::config(
            "data.streams",
            format!(
                "train.global_batch = {global_batch} must be a multiple of data.streams = \
                 {streams} (every step takes the same number of samples from each stream)"
            ),
        ));
    }
    Ok(())
}

/// Where one stream stands: everything needed to continue it exactly, and its counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StreamPosition {
    /// The stream's shard ordinal: its `k`-th shard (global position `stream + k·S`).
    pub shard: u64,
    /// Samples of that shard already consumed, in shuffled order.
    pub sample: u64,
    /// Byte offset in the shard of the first sample of the window holding `sample` (0 for
    /// the first window): a resumed reader starts there instead of at the shard's start.
    pub offset: u64,
    /// Good samples taken.
    pub taken: u64,
    /// Samples skipped because their image was missing or did not decode.
    pub bad_image: u64,
    /// Samples skipped because their caption was missing, empty or unreadable.
    pub bad_caption: u64,
    /// Tar members that could not be read (a corrupt header, a truncated member).
    pub bad_members: u64,
    /// Shards skipped because they could not be read after retries.
    pub shards_skipped: u64,
}

/// Format version of a saved [`StreamPosition`].
const POSITION_VERSION: i64 = 1;

impl StreamPosition {
    /// The checkpoint piece of stream `stream`.
    pub fn piece_name(stream: usize) -> String {
        format!("data.stream.{stream:05}")
    }

    /// The values saved in the checkpoint: a version, the stream, then the fields.
    pub fn to_i64s(&self, stream: usize) -> Vec<i64> {
        [
            POSITION_VERSION,
            stream as i64,
            self.shard as i64,
            self.sample as i64,
            self.offset as i64,
            self.taken as i64,
            self.bad_image as i64,
            self.bad_caption as i64,
            self.bad_members as i64,
            self.shards_skipped as i64,
        ]
        .to_vec()
    }

    /// Reads back what [`StreamPosition::to_i64s`] wrote for `stream`.
    pub fn from_i64s(stream: usize, v: &[i64]) -> Result<StreamPosition> {
        let piece = StreamPosition::piece_name(stream);
        let bad = |message: String| DataError::BadPosition {
            piece: piece.clone(),
            message,
        };
        if v.len() != 10 || v[0] != POSITION_VERSION {
            return Err(bad(format!(
                "expected 10 values of version {POSITION_VERSION}, got {} values{}",
                v.len(),
                v.first()
                    .map(|x| format!(" of version {x}"))
                    .unwrap_or_default()
            )));
        }
        if v[1] != stream as i64 {
            return Err(bad(format!("holds stream {}, not {stream}", v[1])));
        }
        if v[2..].iter().any(|&x| x < 0) {
            return Err(bad("negative values".into()));
        }
        let u = |i: usize| v[i] as u64;
        Ok(StreamPosition {
            shard: u(2),
            sample: u(3),
            offset: u(4),
            taken: u(5),
            bad_image: u(6),
            bad_caption: u(7),
            bad_members: u(8),
            shards_skipped: u(9),
        })
    }

    /// Bad samples (image or caption).
    pub fn bad(&self) -> u64 {
        self.bad_image + self.bad_caption
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_shard_once_per_n_positions_whatever_the_streams() {
        for (n, s) in [(7, 3), (8, 4), (5, 5), (9, 2)] {
            let o = Order::new(3, n, s, 4).unwrap();
            // Streams read positions round-robin; positions 0..N of epoch 0 cover each shard once.
            let mut seen = vec![0; n];
            let perm = o.epoch_permutation(0);
            for stream in 0..s {
                let mut k = 0;
                while o.global(stream, k) < n as u64 {
                    seen[o.shard_at(o.global(stream, k), &perm)] += 1;
                    k += 1;
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "{n} {s}: {seen:?}");
        }
        let o = Order::new(3, 10, 2, 4).unwrap();
        assert_ne!(o.epoch_permutation(0), o.epoch_permutation(1));
    }

    #[test]
    fn ownership_is_contiguous_and_covers_every_stream() {
        for dp in [1, 2, 4, 8] {
            let mut all: Vec<usize> = (0..dp).flat_map(|d| owned_streams(8, dp, d)).collect();
            all.sort();
            assert_eq!(all, (0..8).collect::<Vec<_>>());
        }
        assert!(check_layout(8, 3, 64).is_err());
        assert!(check_layout(8, 4, 60).is_err());
        assert!(check_layout(8, 4, 64).is_ok());
        assert!(Order::new(0, 3, 4, 1).is_err());
    }

    #[test]
    fn positions_round_trip_and_refuse_foreign_pieces() {
        let p = StreamPosition {
            shard: 3,
            sample: 17,
            offset: 4096,
            taken: 100,
            bad_image: 2,
            bad_caption: 1,
            bad_members: 4,
            shards_skipped: 1,
        };
        assert_eq!(StreamPosition::from_i64s(5, &p.to_i64s(5)).unwrap(), p);
        assert!(StreamPosition::from_i64s(4, &p.to_i64s(5)).is_err());
        assert!(StreamPosition::from_i64s(5, &[1, 5]).is_err());
    }

    proptest! {
        #[test]
        fn window_permutations_are_permutations(g in 0u64..1000, w in 0u64..50, len in 0usize..300) {
            let o = Order::new(1, 4, 2, 300).unwrap();
            let mut p = o.window_permutation(g, w, len);
            prop_assert_eq!(p.clone(), o.window_permutation(g, w, len));
            p.sort();
            prop_assert_eq!(p, (0..len).collect::<Vec<_>>());
        }
    }
}
