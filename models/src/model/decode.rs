//! Caption generation: batched greedy and beam search over the multimodal text layers with
//! a key/value cache, the way transformer decoders are served (Vaswani et al. 2017 §3.2;
//! the cache as in Pope et al. 2022, "Efficiently Scaling Transformer Inference").
//!
//! [`Model::encode_images`] runs the image encoder once ([`ImageMemory`]: the decoder's
//! memory and the image embeddings). [`Model::start_decoding`] turns it into a
//! [`DecodeState`]: every multimodal layer's cross-attention keys and values of the memory,
//! computed once (for `prefix` fusion, the image prefix run through the multimodal layers
//! with its bidirectional mask, its keys and values cached), and empty self-attention caches
//! for every text layer, unimodal and multimodal. [`Model::decode_step`] then feeds new
//! tokens: each layer attends over its cache plus the new positions and appends them, so a
//! step costs one position's work instead of the whole prefix's.
//!
//! Every architecture option is handled: the three fusions, `multimodal_block = open_clip`
//! (the memory's own norm, the second MLP), the attentional pooler's memory, a text class
//! token (it comes after the text, so no caption position sees it), and `text_pad_mask`
//! (the cache remembers which keys are padding, shifted by one for `open_clip_legacy`). A
//! model without multimodal layers (CLIP) has no decoder: decoding it is refused. Tensor
//! parallelism works through the [`TensorParallel`] trait like the training forward (heads
//! split, the vocabulary's logits summed into the full vocabulary). [`Model::generate`]
//! needs the whole model (every layer) in this process; a pipeline stage decodes its own
//! text layers with [`Model::start_stage_decoding`] and [`Model::decode_stage_step`]
//! (states in and out; `weaver_worker::decode` passes them between stages and drives the
//! same searches through their [`Stepper`] trait).
//!
//! [`Model::generate`] drives greedy decoding (`beam = 1`) or beam search, with a length
//! penalty, a maximum length and an optional stop token; finished rows (greedy) and finished
//! images (beam) leave the batch, so the rest run on fewer rows. `cache: false` runs the
//! same decoder without a cache — every step reruns the text layers over the whole prefix,
//! the image encoder still once — which is what the cache is measured against.
//! [`Model::greedy_reference`] is the plain greedy decoder over the full fixed-length
//! forward ([`Model::caption_logits`]): the tests hold the cached decoder to it.

use tch::{Device, Kind, Tensor};
use weaver_parallel::tp::TensorParallel;

use super::{map_tp, missing, Acts, Attention, Block, Mask, Model};
use crate::config::{Fusion, PadMask};
use crate::data::Batch;
use crate::error::{ModelError, Result};

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Most tokens generated after BOS (the stop token counts); at most
    /// `model.max_text_len − 1`.
    pub max_new_tokens: usize,
    /// Beams per image; 1 is greedy decoding.
    pub beam: usize,
    /// Beam search ranks finished hypotheses by `log p / len^length_penalty` (`len`: the
    /// generated tokens, the stop token included): 0 ranks by probability alone, larger
    /// values favour longer captions. Greedy decoding ignores it.
    pub length_penalty: f64,
    /// A row ends when it generates this token (usually the tokenizer's EOS); `None`
    /// generates exactly `max_new_tokens` tokens.
    pub stop_token: Option<i64>,
    /// The first token of every caption.
    pub bos: i64,
    /// Use the key/value cache (the default); `false` reruns the text layers over the
    /// whole prefix at every step (the baseline the cache is measured against).
    pub cache: bool,
}

impl GenerateOptions {
    /// Greedy decoding up to `max_new_tokens`, stopping at `eos`, with the cache.
    pub fn greedy(max_new_tokens: usize, bos: i64, eos: i64) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens,
            beam: 1,
            length_penalty: 0.0,
            stop_token: Some(eos),
            bos,
            cache: true,
        }
    }
}

/// Generated captions, one per image, in the order of the images.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// The token ids after BOS, without the stop token.
    pub tokens: Vec<Vec<i64>>,
    /// Sum of the log-probabilities of the generated tokens, the stop token included when
    /// it was generated.
    pub log_prob: Vec<f64>,
    /// What the search ranked by: `log_prob / len^length_penalty` for beam search,
    /// `log_prob` for greedy decoding.
    pub score: Vec<f64>,
    /// Whether the caption ended with the stop token (else it hit `max_new_tokens`).
    pub stopped: Vec<bool>,
}

/// The image encoder's output for a batch of images: what decoding starts from.
#[derive(Debug)]
pub struct ImageMemory {
    /// The memory the decoder attends to, `[B, N, Dm]` in the compute dtype (for `prefix`
    /// fusion: before the fusion projection).
    pub memory: Tensor,
    /// Normalised image embeddings `[B, E]` (f32), the contrastive embedding.
    pub image_emb: Tensor,
}

impl ImageMemory {
    /// Another handle on the same tensors.
    pub fn shallow_clone(&self) -> ImageMemory {
        ImageMemory {
            memory: self.memory.shallow_clone(),
            image_emb: self.image_emb.shallow_clone(),
        }
    }

    /// Rows `index` (`[R]` int64) of the batch, in that order (repeats allowed).
    pub fn select_rows(&self, index: &Tensor) -> Result<ImageMemory> {
        Ok(ImageMemory {
            memory: self.memory.f_index_select(0, index)?,
            image_emb: self.image_emb.f_index_select(0, index)?,
        })
    }
}

/// One text layer's cache.
#[derive(Debug)]
struct LayerCache {
    /// Self-attention keys and values `[B, H, capacity, hd]`; the first `filled` positions
    /// are in use.
    k: Tensor,
    v: Tensor,
    /// Cross-attention keys and values of the memory `[B, H, N, hd]`, computed once.
    cross: Option<(Tensor, Tensor)>,
}

/// The key/value caches of every text layer for a batch of rows being decoded.
#[derive(Debug)]
pub struct DecodeState {
    /// Unimodal layers first, then multimodal, as the model holds them.
    layers: Vec<LayerCache>,
    /// Text positions fed so far.
    len: i64,
    /// Text positions the caches have room for.
    capacity: i64,
    /// Image prefix positions at the front of the multimodal caches (`prefix` fusion).
    prefix: i64,
    /// Which unimodal keys may be attended `[B, capacity]` (with `text_pad_mask`).
    key_valid: Option<Tensor>,
    /// The last token fed to each row `[B]` (`open_clip_legacy` masks key `j` by token
    /// `j − 1`).
    last_token: Option<Tensor>,
    rows: i64,
}

impl DecodeState {
    /// Rows being decoded.
    pub fn rows(&self) -> i64 {
        self.rows
    }

    /// Text positions fed so far.
    pub fn len(&self) -> i64 {
        self.len
    }

    /// Whether no token has been fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps rows `index` (`[R]` int64, on the state's device) in that order; rows may
    /// repeat (beam search) or go (finished captions).
    pub fn select_rows(&mut self, index: &Tensor) -> Result<()> {
        for l in &mut self.layers {
            l.k = l.k.f_index_select(0, index)?;
            l.v = l.v.f_index_select(0, index)?;
            if let Some((k, v)) = &l.cross {
                l.cross = Some((k.f_index_select(0, index)?, v.f_index_select(0, index)?));
            }
        }
        if let Some(m) = &self.key_valid {
            self.key_valid = Some(m.f_index_select(0, index)?);
        }
        if let Some(t) = &self.last_token {
            self.last_token = Some(t.f_index_select(0, index)?);
        }
        self.rows = index.size()[0];
        Ok(())
    }
}

/// `[rows]` int64 on `device`.
fn index_tensor(rows: &[i64], device: Device) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(rows)?.f_to_device(device)?)
}

impl Block {
    /// This block on `x` `[B, n, d]`, the new positions `at..at + n` of its self-attention
    /// cache (written here), with `mask` over the keys `0..at + n`.
    fn step(
        &self,
        tp: &mut dyn TensorParallel,
        x: &Tensor,
        cache: &mut LayerCache,
        at: i64,
        mask: Mask<'_>,
    ) -> Result<Tensor> {
        let n = x.size()[1];
        let h = self.ln1.forward(x)?;
        let q = self.attn.project_q(&h)?;
        let (k, v) = self.attn.project_kv(&h)?;
        cache.k.f_narrow(2, at, n)?.f_copy_(&k)?;
        cache.v.f_narrow(2, at, n)?.f_copy_(&v)?;
        let keys = cache.k.f_narrow(2, 0, at + n)?;
        let values = cache.v.f_narrow(2, 0, at + n)?;
        let mut x = x.f_add(&self.attn.attend(tp, &mut [], &q, &keys, &values, mask)?)?;
        let mlp_first = matches!(&self.cross, Some(c) if c.mlp.is_some());
        if mlp_first {
            x = x.f_add(&self.mlp.forward(tp, &self.ln2.forward(&x)?)?)?;
        }
        if let Some(c) = &self.cross {
            let (mk, mv) = cache
                .cross
                .as_ref()
                .ok_or_else(|| missing("the cross-attention cache"))?;
            let q = c.attn.project_q(&c.ln.forward(&x)?)?;
            let mut y = c.attn.attend(tp, &mut [], &q, mk, mv, Mask::None)?;
            if let Some(g) = &c.gate {
                y = y.f_mul(&g.f_tanh()?)?;
            }
            x = x.f_add(&y)?;
            if let Some((ln, mlp)) = &c.mlp {
                x = x.f_add(&mlp.forward(tp, &ln.forward(&x)?)?)?;
            }
        }
        if !mlp_first {
            x = x.f_add(&self.mlp.forward(tp, &self.ln2.forward(&x)?)?)?;
        }
        Ok(x)
    }
}

/// An empty cache of `attn`'s keys and values for `rows` rows and `capacity` positions.
fn empty_cache(attn: &Attention, rows: i64, capacity: i64, like: &Tensor) -> Result<LayerCache> {
    let shape = [rows, attn.heads, capacity, attn.head_dim];
    let opts = (like.kind(), like.device());
    Ok(LayerCache {
        k: Tensor::f_zeros(shape, opts)?,
        v: Tensor::f_zeros(shape, opts)?,
        cross: None,
    })
}

/// `true` where query `i` (absolute position `first + i`) may see key `j`: `j ≤ first + i`,
/// `[n, first + n]`.
fn causal_rows(first: i64, n: i64, device: Device) -> Result<Tensor> {
    let q = Tensor::f_arange_start(first, first + n, (Kind::Int64, device))?.f_unsqueeze(1)?;
    let k = Tensor::f_arange(first + n, (Kind::Int64, device))?.f_unsqueeze(0)?;
    Ok(k.f_le_tensor(&q)?)
}

impl Model {
    /// Whether this model can decode: it holds every layer and has a decoder.
    fn check_decoder(&self) -> Result<()> {
        if !(self.is_first() && self.is_last()) {
            return Err(ModelError::BadConfig {
                key: "parallel.pp".into(),
                message: format!(
                    "caption decoding needs the whole model in one process (this one holds layers {:?}); decode with pp = 1",
                    self.layers
                ),
            });
        }
        if self.cfg.multimodal_layers == 0 {
            return Err(ModelError::BadConfig {
                key: "model.multimodal_layers".into(),
                message: "this model has no multimodal text layers (a CLIP-style model): it has no captioning decoder to generate with; only embeddings".into(),
            });
        }
        Ok(())
    }

    /// Runs the image encoder on `images` `[B, 3, H, W]`: the decoder's memory and the
    /// image embeddings.
    pub fn encode_images(
        &self,
        tp: &mut dyn TensorParallel,
        images: &Tensor,
    ) -> Result<ImageMemory> {
        self.check_decoder()?;
        let b = images.size()[0];
        let dev = images.device();
        let batch = Batch {
            images: images.shallow_clone(),
            tokens: Tensor::f_zeros([b, 1], (Kind::Int64, dev))?,
            eos: Tensor::f_zeros([b], (Kind::Int64, dev))?,
            indices: vec![0; b as usize],
            mlm: None,
            vqa: None,
        };
        let mut acts = Acts::default();
        self.forward_until(tp, &mut acts, &batch, false, self.cfg.vision_layers)?;
        Ok(ImageMemory {
            memory: Acts::take(&acts.image, "image")?,
            image_emb: Acts::take(&acts.image_emb, "image_emb")?,
        })
    }

    /// Caches for decoding up to `capacity` text positions (BOS included; at most
    /// `max_text_len`) from `memory`: the cross-attention keys and values of every
    /// multimodal layer, or the image prefix run through them (`prefix` fusion).
    pub fn start_decoding(
        &self,
        tp: &mut dyn TensorParallel,
        memory: &ImageMemory,
        capacity: usize,
    ) -> Result<DecodeState> {
        self.check_decoder()?;
        let rows = memory.memory.size()[0];
        let (state, _) =
            self.start_stage_decoding(tp, Some(&memory.memory), None, rows, capacity)?;
        Ok(state)
    }

    /// The text layers this model holds (empty for a stage of the image encoder only).
    fn text_layers(&self) -> std::ops::Range<usize> {
        let lv = self.cfg.vision_layers;
        self.layers.start.max(lv)..self.layers.end.max(lv)
    }

    /// Whether this model (a pipeline stage, or the whole model) holds text layers.
    pub fn holds_text(&self) -> bool {
        !self.text_layers().is_empty()
    }

    /// Whether decoding this stage needs the image memory: it holds a multimodal layer
    /// with cross-attention, or the first multimodal layer of `prefix` fusion (which
    /// projects the memory into the image prefix).
    pub fn needs_memory(&self) -> bool {
        let first_mm = self.cfg.vision_layers + self.cfg.unimodal_layers;
        let text = self.text_layers();
        match self.cfg.fusion {
            Fusion::Prefix => text.contains(&first_mm),
            _ => text.end > first_mm,
        }
    }

    /// [`Model::start_decoding`] for the layers this model holds (a pipeline stage, or the
    /// whole model): caches for this stage's text layers, for `rows` rows. `memory`
    /// `[rows, N, Dm]` is needed when [`Model::needs_memory`]. With `prefix` fusion the
    /// image prefix runs through the multimodal layers stage by stage: `prefix_in` is the
    /// prefix states the previous stage's multimodal layers produced (`None` on the stage
    /// of the first multimodal layer, which projects the memory), and the prefix states
    /// after this stage's multimodal layers are returned, for the next stage (`None` when
    /// no multimodal layer follows, or without prefix fusion).
    pub fn start_stage_decoding(
        &self,
        tp: &mut dyn TensorParallel,
        memory: Option<&Tensor>,
        prefix_in: Option<Tensor>,
        rows: i64,
        capacity: usize,
    ) -> Result<(DecodeState, Option<Tensor>)> {
        let cfg = &self.cfg;
        if cfg.multimodal_layers == 0 {
            return Err(ModelError::BadConfig {
                key: "model.multimodal_layers".into(),
                message: "this model has no multimodal text layers (a CLIP-style model): it has no captioning decoder to generate with; only embeddings".into(),
            });
        }
        if capacity == 0 || capacity > cfg.max_text_len {
            return Err(ModelError::BadConfig {
                key: "max_new_tokens".into(),
                message: format!(
                    "a caption of {capacity} positions (BOS and the new tokens) does not fit model.max_text_len = {}: generate at most {} new tokens",
                    cfg.max_text_len,
                    cfg.max_text_len.saturating_sub(1)
                ),
            });
        }
        let cap = capacity as i64;
        let first_mm = cfg.vision_layers + cfg.unimodal_layers;
        let prefix = if cfg.fusion == Fusion::Prefix {
            cfg.memory_len() as i64
        } else {
            0
        };
        let mem = if self.needs_memory() {
            Some(memory.ok_or_else(|| missing("the image memory"))?)
        } else {
            None
        };
        let text = self.text_layers();
        let mut layers = Vec::with_capacity(text.len());
        for i in text.clone() {
            let block = &self.blocks[i - self.layers.start];
            let room = if i < first_mm { cap } else { prefix + cap };
            let mut cache = empty_cache(&block.attn, rows, room, &block.ln1.weight)?;
            if let Some(c) = &block.cross {
                let mem = mem.ok_or_else(|| missing("the image memory"))?;
                let m = match &c.ln_kv {
                    Some(ln) => ln.forward(mem)?,
                    None => mem.shallow_clone(),
                };
                cache.cross = Some(c.attn.project_kv(&m)?);
            }
            layers.push(cache);
        }
        let mut prefix_out = None;
        if cfg.fusion == Fusion::Prefix && text.end > first_mm {
            // The image prefix sees only itself (the prefix-LM mask), so its states in
            // every multimodal layer do not depend on the text: run it once, keep its keys
            // and values at the front of each multimodal cache.
            let mut x = if text.contains(&first_mm) {
                let proj = self
                    .fusion_in
                    .as_ref()
                    .ok_or_else(|| missing("fusion.image_proj"))?;
                proj.forward_local(mem.ok_or_else(|| missing("the image memory"))?)?
            } else {
                prefix_in.ok_or_else(|| missing("the image prefix states of the stage before"))?
            };
            let at = first_mm.max(text.start);
            for i in at..text.end {
                let block = &self.blocks[i - self.layers.start];
                x = block.step(tp, &x, &mut layers[i - text.start], 0, Mask::None)?;
            }
            if !self.is_last() {
                prefix_out = Some(x);
            }
        }
        let key_valid = match cfg.text_pad_mask {
            PadMask::None => None,
            _ => {
                let dev = self
                    .blocks
                    .first()
                    .map_or(Device::Cpu, |b| b.ln1.weight.device());
                Some(Tensor::f_zeros([rows, cap], (Kind::Bool, dev))?)
            }
        };
        Ok((
            DecodeState {
                layers,
                len: 0,
                capacity: cap,
                prefix,
                key_valid,
                last_token: None,
                rows,
            },
            prefix_out,
        ))
    }

    /// Feeds `tokens` `[B, n]` (the next `n` positions of every row) through the text
    /// layers, appending them to the caches; returns the next-token logits `[B, n, V]`
    /// (f32, the whole vocabulary).
    pub fn decode_step(
        &self,
        tp: &mut dyn TensorParallel,
        state: &mut DecodeState,
        tokens: &Tensor,
    ) -> Result<Tensor> {
        self.decode_stage_step(tp, state, tokens, None)
    }

    /// [`Model::decode_step`] for the text layers this model holds (a pipeline stage):
    /// `tokens` `[B, n]` are the new positions' tokens (every stage knows them: the masks
    /// of padding keys read them), `hidden` the text states `[B, n, Dt]` the previous stage
    /// produced for them (`None` on the stage that embeds the tokens). Returns the states
    /// after this stage's layers, for the next stage, or on the last stage the next-token
    /// logits `[B, n, V]` (f32, the whole vocabulary).
    pub fn decode_stage_step(
        &self,
        tp: &mut dyn TensorParallel,
        state: &mut DecodeState,
        tokens: &Tensor,
        hidden: Option<&Tensor>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let s = tokens.size();
        let (b, n) = (s[0], s[1]);
        if b != state.rows {
            return Err(ModelError::ParamMismatch(format!(
                "decode_step got {b} rows for a state of {} rows",
                state.rows
            )));
        }
        let at = state.len;
        if at + n > state.capacity {
            return Err(ModelError::BadConfig {
                key: "max_new_tokens".into(),
                message: format!(
                    "position {} is past the {} positions this decoding was started for",
                    at + n,
                    state.capacity
                ),
            });
        }
        let dev = tokens.device();
        let (lv, lu) = (cfg.vision_layers, cfg.unimodal_layers);
        let first_mm = lv + lu;
        let text = self.text_layers();
        let mut x = if text.contains(&lv) {
            let e = self
                .text_embed
                .as_ref()
                .ok_or_else(|| missing("text.tok_embed"))?;
            self.embed_tokens(tp, &e.tok, tokens)?
                .f_add(&e.pos.f_narrow(0, at, n)?)?
        } else {
            hidden
                .ok_or_else(|| missing("the text states of the stage before"))?
                .shallow_clone()
        };

        // Unimodal layers: causal, and padding keys masked as `text_pad_mask` says.
        let uni_mask = match &state.key_valid {
            Some(valid) => {
                let pad = self.pad_id;
                let new_valid = match cfg.text_pad_mask {
                    // open_clip: key j is masked when token j − 1 is padding; key 0 never.
                    PadMask::OpenClipLegacy => {
                        let before = match (&state.last_token, at) {
                            (_, 0) => Tensor::f_ones([b, 1], (Kind::Bool, dev))?,
                            (Some(t), _) => t.f_ne(pad)?.f_unsqueeze(1)?,
                            (None, _) => return Err(missing("the previous token")),
                        };
                        let shifted = tokens.f_narrow(1, 0, n - 1)?.f_ne(pad)?;
                        Tensor::f_cat(&[&before, &shifted], 1)?
                    }
                    _ => tokens.f_ne(pad)?,
                };
                valid.f_narrow(1, at, n)?.f_copy_(&new_valid)?;
                let keys = valid.f_narrow(1, 0, at + n)?.f_unsqueeze(1)?;
                let m = causal_rows(at, n, dev)?
                    .f_unsqueeze(0)?
                    .f_logical_and(&keys)?
                    .f_unsqueeze(1)?;
                Some(m)
            }
            None if n > 1 => Some(causal_rows(at, n, dev)?),
            // One new position sees every key so far.
            None => None,
        };
        // Multimodal layers: every image prefix key, then causal text.
        let p = state.prefix;
        let mm_mask = if n > 1 {
            let text = causal_rows(at, n, dev)?;
            let image = Tensor::f_ones([n, p], (Kind::Bool, dev))?;
            Some(Tensor::f_cat(&[&image, &text], 1)?)
        } else {
            None
        };
        for i in text.clone() {
            let block = &self.blocks[i - self.layers.start];
            let cache = &mut state.layers[i - text.start];
            x = if i < first_mm {
                let mask = uni_mask.as_ref().map_or(Mask::None, Mask::Explicit);
                block.step(tp, &x, cache, at, mask)?
            } else {
                let mask = mm_mask.as_ref().map_or(Mask::None, Mask::Explicit);
                block.step(tp, &x, cache, p + at, mask)?
            };
        }
        state.len += n;
        state.last_token = Some(tokens.f_select(1, n - 1)?);
        if self.is_last() {
            self.full_vocab_logits(tp, &x)
        } else {
            Ok(x)
        }
    }

    /// The captioning head on decoder states `x` `[B, n, Dt]`: f32 logits over the whole
    /// vocabulary (with tensor parallelism, each rank's part placed in a zero tensor and
    /// the parts summed over the group).
    fn full_vocab_logits(&self, tp: &mut dyn TensorParallel, x: &Tensor) -> Result<Tensor> {
        let heads = self.heads.as_ref().ok_or_else(|| missing("head"))?;
        let (ln, lm) = heads.decoder.as_ref().ok_or_else(|| missing("head.lm"))?;
        let local = lm.forward_local(&ln.forward(x)?)?.f_to_kind(Kind::Float)?;
        let pos = tp.pos();
        if pos.size == 1 {
            return Ok(local);
        }
        let s = local.size();
        let part = s[2];
        let full = Tensor::f_zeros(
            [s[0], s[1], part * pos.size as i64],
            (Kind::Float, local.device()),
        )?;
        full.f_narrow(2, pos.rank as i64 * part, part)?
            .f_copy_(&local)?;
        tp.reduce_sum(&full).map_err(map_tp)
    }

    /// Captions for `images` `[B, 3, H, W]`: greedy decoding (`beam = 1`) or beam search,
    /// batched over the images, under `no_grad`.
    pub fn generate(
        &self,
        tp: &mut dyn TensorParallel,
        images: &Tensor,
        opts: &GenerateOptions,
    ) -> Result<Generated> {
        let memory = tch::no_grad(|| self.encode_images(tp, images))?;
        self.generate_from(tp, &memory, opts)
    }

    /// As [`Model::generate`], from images already encoded (the embeddings and the
    /// captions of a batch from one run of the image encoder).
    pub fn generate_from(
        &self,
        tp: &mut dyn TensorParallel,
        memory: &ImageMemory,
        opts: &GenerateOptions,
    ) -> Result<Generated> {
        self.check_decoder()?;
        if opts.beam == 0 {
            return Err(ModelError::BadConfig {
                key: "beam".into(),
                message: "beam search needs at least 1 beam (1 is greedy decoding)".into(),
            });
        }
        if opts.max_new_tokens + 1 > self.cfg.max_text_len {
            return Err(ModelError::BadConfig {
                key: "max_new_tokens".into(),
                message: format!(
                    "{} new tokens after BOS do not fit model.max_text_len = {}: use at most {}",
                    opts.max_new_tokens,
                    self.cfg.max_text_len,
                    self.cfg.max_text_len - 1
                ),
            });
        }
        tch::no_grad(|| {
            let mut stepper = ModelStepper {
                model: self,
                tp,
                memory: memory.shallow_clone(),
                state: None,
                history: None,
                capacity: opts.max_new_tokens + 1,
                cache: opts.cache,
            };
            let images = memory.memory.size()[0] as usize;
            if opts.beam == 1 {
                greedy_search(&mut stepper, images, opts)
            } else {
                beam_search(&mut stepper, images, opts)
            }
        })
    }

    /// Greedy captions the plain way, for reference: every step reruns the whole model
    /// (image encoder included) on the fixed-length token sequence, positions after the
    /// current one holding padding (which the causal masks hide), as evaluation did before
    /// the cache. Slow; the tests hold [`Model::generate`] to it.
    pub fn greedy_reference(
        &self,
        images: &Tensor,
        max_new_tokens: usize,
        bos: i64,
        stop_token: Option<i64>,
    ) -> Result<Generated> {
        self.check_decoder()?;
        let b = images.size()[0];
        let t = self.cfg.max_text_len as i64;
        let steps = (max_new_tokens as i64).min(t - 1);
        let dev = images.device();
        tch::no_grad(|| {
            let tokens = Tensor::f_full([b, t], self.pad_id, (Kind::Int64, dev))?;
            let _ = tokens.f_narrow(1, 0, 1)?.f_fill_(bos)?;
            let eos_pos = Tensor::f_zeros([b], (Kind::Int64, dev))?;
            let mut out = Generated {
                tokens: vec![Vec::new(); b as usize],
                log_prob: vec![0.0; b as usize],
                score: vec![0.0; b as usize],
                stopped: vec![false; b as usize],
            };
            for pos in 0..steps {
                let logits = self.caption_logits(images, &tokens, &eos_pos)?;
                let lp = logits.f_select(1, pos)?.f_log_softmax(-1, Kind::Float)?;
                let next = lp.f_argmax(-1, false)?;
                let chosen = lp.f_gather(1, &next.f_unsqueeze(1)?, false)?;
                let next_v = Vec::<i64>::try_from(&next.f_to_device(Device::Cpu)?)?;
                let lp_v = Vec::<f32>::try_from(&chosen.f_view([-1])?.f_to_device(Device::Cpu)?)?;
                // Finished rows hold padding after their stop token, as they did before.
                let mut fill = next_v.clone();
                for r in 0..b as usize {
                    if out.stopped[r] {
                        fill[r] = self.pad_id;
                        continue;
                    }
                    out.log_prob[r] += f64::from(lp_v[r]);
                    if Some(next_v[r]) == stop_token {
                        out.stopped[r] = true;
                    } else {
                        out.tokens[r].push(next_v[r]);
                    }
                }
                tokens
                    .f_narrow(1, pos + 1, 1)?
                    .f_copy_(&index_tensor(&fill, dev)?.f_unsqueeze(1)?)?;
                if out.stopped.iter().all(|&s| s) {
                    break;
                }
            }
            out.score = out.log_prob.clone();
            Ok(out)
        })
    }
}

/// One decoding step for the searches: the log-probabilities of the next token of every
/// row, given each row's last token; rows can be selected (finished ones leave, beams are
/// reordered). The model implements it (with or without the cache); the tests also drive
/// the searches with a fixed table whose best sequences are known.
pub trait Stepper {
    /// Feeds `last` `[R]` (one token per row) and returns `[R, V]` f32 log-probabilities of
    /// the token after it.
    fn step(&mut self, last: &Tensor) -> Result<Tensor>;
    /// Keeps rows `index` (`[R']` int64), in that order.
    fn select_rows(&mut self, index: &Tensor) -> Result<()>;
    /// The device the rows live on.
    fn device(&self) -> Device;
    /// Makes rows for `per_image` copies of every image, image-major: row `i·per_image + j`
    /// is a copy of image `i` (before the first step).
    fn repeat_images(&mut self, per_image: usize) -> Result<()>;
}

/// The model as a [`Stepper`].
struct ModelStepper<'a, 'b> {
    model: &'a Model,
    tp: &'b mut dyn TensorParallel,
    memory: ImageMemory,
    state: Option<DecodeState>,
    /// Without the cache: every token fed so far `[R, t]`.
    history: Option<Tensor>,
    capacity: usize,
    cache: bool,
}

impl Stepper for ModelStepper<'_, '_> {
    fn step(&mut self, last: &Tensor) -> Result<Tensor> {
        let last = last.f_unsqueeze(1)?;
        let logits = if self.cache {
            if self.state.is_none() {
                self.state = Some(self.model.start_decoding(
                    self.tp,
                    &self.memory,
                    self.capacity,
                )?);
            }
            let state = self
                .state
                .as_mut()
                .ok_or_else(|| missing("decoding state"))?;
            self.model.decode_step(self.tp, state, &last)?
        } else {
            // No cache: fresh caches (the memory's keys and values, the image prefix
            // included) and the whole prefix again at every step.
            let history = match &self.history {
                Some(h) => Tensor::f_cat(&[h, &last], 1)?,
                None => last,
            };
            let mut state = self
                .model
                .start_decoding(self.tp, &self.memory, self.capacity)?;
            let logits = self.model.decode_step(self.tp, &mut state, &history)?;
            self.history = Some(history);
            logits
        };
        let t = logits.size()[1];
        Ok(logits.f_select(1, t - 1)?.f_log_softmax(-1, Kind::Float)?)
    }

    fn select_rows(&mut self, index: &Tensor) -> Result<()> {
        self.memory = self.memory.select_rows(index)?;
        if let Some(s) = &mut self.state {
            s.select_rows(index)?;
        }
        if let Some(h) = &self.history {
            self.history = Some(h.f_index_select(0, index)?);
        }
        Ok(())
    }

    fn device(&self) -> Device {
        self.memory.memory.device()
    }

    fn repeat_images(&mut self, per_image: usize) -> Result<()> {
        let b = self.memory.memory.size()[0];
        let index: Vec<i64> = (0..b)
            .flat_map(|i| std::iter::repeat_n(i, per_image))
            .collect();
        self.select_rows(&index_tensor(&index, self.device())?)
    }
}

/// Greedy decoding of `images` rows: the most likely token at every step; a row that
/// generates the stop token leaves the batch.
pub fn greedy_search(
    stepper: &mut dyn Stepper,
    images: usize,
    opts: &GenerateOptions,
) -> Result<Generated> {
    let dev = stepper.device();
    let mut out = Generated {
        tokens: vec![Vec::new(); images],
        log_prob: vec![0.0; images],
        score: vec![0.0; images],
        stopped: vec![false; images],
    };
    // alive[r]: the image of row r.
    let mut alive: Vec<usize> = (0..images).collect();
    let mut last = Tensor::f_full([images as i64], opts.bos, (Kind::Int64, dev))?;
    for _ in 0..opts.max_new_tokens {
        if alive.is_empty() {
            break;
        }
        let lp = stepper.step(&last)?;
        let next = lp.f_argmax(-1, false)?;
        let chosen = lp.f_gather(1, &next.f_unsqueeze(1)?, false)?.f_view([-1])?;
        let next_v = Vec::<i64>::try_from(&next.f_to_device(Device::Cpu)?)?;
        let lp_v = Vec::<f32>::try_from(&chosen.f_to_device(Device::Cpu)?)?;
        let mut keep = Vec::with_capacity(alive.len());
        for (r, &img) in alive.iter().enumerate() {
            out.log_prob[img] += f64::from(lp_v[r]);
            if Some(next_v[r]) == opts.stop_token {
                out.stopped[img] = true;
            } else {
                out.tokens[img].push(next_v[r]);
                keep.push(r as i64);
            }
        }
        if keep.len() < alive.len() {
            alive = keep.iter().map(|&r| alive[r as usize]).collect();
            if alive.is_empty() {
                break;
            }
            let index = index_tensor(&keep, dev)?;
            stepper.select_rows(&index)?;
            last = next.f_index_select(0, &index)?;
        } else {
            last = next;
        }
    }
    out.score = out.log_prob.clone();
    Ok(out)
}

/// A finished hypothesis of beam search.
#[derive(Debug, Clone)]
struct Hypothesis {
    tokens: Vec<i64>,
    log_prob: f64,
    score: f64,
    stopped: bool,
}

/// `log_prob / len^penalty` (`len` at least 1).
fn normalised(log_prob: f64, len: usize, penalty: f64) -> f64 {
    log_prob / (len.max(1) as f64).powf(penalty)
}

/// Beam search with `opts.beam` beams per image, batched over the images.
///
/// Every step extends each image's live beams by every token and keeps the `beam` best
/// continuations that do not stop; a continuation that stops (the stop token, among the
/// `beam` best candidates) becomes a finished hypothesis, ranked by its length-normalised
/// score. An image is done when it has `beam` finished hypotheses and no live beam can beat
/// the worst of them any more — exactly: a live beam's log-probability only falls, so its
/// best reachable normalised score is its current one divided by the most favourable length
/// still possible — or at `max_new_tokens`, when the live beams count as hypotheses too.
/// Done images leave the batch.
pub fn beam_search(
    stepper: &mut dyn Stepper,
    images: usize,
    opts: &GenerateOptions,
) -> Result<Generated> {
    let k = opts.beam;
    let dev = stepper.device();
    stepper.repeat_images(k)?;
    // Live beams, image-major: image of each live group, and per row its tokens and score.
    let mut active: Vec<usize> = (0..images).collect();
    let mut seqs: Vec<Vec<i64>> = vec![Vec::new(); images * k];
    // Only the first beam of each image is live at the start (the others would repeat it).
    let mut scores: Vec<f64> = (0..images * k)
        .map(|r| if r % k == 0 { 0.0 } else { f64::NEG_INFINITY })
        .collect();
    let mut finished: Vec<Vec<Hypothesis>> = vec![Vec::new(); images];
    let mut last = Tensor::f_full([(images * k) as i64], opts.bos, (Kind::Int64, dev))?;
    let lp_pen = opts.length_penalty;
    for step in 0..opts.max_new_tokens {
        if active.is_empty() {
            break;
        }
        let lp = stepper.step(&last)?;
        let v = lp.size()[1];
        let base = Tensor::f_from_slice(&scores)?
            .f_to_kind(Kind::Double)?
            .f_to_device(dev)?
            .f_unsqueeze(1)?;
        let cand = lp
            .f_to_kind(Kind::Double)?
            .f_add(&base)?
            .f_view([active.len() as i64, k as i64 * v])?;
        let width = (2 * k).min((k as i64 * v) as usize) as i64;
        let (top_v, top_i) = cand.f_topk(width, 1, true, true)?;
        let top_v = Vec::<f64>::try_from(&top_v.f_reshape([-1])?.f_to_device(Device::Cpu)?)?;
        let top_i = Vec::<i64>::try_from(&top_i.f_reshape([-1])?.f_to_device(Device::Cpu)?)?;
        let new_len = step + 1;
        let mut next_active = Vec::new();
        let mut rows: Vec<i64> = Vec::new();
        let mut tokens: Vec<i64> = Vec::new();
        let mut next_seqs = Vec::new();
        let mut next_scores = Vec::new();
        for (g, &img) in active.iter().enumerate() {
            let mut kept = Vec::with_capacity(k);
            for j in 0..width as usize {
                let (val, idx) = (top_v[g * width as usize + j], top_i[g * width as usize + j]);
                if val == f64::NEG_INFINITY {
                    break;
                }
                let (beam, tok) = ((idx / v) as usize, idx % v);
                let src = g * k + beam;
                if Some(tok) == opts.stop_token {
                    // A stopping candidate outside the best `k` is not a hypothesis (it
                    // would not have been kept as a beam either).
                    if j < k {
                        finished[img].push(Hypothesis {
                            tokens: seqs[src].clone(),
                            log_prob: val,
                            score: normalised(val, new_len, lp_pen),
                            stopped: true,
                        });
                    }
                } else {
                    kept.push((src, tok, val));
                    if kept.len() == k {
                        break;
                    }
                }
            }
            let hyps = &mut finished[img];
            hyps.sort_by(|a, b| b.score.total_cmp(&a.score));
            hyps.truncate(k);
            // The best normalised score a live beam can still reach.
            let remaining_max = opts.max_new_tokens;
            let reach = kept
                .iter()
                .map(|&(_, _, val)| {
                    if lp_pen > 0.0 {
                        normalised(val, remaining_max, lp_pen)
                    } else {
                        normalised(val, new_len, lp_pen)
                    }
                })
                .fold(f64::NEG_INFINITY, f64::max);
            let done = kept.is_empty()
                || (hyps.len() == k && hyps.last().is_some_and(|w| w.score >= reach));
            if done || new_len == opts.max_new_tokens {
                if !done {
                    // Out of room: the live beams end here.
                    for &(src, tok, val) in &kept {
                        let mut t = seqs[src].clone();
                        t.push(tok);
                        hyps.push(Hypothesis {
                            tokens: t,
                            log_prob: val,
                            score: normalised(val, new_len, lp_pen),
                            stopped: false,
                        });
                    }
                    hyps.sort_by(|a, b| b.score.total_cmp(&a.score));
                    hyps.truncate(k);
                }
                continue;
            }
            next_active.push(img);
            // Fill up to k rows (an image with fewer live continuations repeats its last
            // one at −∞, which can never win).
            for slot in 0..k {
                let (src, tok, val) = match kept.get(slot) {
                    Some(&c) => c,
                    None => {
                        let (src, tok, _) = kept[kept.len() - 1];
                        (src, tok, f64::NEG_INFINITY)
                    }
                };
                let mut t = seqs[src].clone();
                t.push(tok);
                rows.push(src as i64);
                tokens.push(tok);
                next_seqs.push(t);
                next_scores.push(val);
            }
        }
        active = next_active;
        if active.is_empty() {
            break;
        }
        let index = index_tensor(&rows, dev)?;
        stepper.select_rows(&index)?;
        seqs = next_seqs;
        scores = next_scores;
        last = index_tensor(&tokens, dev)?;
    }
    let mut out = Generated {
        tokens: Vec::with_capacity(images),
        log_prob: Vec::with_capacity(images),
        score: Vec::with_capacity(images),
        stopped: Vec::with_capacity(images),
    };
    for hyps in finished {
        let best = hyps.into_iter().next().unwrap_or(Hypothesis {
            tokens: Vec::new(),
            log_prob: f64::NEG_INFINITY,
            score: f64::NEG_INFINITY,
            stopped: false,
        });
        out.tokens.push(best.tokens);
        out.log_prob.push(best.log_prob);
        out.score.push(best.score);
        out.stopped.push(best.stopped);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::model::tests::every_config;
    use crate::nn::{ParamStore, TpPos};
    use weaver_parallel::tp::NoTp;

    /// A model of `cfg` whose parameters are moved off their initial values (gates open,
    /// norms not identities), so that every path carries signal.
    fn model(cfg: &ModelConfig, pad_id: i64) -> (ParamStore, Model) {
        let mut store = ParamStore::new(Device::Cpu, Kind::Float, 5);
        let m = Model::new(
            &mut store,
            cfg,
            0..Model::num_layers(cfg),
            TpPos::SINGLE,
            pad_id,
        )
        .unwrap();
        tch::manual_seed(11);
        tch::no_grad(|| {
            for p in store.params() {
                let noise = p.tensor.randn_like().f_mul_scalar(0.3).unwrap();
                let _ = p.tensor.shallow_clone().f_add_(&noise).unwrap();
            }
        });
        (store, m)
    }

    fn images(cfg: &ModelConfig, n: i64) -> Tensor {
        tch::manual_seed(3);
        let s = cfg.image_size as i64;
        Tensor::randn([n, 3, s, s], (Kind::Float, Device::Cpu))
    }

    const BOS: i64 = 1;

    /// The cached decoder and the decoder without a cache give exactly the greedy captions
    /// of the plain full-sequence decoder, for every architecture; a stop token that some
    /// rows reach early makes them leave the batch; a padding id the model generates
    /// exercises the padding masks.
    #[test]
    fn cached_greedy_equals_the_plain_greedy_decoder_for_every_architecture() {
        for cfg in every_config() {
            let (_s, m) = model(&cfg, 0);
            let img = images(&cfg, 4);
            let max_new = cfg.max_text_len - 1;
            if cfg.multimodal_layers == 0 {
                let e = m
                    .generate(&mut NoTp, &img, &GenerateOptions::greedy(3, BOS, 2))
                    .unwrap_err();
                assert!(
                    matches!(&e, ModelError::BadConfig { key, .. } if key == "model.multimodal_layers"),
                    "{e}"
                );
                continue;
            }
            // Free-running captions, to pick a padding id and a stop token that occur.
            let free = m.greedy_reference(&img, max_new, BOS, None).unwrap();
            let pad = free.tokens[1][2];
            let (_s, m) = model(&cfg, pad);
            let free = m.greedy_reference(&img, max_new, BOS, None).unwrap();
            let stop = *free.tokens[0]
                .iter()
                .skip(3)
                .find(|&&t| t != pad)
                .unwrap_or(&(pad + 1));
            let want = m.greedy_reference(&img, max_new, BOS, Some(stop)).unwrap();
            assert!(want.stopped[0], "{cfg:?}");
            for cache in [true, false] {
                let opts = GenerateOptions {
                    cache,
                    ..GenerateOptions::greedy(max_new, BOS, stop)
                };
                let got = m.generate(&mut NoTp, &img, &opts).unwrap();
                assert_eq!(got.tokens, want.tokens, "cache {cache}: {cfg:?}");
                assert_eq!(got.stopped, want.stopped);
                for (a, b) in got.log_prob.iter().zip(&want.log_prob) {
                    // f32 logits of the same positions by differently shaped kernels.
                    assert!((a - b).abs() < 1e-3, "{a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn one_beam_is_greedy_and_beams_agree_with_and_without_the_cache() {
        let cfg = every_config().remove(0);
        let (_s, m) = model(&cfg, 0);
        let img = images(&cfg, 3);
        let greedy = GenerateOptions::greedy(8, BOS, 2);
        let g = m.generate(&mut NoTp, &img, &greedy).unwrap();
        let b1 = m
            .generate(
                &mut NoTp,
                &img,
                &GenerateOptions {
                    beam: 1,
                    ..greedy.clone()
                },
            )
            .unwrap();
        assert_eq!(g, b1);
        // Beam search's tokens use the same code path as greedy through `beam_search`.
        let opts = GenerateOptions {
            beam: 4,
            length_penalty: 0.7,
            stop_token: Some(g.tokens[0].first().copied().unwrap_or(2)),
            ..greedy
        };
        let cached = m.generate(&mut NoTp, &img, &opts).unwrap();
        let plain = m
            .generate(
                &mut NoTp,
                &img,
                &GenerateOptions {
                    cache: false,
                    ..opts.clone()
                },
            )
            .unwrap();
        assert_eq!(cached.tokens, plain.tokens);
        // The reported log-probabilities are the model's: teacher-forced through the plain
        // full-sequence forward.
        for (i, toks) in cached.tokens.iter().enumerate() {
            let mut seq = vec![BOS];
            seq.extend(toks);
            if cached.stopped[i] {
                seq.push(opts.stop_token.unwrap());
            }
            let t = cfg.max_text_len;
            let mut padded = seq.clone();
            padded.resize(t, 0);
            let tokens = Tensor::from_slice(&padded).reshape([1, t as i64]);
            let logits = m
                .caption_logits(
                    &img.narrow(0, i as i64, 1),
                    &tokens,
                    &Tensor::from_slice(&[0i64]),
                )
                .unwrap()
                .log_softmax(-1, Kind::Double);
            let lp: f64 = (1..seq.len())
                .map(|p| logits.double_value(&[0, p as i64 - 1, seq[p]]))
                .sum();
            assert!(
                (lp - cached.log_prob[i]).abs() < 1e-3,
                "{lp} vs {}",
                cached.log_prob[i]
            );
            let len = seq.len() - 1;
            let want = lp / (len as f64).powf(0.7);
            assert!((cached.score[i] - want).abs() < 1e-3);
        }
    }

    #[test]
    fn too_long_a_caption_is_refused() {
        let cfg = every_config().remove(0);
        let (_s, m) = model(&cfg, 0);
        let e = m
            .generate(
                &mut NoTp,
                &images(&cfg, 1),
                &GenerateOptions::greedy(cfg.max_text_len, BOS, 2),
            )
            .unwrap_err();
        assert!(
            matches!(&e, ModelError::BadConfig { key, .. } if key == "max_new_tokens"),
            "{e}"
        );
    }

    /// Log-probabilities from a fixed table: the next token depends on the image and the
    /// previous token.
    struct Table {
        /// `[images, V, V]` log-probabilities: row `prev` of image `i`.
        lp: Tensor,
        /// Image and previous token of each row.
        rows: Vec<(i64, i64)>,
    }

    impl Stepper for Table {
        fn step(&mut self, last: &Tensor) -> Result<Tensor> {
            let last = Vec::<i64>::try_from(last).unwrap();
            let picked: Vec<Tensor> = self
                .rows
                .iter_mut()
                .zip(last)
                .map(|((img, prev), t)| {
                    *prev = t;
                    self.lp.get(*img).get(t)
                })
                .collect();
            Ok(Tensor::stack(&picked, 0))
        }
        fn select_rows(&mut self, index: &Tensor) -> Result<()> {
            let index = Vec::<i64>::try_from(index).unwrap();
            self.rows = index.iter().map(|&i| self.rows[i as usize]).collect();
            Ok(())
        }
        fn device(&self) -> Device {
            Device::Cpu
        }
        fn repeat_images(&mut self, per_image: usize) -> Result<()> {
            self.rows = self
                .rows
                .iter()
                .flat_map(|&r| std::iter::repeat_n(r, per_image))
                .collect();
            Ok(())
        }
    }

    fn table(lp: &Tensor) -> Table {
        let n = lp.size()[0];
        Table {
            lp: lp.shallow_clone(),
            rows: (0..n).map(|i| (i, BOS)).collect(),
        }
    }

    /// The best caption of every image by enumerating all of them: (tokens, score).
    fn brute_force(lp: &Tensor, img: i64, opts: &GenerateOptions) -> (Vec<i64>, f64) {
        let v = lp.size()[1];
        let mut best = (Vec::new(), f64::NEG_INFINITY);
        let mut stack = vec![(Vec::<i64>::new(), BOS, 0.0f64)];
        while let Some((seq, prev, logp)) = stack.pop() {
            for t in 0..v {
                let l = logp + lp.double_value(&[img, prev, t]);
                let len = seq.len() + 1;
                let mut s = seq.clone();
                if Some(t) == opts.stop_token || len == opts.max_new_tokens {
                    if Some(t) != opts.stop_token {
                        s.push(t);
                    }
                    let score = l / (len as f64).powf(opts.length_penalty);
                    if score > best.1 {
                        best = (s, score);
                    }
                } else {
                    s.push(t);
                    stack.push((s, t, l));
                }
            }
        }
        best
    }

    #[test]
    fn beam_search_finds_the_known_best_caption() {
        // Vocabulary {0: "a", 1: BOS, 2: EOS, 3: "b"}. Greedy takes "a" (0.6) and is then
        // stuck with an even split (best total 0.6 · 0.5 = 0.30), while "b" (0.4) leads to
        // EOS with 0.9 (total 0.36): the best caption is "b".
        let mut p = [[0.25f64; 4]; 4];
        p[BOS as usize] = [0.6, 0.0, 0.0, 0.4];
        p[0] = [0.0, 0.0, 0.5, 0.5];
        p[3] = [0.05, 0.0, 0.9, 0.05];
        let flat: Vec<f64> = p.iter().flatten().map(|x| x.max(1e-12).ln()).collect();
        let lp = Tensor::from_slice(&flat)
            .reshape([1, 4, 4])
            .to_kind(Kind::Float);
        let opts = GenerateOptions {
            max_new_tokens: 3,
            beam: 2,
            length_penalty: 0.0,
            stop_token: Some(2),
            bos: BOS,
            cache: true,
        };
        let g = greedy_search(
            &mut table(&lp),
            1,
            &GenerateOptions {
                beam: 1,
                ..opts.clone()
            },
        )
        .unwrap();
        assert_eq!(
            g.tokens[0][0], 0,
            "greedy starts with the likelier first token"
        );
        let b = beam_search(&mut table(&lp), 1, &opts).unwrap();
        assert_eq!(b.tokens[0], vec![3]);
        assert!(b.stopped[0]);
        assert!((b.log_prob[0] - (0.4f64 * 0.9).ln()).abs() < 1e-6);

        // Random tables, several images at once: with as many beams as there are prefixes
        // the search is exhaustive and must find the enumerated optimum, with and without a
        // length penalty.
        tch::manual_seed(7);
        let v = 5;
        let lp = (Tensor::randn([3, v, v], (Kind::Float, Device::Cpu)) * 2.0)
            .log_softmax(-1, Kind::Float);
        for penalty in [0.0, 1.0, -0.5] {
            let opts = GenerateOptions {
                max_new_tokens: 4,
                beam: 125,
                length_penalty: penalty,
                stop_token: Some(2),
                bos: BOS,
                cache: true,
            };
            let got = beam_search(&mut table(&lp), 3, &opts).unwrap();
            for img in 0..3 {
                let (tokens, score) = brute_force(&lp, img, &opts);
                assert_eq!(
                    got.tokens[img as usize], tokens,
                    "penalty {penalty}, image {img}"
                );
                assert!((got.score[img as usize] - score).abs() < 1e-4);
            }
        }
    }
}
