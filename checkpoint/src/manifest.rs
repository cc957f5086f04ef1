//! The manifest: the one object that makes a checkpoint exist. It records, for every global
//! tensor, its dtype and global shape and where each piece of it lives (shard file, the
//! slice of the global tensor it holds, its absolute byte range in the file, checksums), plus
//! the layout the checkpoint was saved with and its step. Object names inside a checkpoint
//! directory are fixed here.
//!
//! ```text
//! <url>/latest                              {"step": 200, "dir": "step-00000200"}
//! <url>/step-00000200/MANIFEST.json         this struct as JSON, written create-only
//! <url>/step-00000200/shard-00000.safetensors   one per rank that owns state
//! ```

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::dtype::Dtype;
use crate::slice::Slice;

/// The `format` string this crate writes and reads.
pub const FORMAT: &str = "weaver-checkpoint/1";
/// The manifest's object name inside a step directory.
pub const MANIFEST_FILE: &str = "MANIFEST.json";
/// The object at the checkpoint root naming the newest committed step.
pub const LATEST_FILE: &str = "latest";
/// Default bytes per checksum block (see [`Piece::block_crc32c`]).
pub const DEFAULT_CRC_BLOCK: u64 = 1 << 20;

/// The directory name of a step: `step-00000100`.
pub fn step_dir(step: u64) -> String {
    format!("step-{step:08}")
}

/// The step of a directory name produced by [`step_dir`].
pub fn parse_step_dir(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.len() < 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The shard file name of a rank: `shard-00003.safetensors`.
pub fn shard_file(rank: usize) -> String {
    format!("shard-{rank:05}.safetensors")
}

/// How the checkpoint was laid out when saved. `dp`, `pp` and `tp` are for people and for
/// readers that want to know; loading never depends on them (pieces say what they hold).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Layout {
    /// Data-parallel replicas.
    pub dp: usize,
    /// Pipeline stages.
    pub pp: usize,
    /// Tensor-parallel ranks.
    pub tp: usize,
    /// Anything else the caller wants recorded (schedule, optimizer sharding, config).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub extra: serde_json::Value,
}

impl Layout {
    /// A layout with nothing extra.
    pub fn new(dp: usize, pp: usize, tp: usize) -> Layout {
        Layout {
            dp,
            pp,
            tp,
            extra: serde_json::Value::Null,
        }
    }
}

/// One piece of a global tensor as stored in a shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    /// Shard file name inside the step directory.
    pub file: String,
    /// The part of the global tensor it holds (row-major, contiguous in the file).
    pub slice: Slice,
    /// Absolute byte range `[start, end)` in the file.
    pub bytes: [u64; 2],
    /// CRC-32C of the whole piece.
    pub crc32c: u32,
    /// Bytes per checksum block.
    pub crc_block: u64,
    /// CRC-32C of each `crc_block`-sized block of the piece (the last may be shorter). A
    /// ranged read fetches whole blocks and checks each, so every byte a load uses is
    /// verified, without reading the whole piece.
    pub block_crc32c: Vec<u32>,
}

impl Piece {
    /// Bytes in the piece.
    pub fn nbytes(&self) -> u64 {
        self.bytes[1].saturating_sub(self.bytes[0])
    }

    /// Byte range of block `i` relative to the piece start.
    pub(crate) fn block_range(&self, i: u64) -> (u64, u64) {
        let start = i.saturating_mul(self.crc_block);
        (
            start,
            start.saturating_add(self.crc_block).min(self.nbytes()),
        )
    }
}

/// A global tensor and where its pieces are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorInfo {
    /// Element type.
    pub dtype: Dtype,
    /// Global shape.
    pub shape: Vec<u64>,
    /// Disjoint pieces that together cover the tensor exactly.
    pub pieces: Vec<Piece>,
}

impl TensorInfo {
    /// Bytes of the whole tensor.
    pub fn nbytes(&self) -> u64 {
        self.shape.iter().product::<u64>() * self.dtype.size()
    }
}

/// One shard file of the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// File name inside the step directory.
    pub file: String,
    /// The rank that wrote it.
    pub rank: usize,
    /// Size in bytes.
    pub size: u64,
    /// Bytes of safetensors header (length prefix included) before the data.
    pub header_bytes: u64,
    /// The shard's `__metadata__`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// `MANIFEST.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// The training step the state is from.
    pub step: u64,
    /// The layout it was saved with.
    pub layout: Layout,
    /// Every shard file, by rank.
    pub shards: Vec<ShardInfo>,
    /// Every global tensor, by name.
    pub tensors: BTreeMap<String, TensorInfo>,
}

/// What the background upload of one shard reports once the shard is durable: enough for
/// the committer to write the manifest. Serializable, so workers can send it to the
/// coordinator as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardReport {
    /// The step saved.
    pub step: u64,
    /// The file as the manifest will list it.
    pub shard: ShardInfo,
    /// The pieces in the file, in file order.
    pub tensors: Vec<ReportedTensor>,
    /// How long saving the shard took (for metrics; not written to the manifest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timing: Option<ShardTiming>,
}

/// Where a shard's save spent its time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ShardTiming {
    /// Seconds of host copies of its tensors by a [`crate::Snapshotter`] (the time the
    /// trainer stalled; 0 for tensors handed over without one).
    pub copy_s: f64,
    /// Seconds from the start of the upload until the shard was durable.
    pub upload_s: f64,
}

/// One piece in a [`ShardReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedTensor {
    /// Global tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Global shape.
    pub shape: Vec<u64>,
    /// Where the piece is.
    pub piece: Piece,
}

impl Manifest {
    /// Assembles the manifest of `step` from the shard reports and checks it (see
    /// [`Manifest::validate`]); the message says what is inconsistent.
    pub fn from_reports(
        step: u64,
        layout: Layout,
        reports: Vec<ShardReport>,
    ) -> Result<Manifest, String> {
        if reports.is_empty() {
            return Err(format!("no shard reports for step {step}"));
        }
        let mut shards = Vec::with_capacity(reports.len());
        let mut tensors: BTreeMap<String, TensorInfo> = BTreeMap::new();
        for r in reports {
            if r.step != step {
                return Err(format!(
                    "{} reports step {}, committing step {step}",
                    r.shard.file, r.step
                ));
            }
            for t in r.tensors {
                if t.piece.file != r.shard.file {
                    return Err(format!(
                        "{}: piece of {} claims file {}",
                        r.shard.file, t.name, t.piece.file
                    ));
                }
                match tensors.get_mut(&t.name) {
                    Some(info) => {
                        if info.dtype != t.dtype || info.shape != t.shape {
                            return Err(format!(
                                "tensor {}: {} says {} {:?}, another shard says {} {:?}",
                                t.name, r.shard.file, t.dtype, t.shape, info.dtype, info.shape
                            ));
                        }
                        info.pieces.push(t.piece);
                    }
                    None => {
                        tensors.insert(
                            t.name,
                            TensorInfo {
                                dtype: t.dtype,
                                shape: t.shape,
                                pieces: vec![t.piece],
                            },
                        );
                    }
                }
            }
            shards.push(r.shard);
        }
        shards.sort_by_key(|s| s.rank);
        let m = Manifest {
            format: FORMAT.to_string(),
            step,
            layout,
            shards,
            tensors,
        };
        m.validate()?;
        Ok(m)
    }

    /// Checks that the manifest describes a loadable checkpoint: known format, unique shard
    /// files, every piece inside its tensor and its file with a byte range matching its size
    /// and a consistent set of block checksums, and the pieces of each tensor disjoint and
    /// covering it exactly. Never panics, whatever the numbers.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!(
                "format {:?}; this reader understands {FORMAT:?}",
                self.format
            ));
        }
        let l = &self.layout;
        if l.dp == 0 || l.pp == 0 || l.tp == 0 {
            return Err(format!(
                "layout dp={} pp={} tp={} has an empty axis",
                l.dp, l.pp, l.tp
            ));
        }
        let mut files = BTreeMap::new();
        for s in &self.shards {
            if s.file.is_empty() || s.file.contains('/') || s.file.starts_with('.') {
                return Err(format!("shard file name {:?} is not a plain name", s.file));
            }
            if files.insert(s.file.as_str(), s).is_some() {
                return Err(format!("shard file {} is listed twice", s.file));
            }
            if s.header_bytes > s.size {
                return Err(format!("{}: header is larger than the file", s.file));
            }
        }
        for (name, t) in &self.tensors {
            let bad = |m: String| format!("tensor {name}: {m}");
            let numel = t
                .shape
                .iter()
                .try_fold(1u64, |a, &b| a.checked_mul(b))
                .and_then(|n| n.checked_mul(t.dtype.size()).map(|_| n))
                .ok_or_else(|| bad(format!("shape {:?} overflows", t.shape)))?;
            if t.pieces.is_empty() {
                return Err(bad("has no pieces".into()));
            }
            let mut covered = 0u64;
            for (i, p) in t.pieces.iter().enumerate() {
                let shard = files
                    .get(p.file.as_str())
                    .ok_or_else(|| bad(format!("piece in {}, which no shard lists", p.file)))?;
                if !p.slice.fits(&t.shape) {
                    return Err(bad(format!(
                        "piece {:?} in {} lies outside shape {:?}",
                        p.slice.ranges(),
                        p.file,
                        t.shape
                    )));
                }
                let n = p.slice.numel();
                let nbytes = n * t.dtype.size();
                if p.bytes[1] < p.bytes[0] || p.bytes[1] - p.bytes[0] != nbytes {
                    return Err(bad(format!(
                        "piece in {} has byte range {:?} for {nbytes} bytes",
                        p.file, p.bytes
                    )));
                }
                if p.bytes[0] < shard.header_bytes || p.bytes[1] > shard.size {
                    return Err(bad(format!(
                        "byte range {:?} is outside the data of {} ({} bytes)",
                        p.bytes, p.file, shard.size
                    )));
                }
                if p.crc_block == 0 {
                    return Err(bad(format!(
                        "piece in {} has a zero checksum block",
                        p.file
                    )));
                }
                if p.block_crc32c.len() as u64 != nbytes.div_ceil(p.crc_block) {
                    return Err(bad(format!(
                        "piece in {} has {} block checksums for {nbytes} bytes in blocks of {}",
                        p.file,
                        p.block_crc32c.len(),
                        p.crc_block
                    )));
                }
                if combine_blocks(p) != p.crc32c {
                    return Err(bad(format!(
                        "piece in {}: block checksums do not combine to the piece checksum",
                        p.file
                    )));
                }
                for q in &t.pieces[..i] {
                    if let Some(common) = q.slice.intersect(&p.slice) {
                        return Err(bad(format!(
                            "pieces in {} and {} overlap at {:?}",
                            q.file,
                            p.file,
                            common.ranges()
                        )));
                    }
                }
                covered = covered.saturating_add(n);
            }
            if covered != numel {
                return Err(bad(format!("pieces cover {covered} of {numel} elements")));
            }
        }
        Ok(())
    }

    /// The shard files' names.
    pub fn files(&self) -> BTreeSet<&str> {
        self.shards.iter().map(|s| s.file.as_str()).collect()
    }

    /// Total bytes of all shard files.
    pub fn total_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.size).sum()
    }

    /// The manifest as JSON.
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Parses a manifest (without validating it).
    pub fn from_json(bytes: &[u8]) -> Result<Manifest, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }
}

/// The CRC-32C of a whole piece computed from its block checksums.
pub(crate) fn combine_blocks(p: &Piece) -> u32 {
    let mut crc = 0u32;
    for (i, &b) in p.block_crc32c.iter().enumerate() {
        let (s, e) = p.block_range(i as u64);
        crc = if i == 0 {
            b
        } else {
            crc32c::crc32c_combine(crc, b, (e - s) as usize)
        };
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn piece(file: &str, slice: Slice, start: u64, data: &[u8], block: u64) -> Piece {
        let blocks: Vec<u32> = data.chunks(block as usize).map(crc32c::crc32c).collect();
        Piece {
            file: file.into(),
            slice,
            bytes: [start, start + data.len() as u64],
            crc32c: crc32c::crc32c(data),
            crc_block: block,
            block_crc32c: blocks,
        }
    }

    fn manifest() -> Manifest {
        let data: Vec<u8> = (0..64).collect();
        let shards = vec![
            ShardInfo {
                file: shard_file(0),
                rank: 0,
                size: 100,
                header_bytes: 32,
                metadata: BTreeMap::new(),
            },
            ShardInfo {
                file: shard_file(1),
                rank: 1,
                size: 100,
                header_bytes: 32,
                metadata: BTreeMap::new(),
            },
        ];
        let t = TensorInfo {
            dtype: Dtype::F32,
            shape: vec![4, 8],
            pieces: vec![
                piece(
                    &shard_file(0),
                    Slice::from_ranges(&[0..2, 0..8]),
                    32,
                    &data,
                    10,
                ),
                piece(
                    &shard_file(1),
                    Slice::from_ranges(&[2..4, 0..8]),
                    32,
                    &data,
                    7,
                ),
            ],
        };
        Manifest {
            format: FORMAT.into(),
            step: 7,
            layout: Layout::new(1, 1, 2),
            shards,
            tensors: BTreeMap::from([("w".to_string(), t)]),
        }
    }

    #[test]
    fn names() {
        assert_eq!(step_dir(100), "step-00000100");
        assert_eq!(parse_step_dir("step-00000100"), Some(100));
        assert_eq!(parse_step_dir("step-123456789"), Some(123456789));
        assert_eq!(parse_step_dir("step-1"), None);
        assert_eq!(parse_step_dir("step-0000010x"), None);
        assert_eq!(shard_file(3), "shard-00003.safetensors");
    }

    #[test]
    fn validate_catches_inconsistencies() {
        let m = manifest();
        m.validate().unwrap();
        let mut o = m.clone();
        o.tensors.get_mut("w").unwrap().pieces[1].slice = Slice::from_ranges(&[1..3, 0..8]);
        assert!(o.validate().unwrap_err().contains("overlap"));
        let mut g = m.clone();
        g.tensors.get_mut("w").unwrap().shape = vec![5, 8];
        assert!(g.validate().unwrap_err().contains("cover"));
        let mut c = m.clone();
        c.tensors.get_mut("w").unwrap().pieces[0].block_crc32c[1] ^= 1;
        assert!(c.validate().unwrap_err().contains("combine"));
        let mut f = m.clone();
        f.tensors.get_mut("w").unwrap().pieces[0].file = "shard-00009.safetensors".into();
        assert!(f.validate().unwrap_err().contains("no shard lists"));
        let mut b = m.clone();
        b.tensors.get_mut("w").unwrap().pieces[0].bytes = [90, 154];
        assert!(b.validate().unwrap_err().contains("outside"));
        let mut v = m;
        v.format = "weaver-checkpoint/9".into();
        assert!(v.validate().unwrap_err().contains("format"));
    }

    fn arb_manifest() -> impl Strategy<Value = Manifest> {
        let arb_slice = (
            prop::collection::vec(0u64..1000, 0..4),
            prop::collection::vec(0u64..1000, 0..4),
        )
            .prop_map(|(offset, len)| Slice { offset, len });
        let arb_piece = (
            "[a-z0-9.-]{1,12}",
            arb_slice,
            any::<[u64; 2]>(),
            any::<u32>(),
            any::<u64>(),
            prop::collection::vec(any::<u32>(), 0..5),
        )
            .prop_map(
                |(file, slice, bytes, crc32c, crc_block, block_crc32c)| Piece {
                    file,
                    slice,
                    bytes,
                    crc32c,
                    crc_block,
                    block_crc32c,
                },
            );
        let arb_tensor = (
            prop::sample::select(Dtype::ALL.to_vec()),
            prop::collection::vec(any::<u64>(), 0..4),
            prop::collection::vec(arb_piece, 0..4),
        )
            .prop_map(|(dtype, shape, pieces)| TensorInfo {
                dtype,
                shape,
                pieces,
            });
        let arb_shard = (
            "[a-z0-9.-]{1,12}",
            any::<usize>(),
            any::<u64>(),
            any::<u64>(),
            prop::collection::btree_map("[a-z.]{1,8}", ".{0,8}", 0..3),
        )
            .prop_map(|(file, rank, size, header_bytes, metadata)| ShardInfo {
                file,
                rank,
                size,
                header_bytes,
                metadata,
            });
        (
            any::<u64>(),
            (1usize..9, 1usize..9, 1usize..9),
            prop::collection::vec(arb_shard, 0..4),
            prop::collection::btree_map("[a-z._0-9]{1,16}", arb_tensor, 0..5),
            prop::option::of("[a-z]{1,8}"),
        )
            .prop_map(|(step, (dp, pp, tp), shards, tensors, extra)| Manifest {
                format: FORMAT.into(),
                step,
                layout: Layout {
                    dp,
                    pp,
                    tp,
                    extra: extra.map_or(
                        serde_json::Value::Null,
                        |s| serde_json::json!({ "note": s }),
                    ),
                },
                shards,
                tensors,
            })
    }

    proptest! {
        #[test]
        fn manifest_json_round_trips(m in arb_manifest()) {
            let back = Manifest::from_json(&m.to_json()).unwrap();
            prop_assert_eq!(&back, &m);
            // Arbitrary numbers never make validation panic.
            let _ = m.validate();
        }

        #[test]
        fn parsing_garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(m) = Manifest::from_json(&bytes) {
                let _ = m.validate();
            }
        }
    }
}
