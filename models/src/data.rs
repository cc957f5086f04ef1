//! The synthetic image–caption dataset and the resumable sampler.
//!
//! A sample is a pure function of (seed, split, index): an image with one or two shapes of
//! several kinds, colours and sizes at random positions, and a caption from a small grammar
//! that describes them ("a small red circle left of a large blue square"). The held-out split
//! draws from a different stream of the same distribution, so evaluation measures
//! generalisation to unseen images.
//!
//! The sampler walks a seeded permutation of the training indices epoch after epoch; its
//! state is two integers, so a resumed job draws exactly the batches an uninterrupted one
//! would have drawn, whatever the parallel layout.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::{ModelError, Result};
pub use crate::objectives::TextRows;
use crate::tokenizer::{encode_padded, Tokenizer};

/// Shape names.
pub const SHAPES: [&str; 4] = ["circle", "square", "triangle", "diamond"];
/// Colour names and their RGB values in [0, 1].
pub const COLORS: [(&str, [f32; 3]); 6] = [
    ("red", [0.90, 0.12, 0.10]),
    ("green", [0.15, 0.80, 0.20]),
    ("blue", [0.15, 0.30, 0.95]),
    ("yellow", [0.95, 0.90, 0.10]),
    ("purple", [0.60, 0.20, 0.80]),
    ("white", [0.95, 0.95, 0.95]),
];
/// Size names and their radius as a fraction of the image side.
pub const SIZES: [(&str, f32); 2] = [("small", 0.12), ("large", 0.2)];
/// Spatial relations between two objects (the first relative to the second).
pub const RELATIONS: [&str; 4] = ["left of", "right of", "above", "below"];
/// Every word the grammar uses.
pub const GRAMMAR_WORDS: [&str; 18] = [
    "a", "small", "large", "red", "green", "blue", "yellow", "purple", "white", "circle", "square",
    "triangle", "diamond", "left", "right", "of", "above", "below",
];

/// Words of the synthetic questions and answers ([`Scene::question`]), after the grammar's
/// in the built-in tokenizer.
pub const QUESTION_WORDS: [&str; 14] = [
    "what", "color", "shape", "size", "is", "the", "how", "many", "shapes", "one", "two", "yes",
    "no", "?",
];

/// Training or held-out data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The training stream.
    Train,
    /// The held-out stream (disjoint random draws).
    Heldout,
}

/// SplitMix64: tiny, fast, and a fixed function of its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for the key `(seed, stream, index)`.
    pub fn new(seed: u64, stream: u64, index: u64) -> Rng {
        let mut r = Rng(seed ^ 0x9e37_79b9_7f4a_7c15);
        r.0 ^= r
            .next_u64()
            .wrapping_add(stream.wrapping_mul(0xbf58_476d_1ce4_e5b9));
        r.0 ^= r
            .next_u64()
            .wrapping_add(index.wrapping_mul(0x94d0_49bb_1331_11eb));
        r
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }

    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (((self.next_u64() >> 32) * n as u64) >> 32) as usize
    }
}

/// One object in a scene.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Object {
    /// Index into [`SHAPES`].
    pub shape: usize,
    /// Index into [`COLORS`].
    pub color: usize,
    /// Index into [`SIZES`].
    pub size: usize,
    /// Centre, in pixels.
    pub cx: f32,
    /// Centre, in pixels.
    pub cy: f32,
    /// Radius, in pixels.
    pub r: f32,
}

impl Object {
    fn phrase(&self) -> String {
        format!(
            "a {} {} {}",
            SIZES[self.size].0, COLORS[self.color].0, SHAPES[self.shape]
        )
    }

    fn covers(&self, x: f32, y: f32) -> bool {
        let (dx, dy, r) = (x - self.cx, y - self.cy, self.r);
        match self.shape {
            0 => dx * dx + dy * dy <= r * r,
            1 => dx.abs() <= 0.85 * r && dy.abs() <= 0.85 * r,
            2 => dy >= -r && dy <= 0.8 * r && dx.abs() <= (dy + r) / 1.8,
            _ => dx.abs() + dy.abs() <= r,
        }
    }
}

/// A generated scene: its objects and (for two) the relation of the first to the second.
#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    /// One or two objects.
    pub objects: Vec<Object>,
    /// Index into [`RELATIONS`] when there are two objects.
    pub relation: Option<usize>,
}

impl Scene {
    /// Draws the scene of `(seed, split, index)` for `size`-pixel images.
    pub fn generate(seed: u64, split: Split, index: u64, size: usize, max_objects: usize) -> Scene {
        let stream = match split {
            Split::Train => 1,
            Split::Heldout => 2,
        };
        let mut rng = Rng::new(seed, stream, index);
        let s = size as f32;
        let object = |rng: &mut Rng| {
            let sz = rng.below(SIZES.len());
            let r = SIZES[sz].1 * s * rng.range(0.95, 1.05);
            Object {
                shape: rng.below(SHAPES.len()),
                color: rng.below(COLORS.len()),
                size: sz,
                cx: 0.0,
                cy: 0.0,
                r,
            }
        };
        let two = max_objects >= 2 && rng.unit() < 0.75;
        if !two {
            let mut a = object(&mut rng);
            a.cx = rng.range(a.r, s - a.r);
            a.cy = rng.range(a.r, s - a.r);
            return Scene {
                objects: vec![a],
                relation: None,
            };
        }
        let (mut a, mut b) = (object(&mut rng), object(&mut rng));
        let relation = rng.below(RELATIONS.len());
        // Rejection-sample positions until the relation is unambiguous (the dominant axis
        // at least twice the other) and the objects do not touch.
        for attempt in 0.. {
            a.cx = rng.range(a.r, s - a.r);
            a.cy = rng.range(a.r, s - a.r);
            b.cx = rng.range(b.r, s - b.r);
            b.cy = rng.range(b.r, s - b.r);
            let (dx, dy) = (a.cx - b.cx, a.cy - b.cy);
            let apart = dx.abs() >= a.r + b.r + 1.0 || dy.abs() >= a.r + b.r + 1.0;
            let ok = match relation {
                0 => dx < 0.0 && dx.abs() >= 2.0 * dy.abs(),
                1 => dx > 0.0 && dx.abs() >= 2.0 * dy.abs(),
                2 => dy < 0.0 && dy.abs() >= 2.0 * dx.abs(),
                _ => dy > 0.0 && dy.abs() >= 2.0 * dx.abs(),
            };
            if apart && ok {
                break;
            }
            if attempt > 200 {
                // Deterministic fallback: opposite edges along the relation's axis.
                let (lo_a, lo_b) = (a.r, b.r);
                let mid = s / 2.0;
                match relation {
                    0 => (a.cx, a.cy, b.cx, b.cy) = (lo_a, mid, s - lo_b, mid),
                    1 => (a.cx, a.cy, b.cx, b.cy) = (s - lo_a, mid, lo_b, mid),
                    2 => (a.cx, a.cy, b.cx, b.cy) = (mid, lo_a, mid, s - lo_b),
                    _ => (a.cx, a.cy, b.cx, b.cy) = (mid, s - lo_a, mid, lo_b),
                }
                break;
            }
        }
        Scene {
            objects: vec![a, b],
            relation: Some(relation),
        }
    }

    /// The caption.
    pub fn caption(&self) -> String {
        match (self.objects.as_slice(), self.relation) {
            ([a, b], Some(rel)) => format!("{} {} {}", a.phrase(), RELATIONS[rel], b.phrase()),
            _ => self.objects[0].phrase(),
        }
    }

    /// Renders into `out` (`3 × size × size`, channel-major), normalised to about [-1, 1].
    pub fn render(&self, seed: u64, index: u64, size: usize, out: &mut [f32]) {
        let plane = size * size;
        let mut noise = Rng::new(seed, 3, index);
        for y in 0..size {
            for x in 0..size {
                let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
                let mut rgb = [0.1f32; 3];
                for o in &self.objects {
                    if o.covers(px, py) {
                        rgb = COLORS[o.color].1;
                    }
                }
                for (c, v) in rgb.iter().enumerate() {
                    let n = noise.range(-0.04, 0.04);
                    out[c * plane + y * size + x] = (v + n - 0.5) * 2.0;
                }
            }
        }
    }
}

/// A batch on a device.
#[derive(Debug)]
pub struct Batch {
    /// `[B, 3, H, W]` float.
    pub images: Tensor,
    /// `[B, T]` int64: BOS, words, EOS, padding.
    pub tokens: Tensor,
    /// Position of EOS in each row, `[B]` int64.
    pub eos: Tensor,
    /// Sample indices it came from.
    pub indices: Vec<u64>,
    /// The masked-language-modelling rows of the samples (`train.mlm_weight > 0`;
    /// [`crate::objectives::mlm_rows`]).
    pub mlm: Option<TextRows>,
    /// The question/answer rows of the samples (`train.vqa_weight > 0`;
    /// [`crate::objectives::vqa_rows`]).
    pub vqa: Option<TextRows>,
}

impl Batch {
    /// Rows `start..start+len`.
    pub fn slice(&self, start: usize, len: usize) -> Result<Batch> {
        let (s, l) = (start as i64, len as i64);
        Ok(Batch {
            images: self.images.f_narrow(0, s, l)?,
            tokens: self.tokens.f_narrow(0, s, l)?,
            eos: self.eos.f_narrow(0, s, l)?,
            indices: self.indices[start..start + len].to_vec(),
            mlm: self.mlm.as_ref().map(|r| r.slice(s, l)).transpose()?,
            vqa: self.vqa.as_ref().map(|r| r.slice(s, l)).transpose()?,
        })
    }

    /// This batch with its tokens cut after the last column where some row holds a
    /// non-padding token (never before a row's EOS): with causal text layers, the columns
    /// cut could only feed positions whose targets are padding, so every loss keeps its
    /// value while the text layers do less work. Reads two small reductions of the tokens
    /// back to the host (a device sync on an accelerator). Batches with objective rows
    /// (MLM, VQA) are refused: their rows have lengths of their own.
    pub fn trim_text(&self, pad_id: i64) -> Result<Batch> {
        if self.extra_rows() > 0 {
            return Err(ModelError::Data(
                "trim_text on a batch with MLM/VQA rows (their lengths are their own)".into(),
            ));
        }
        let t = self.tokens.size()[1];
        if self.is_empty() || t == 0 {
            return self.slice(0, self.len());
        }
        let dev = self.tokens.device();
        // 1 + the last column with a non-padding token (0 where none).
        let used = self.tokens.f_ne(pad_id)?.f_any_dim(0, false)?;
        let ends = Tensor::f_arange_start(1, t + 1, (Kind::Int64, dev))?
            .f_mul(&used.f_to_kind(Kind::Int64)?)?;
        let last_token = ends.f_max()?.f_int64_value(&[])?;
        let last_eos = self.eos.f_max()?.f_int64_value(&[])? + 1;
        let keep = last_token.max(last_eos).clamp(1, t);
        Ok(Batch {
            tokens: self.tokens.f_narrow(1, 0, keep)?,
            ..self.slice(0, self.len())?
        })
    }

    /// Groups of extra text rows the objectives add (MLM, VQA): each is one more row per
    /// sample in the text and multimodal layers.
    pub fn extra_rows(&self) -> usize {
        usize::from(self.mlm.is_some()) + usize::from(self.vqa.is_some())
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// Whether it holds no samples.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }
}

/// The dataset: renders and tokenises samples on demand.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Seed of every sample.
    pub seed: u64,
    /// Image side.
    pub image_size: usize,
    /// Objects per image, at most.
    pub max_objects: usize,
    /// Tokens per caption.
    pub text_len: usize,
    /// Tokenizer.
    pub tokenizer: Arc<dyn Tokenizer>,
}

impl Dataset {
    /// The scene of a sample.
    pub fn scene(&self, split: Split, index: u64) -> Scene {
        Scene::generate(self.seed, split, index, self.image_size, self.max_objects)
    }

    /// The caption of a sample.
    pub fn caption(&self, split: Split, index: u64) -> String {
        self.scene(split, index).caption()
    }

    /// Renders and tokenises `indices` into a batch on `device`.
    pub fn batch(&self, split: Split, indices: &[u64], device: Device) -> Result<Batch> {
        let s = self.image_size;
        let per = 3 * s * s;
        let mut pixels = vec![0f32; per * indices.len()];
        let mut tokens = Vec::with_capacity(indices.len() * self.text_len);
        let mut eos = Vec::with_capacity(indices.len());
        let seed = self.seed ^ if split == Split::Train { 0 } else { 0x5eed };
        for (i, &idx) in indices.iter().enumerate() {
            let scene = self.scene(split, idx);
            scene.render(seed, idx, s, &mut pixels[i * per..(i + 1) * per]);
            let ids = encode_padded(self.tokenizer.as_ref(), &scene.caption(), self.text_len)?;
            let e = ids
                .iter()
                .position(|&t| t == self.tokenizer.eos_id())
                .unwrap_or(self.text_len - 1);
            eos.push(e as i64);
            tokens.extend_from_slice(&ids);
        }
        let b = indices.len() as i64;
        Ok(Batch {
            images: Tensor::f_from_slice(&pixels)?
                .f_reshape([b, 3, s as i64, s as i64])?
                .f_to_device(device)?,
            tokens: Tensor::f_from_slice(&tokens)?
                .f_reshape([b, self.text_len as i64])?
                .f_to_device(device)?,
            eos: Tensor::f_from_slice(&eos)?.f_to_device(device)?,
            indices: indices.to_vec(),
            mlm: None,
            vqa: None,
        })
    }

    /// The first `n` held-out samples with pairwise distinct captions (so that retrieval
    /// has exactly one right answer). A task with fewer distinct captions than `n` (a small
    /// `data.max_objects`, say) is a configuration error naming `eval.pool`, found after a
    /// bounded search rather than by searching forever.
    pub fn eval_pool(&self, n: usize) -> Result<Vec<u64>> {
        // Captions repeat long before this many draws when the task has fewer than `n`.
        let limit = (n as u64).saturating_mul(1000).max(100_000);
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::with_capacity(n);
        let mut i = 0u64;
        while out.len() < n {
            if i == limit {
                return Err(ModelError::BadConfig {
                    key: "eval.pool".into(),
                    message: format!(
                        "the held-out task has only {} distinct captions in its first {limit} \
                         samples, fewer than eval.pool = {n}: lower eval.pool or make the task \
                         richer (data.max_objects)",
                        out.len()
                    ),
                });
            }
            if seen.insert(self.caption(Split::Heldout, i)) {
                out.push(i);
            }
            i += 1;
        }
        Ok(out)
    }
}

/// Where the sampler stands: everything needed to resume it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SamplerState {
    /// Current epoch.
    pub epoch: u64,
    /// Samples of this epoch already drawn.
    pub position: u64,
}

/// Draws training indices from a fresh seeded permutation each epoch.
#[derive(Debug, Clone)]
pub struct Sampler {
    seed: u64,
    size: u64,
    state: SamplerState,
    perm: Vec<u64>,
}

impl Sampler {
    /// A sampler over `0..size` starting at `state`.
    pub fn new(seed: u64, size: u64, state: SamplerState) -> Sampler {
        let mut s = Sampler {
            seed,
            size,
            state,
            perm: Vec::new(),
        };
        s.shuffle();
        s
    }

    fn shuffle(&mut self) {
        let mut rng = Rng::new(self.seed, 4, self.state.epoch);
        self.perm = (0..self.size).collect();
        for i in (1..self.perm.len()).rev() {
            let j = rng.below(i + 1);
            self.perm.swap(i, j);
        }
    }

    /// The next `n` indices (crossing into the next epoch when this one runs out).
    pub fn next_indices(&mut self, n: usize) -> Vec<u64> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if self.state.position >= self.size {
                self.state.epoch += 1;
                self.state.position = 0;
                self.shuffle();
            }
            out.push(self.perm[self.state.position as usize]);
            self.state.position += 1;
        }
        out
    }

    /// The current state.
    pub fn state(&self) -> SamplerState {
        self.state
    }
}

/// Tokens per sample for throughput figures: image patches plus caption tokens.
pub fn tokens_per_sample(num_patches: usize, text_len: usize) -> usize {
    num_patches + text_len
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::GrammarTokenizer;
    use tch::Kind;

    fn mean_abs(images: &Tensor) -> f64 {
        images.abs().mean(Kind::Float).double_value(&[])
    }

    fn ds() -> Dataset {
        Dataset {
            seed: 3,
            image_size: 32,
            max_objects: 2,
            text_len: 16,
            tokenizer: Arc::new(GrammarTokenizer::new()),
        }
    }

    #[test]
    fn samples_are_a_function_of_seed_split_index() {
        let d = ds();
        let a = d.batch(Split::Train, &[5, 9], Device::Cpu).unwrap();
        let b = d.batch(Split::Train, &[5, 9], Device::Cpu).unwrap();
        assert!(a.images.equal(&b.images) && a.tokens.equal(&b.tokens));
        let h = d.batch(Split::Heldout, &[5, 9], Device::Cpu).unwrap();
        assert!(!a.images.equal(&h.images));
        assert!(mean_abs(&a.images) > 0.1);
    }

    #[test]
    fn captions_follow_the_scene() {
        let d = ds();
        let mut saw = [false; 4];
        for i in 0..400 {
            let s = d.scene(Split::Train, i);
            let c = s.caption();
            assert!(c.starts_with("a "));
            if let Some(rel) = s.relation {
                saw[rel] = true;
                let (a, b) = (s.objects[0], s.objects[1]);
                match rel {
                    0 => assert!(a.cx < b.cx, "{c}"),
                    1 => assert!(a.cx > b.cx, "{c}"),
                    2 => assert!(a.cy < b.cy, "{c}"),
                    _ => assert!(a.cy > b.cy, "{c}"),
                }
                assert!(c.contains(RELATIONS[rel]));
            }
        }
        assert!(saw.iter().all(|&s| s), "every relation occurs");
    }

    #[test]
    fn eval_pool_has_distinct_captions() {
        let d = ds();
        let pool = d.eval_pool(100).unwrap();
        let caps: std::collections::HashSet<_> =
            pool.iter().map(|&i| d.caption(Split::Heldout, i)).collect();
        assert_eq!(caps.len(), 100);
    }

    #[test]
    fn a_pool_larger_than_the_task_is_a_config_error() {
        // One object per image has few distinct captions (colours x shapes x sizes).
        let d = Dataset {
            max_objects: 1,
            ..ds()
        };
        match d.eval_pool(200) {
            Err(ModelError::BadConfig { key, .. }) => assert_eq!(key, "eval.pool"),
            other => panic!("expected a BadConfig naming eval.pool, got {other:?}"),
        }
    }

    #[test]
    fn sampler_resumes_exactly_and_covers_each_epoch() {
        let mut a = Sampler::new(1, 10, SamplerState::default());
        let first = a.next_indices(7);
        let st = a.state();
        let rest_a = a.next_indices(9);
        let mut b = Sampler::new(1, 10, st);
        assert_eq!(b.next_indices(9), rest_a);
        let mut epoch: Vec<u64> = first
            .into_iter()
            .chain(rest_a[..3].iter().copied())
            .collect();
        epoch.sort();
        assert_eq!(epoch, (0..10).collect::<Vec<_>>());
    }
}
