//! Job configuration: the TOML file a user writes (every section and key documented here),
//! `--set section.key=value` overrides, and the validated internal configs derived from it.
//!
//! Two layers, as in candle and burn: [`FileConfig`] mirrors the file (serde, unknown keys
//! rejected, defaults filled in), and [`JobConfig::from_file_config`] checks it once and
//! resolves the model flavor into a [`ModelConfig`] that everything downstream trusts.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::device::DeviceName;
use crate::error::ConfigError;

/// How the text decoder sees the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fusion {
    /// CoCa: every multimodal layer cross-attends to the image tokens.
    CrossAttention,
    /// Flamingo: as `cross_attention`, but the cross-attention output is scaled by
    /// `tanh(alpha)` with a learnable per-layer `alpha` initialised at zero.
    GatedCrossAttention,
    /// Projected image tokens are prepended to the text sequence of the multimodal layers
    /// (prefix-LM mask: text sees every image token and earlier text).
    Prefix,
}

impl Fusion {
    /// Every fusion kind, for tests that sweep them.
    pub const ALL: [Fusion; 3] = [
        Fusion::CrossAttention,
        Fusion::GatedCrossAttention,
        Fusion::Prefix,
    ];

    /// The name used in config files.
    pub fn name(self) -> &'static str {
        match self {
            Fusion::CrossAttention => "cross_attention",
            Fusion::GatedCrossAttention => "gated_cross_attention",
            Fusion::Prefix => "prefix",
        }
    }
}

/// The MLPs' activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Exact GELU (erf).
    Gelu,
    /// `x · sigmoid(1.702 x)`, OpenAI CLIP's approximation (open_clip's `-quickgelu` models).
    QuickGelu,
}

/// How the image encoder's tokens become the contrastive embedding and the decoder's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VisionPool {
    /// Mean over the (normed) patch tokens; the patch tokens are the memory.
    Mean,
    /// The class token's state (needs `vision_class_token`); the patch tokens are the memory
    /// (open_clip's `pool_type = "tok"`).
    ClassToken,
    /// open_clip's CoCa: an attentional pooler (`attn_pool_queries` learned queries
    /// cross-attending to every token, `embed_dim` wide) then the final norm; query 0 is the
    /// pooled embedding, the other queries are the memory.
    Attentional,
}

/// Which state of the unimodal text layers is the text embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextPool {
    /// The EOS token's position (the tokenizer's end token; CLIP's `eot`).
    Eos,
    /// The position of the largest token id (open_clip's `argmax`: the same as `eos` with
    /// CLIP's tokenizer, whose end token has the largest id).
    Argmax,
    /// A learned class token appended after the text (open_clip's CoCa `embed_cls`); the
    /// multimodal layers see the text without it.
    ClassToken,
}

/// Which keys the unimodal text layers mask besides the causal mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PadMask {
    /// None: padding comes after EOS, which the causal mask already hides from it.
    None,
    /// Padding keys are masked (the class token never is).
    Keys,
    /// open_clip CoCa's mask, kept by its pretrained weights: key `j` is masked when token
    /// `j − 1` is padding (needs `text_pool = "class_token"`).
    OpenClipLegacy,
}

/// The layout of a multimodal (cross-attention) layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MultimodalBlock {
    /// Self-attention, cross-attention to the memory as it is, one MLP.
    Compact,
    /// open_clip's CoCa decoder layer: a self-attention block with its MLP, then a
    /// cross-attention block (its own norm on the memory) with a second MLP.
    OpenClip,
}

/// `[model]`: a named flavor, the fusion kind, and optional overrides of any dimension.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// `debug`, `small` or `1b` (see [`ModelConfig::flavor`]).
    pub flavor: Option<String>,
    /// `cross_attention` (default), `gated_cross_attention` or `prefix`.
    pub fusion: Option<Fusion>,
    /// Image side in pixels (square images).
    pub image_size: Option<usize>,
    /// Patch side in pixels; must divide `image_size`.
    pub patch_size: Option<usize>,
    /// Width of the image encoder.
    pub vision_width: Option<usize>,
    /// Transformer blocks in the image encoder.
    pub vision_layers: Option<usize>,
    /// Attention heads in the image encoder; must divide `vision_width` unless
    /// `vision_head_dim` is set.
    pub vision_heads: Option<usize>,
    /// Width of one image-encoder attention head (Megatron's `kv_channels`): q, k and v
    /// project to `vision_heads · vision_head_dim` and the output projection back to
    /// `vision_width`. Default `vision_width / vision_heads` (attention as wide as the
    /// residual stream); `weaver ckpt prune --method heads` writes it.
    pub vision_head_dim: Option<usize>,
    /// Width of the text layers.
    pub text_width: Option<usize>,
    /// Attention heads in the text layers; must divide `text_width` unless
    /// `text_head_dim` is set.
    pub text_heads: Option<usize>,
    /// Width of one attention head of the text layers (self- and cross-attention), as
    /// `vision_head_dim` is for the image encoder. Default `text_width / text_heads`.
    pub text_head_dim: Option<usize>,
    /// Causal text-only layers (their pooled output feeds the contrastive loss).
    pub unimodal_layers: Option<usize>,
    /// Text layers that see the image (their output feeds captioning and matching).
    pub multimodal_layers: Option<usize>,
    /// MLP hidden width as a multiple of the layer width.
    pub mlp_ratio: Option<usize>,
    /// Vocabulary size (the tokenizer's size rounded up; must cover the tokenizer).
    pub vocab_size: Option<usize>,
    /// Maximum caption length in tokens, including BOS and EOS.
    pub max_text_len: Option<usize>,
    /// Width of the shared image-text embedding space of the contrastive loss.
    pub embed_dim: Option<usize>,
    /// MLP activation: `gelu` (default) or `quick_gelu`.
    pub activation: Option<Activation>,
    /// Whether the patch embedding has a bias (default true; open_clip's has none).
    pub patch_bias: Option<bool>,
    /// Prepend a learned class token to the image patches (default false).
    pub vision_class_token: Option<bool>,
    /// A layer norm on the image tokens before the first block (open_clip's `ln_pre`;
    /// default false).
    pub vision_ln_pre: Option<bool>,
    /// `mean` (default), `class_token` or `attentional` (see [`VisionPool`]).
    pub vision_pool: Option<VisionPool>,
    /// Learned queries of the attentional pooler (default 256).
    pub attn_pool_queries: Option<usize>,
    /// Heads of the attentional pooler; must divide `embed_dim` (default 8) unless
    /// `attn_pool_head_dim` is set.
    pub attn_pool_heads: Option<usize>,
    /// Width of one head of the attentional pooler. Default `embed_dim / attn_pool_heads`.
    pub attn_pool_head_dim: Option<usize>,
    /// `eos` (default), `argmax` or `class_token` (see [`TextPool`]).
    pub text_pool: Option<TextPool>,
    /// `none` (default), `keys` or `open_clip_legacy` (see [`PadMask`]).
    pub text_pad_mask: Option<PadMask>,
    /// A bias on the text projection into the embedding space (default false).
    pub text_proj_bias: Option<bool>,
    /// `compact` (default) or `open_clip` (see [`MultimodalBlock`]).
    pub multimodal_block: Option<MultimodalBlock>,
    /// Whether the model has the image-text matching head (default true; `train.itm_weight`
    /// must be 0 without it).
    pub itm_head: Option<bool>,
    /// Start from the parameters of this checkpoint (a URL as for `--resume`: a checkpoint
    /// root's newest step, or a step directory), e.g. one written by `weaver import
    /// open_clip`: parameters only, a fresh optimizer, step 0, on any layout. A run resumed
    /// with `--resume` takes everything from the resumed checkpoint instead.
    pub init_from: Option<String>,
}

/// Where training samples come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataSource {
    /// The generated shapes-and-captions dataset (the demo, the tests).
    Synthetic,
    /// WebDataset tar shards (`data.shards`), streamed from local disk or object storage.
    Shards,
}

/// Where the contrastive loss takes each sample's negatives from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Contrastive {
    /// Every other sample of the global batch (open_clip's training: image and text
    /// embeddings all-gathered over the data-parallel ranks with their gradients, and
    /// gradient accumulation caching the other micro-batches' embeddings). The loss does not
    /// depend on the layout.
    Global,
    /// The other samples of the same micro-batch (`global_batch / (dp × microbatches) − 1`
    /// negatives; the loss depends on the layout).
    Micro,
}

/// `[data]`: the dataset, the tokenizer and the loader.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// `synthetic` (generated shapes; the demo and the tests) or `shards` (WebDataset tar
    /// shards named by `data.shards`).
    pub source: DataSource,
    /// Seed of the synthetic dataset (images and captions are a pure function of it and
    /// the sample index), of the sampler's shuffling, and of the shard order, in-shard
    /// shuffle and random crops.
    pub seed: u64,
    /// Number of distinct training samples (an epoch) of the synthetic dataset.
    pub train_size: u64,
    /// Most objects drawn in one synthetic image (1 or 2).
    pub max_objects: usize,
    /// `grammar` (the built-in word-level tokenizer) or a path to a Hugging Face
    /// `tokenizer.json`.
    pub tokenizer: String,
    /// Training shards: a brace pattern (`s3://bucket/train-{00000..01023}.tar`, several
    /// joined with `::`), a list file (`.txt`/`.list`, one URL or pattern a line) or a folder
    /// (every `*.tar` in it); a local path, `file://`, `s3://`, `gs://` or `az://`.
    pub shards: String,
    /// Held-out shards for evaluation, in the same forms (empty: none).
    pub eval_shards: String,
    /// Extensions of the image member, in order of preference, `;`-separated.
    pub image_key: String,
    /// Extensions of the caption member, in order of preference, `;`-separated; `json`
    /// reads the field `caption_field` of a JSON member.
    pub caption_key: String,
    /// The JSON field holding the caption when `caption_key` picks a `json` member.
    pub caption_field: String,
    /// The field of each sample's `json` member holding its question (read for VQA on
    /// shards, `train.vqa_weight > 0`; a sample without it is skipped and counted as bad).
    pub question_field: String,
    /// The field of each sample's `json` member holding the answer to its question.
    pub answer_field: String,
    /// Logical streams the shards are read in (each step takes `global_batch / streams`
    /// samples from every stream; data-parallel rank `d` reads streams `d·streams/dp ..`).
    /// Fixed for the life of a job: the order and a checkpoint's position depend on it, not
    /// on dp. Every dp the job runs with must divide it.
    pub streams: usize,
    /// Decoding threads per training process (0: the cores divided by the local processes).
    pub workers: usize,
    /// Samples per in-shard shuffle window (memory: this many undecoded samples per stream).
    pub shuffle_buffer: usize,
    /// Steps prepared ahead of the trainer (in pinned memory on CUDA).
    pub prefetch: usize,
    /// Largest fraction of bad samples (undecodable image, missing caption) tolerated; past
    /// it the job stops with an error naming the worst shards.
    pub max_bad_fraction: f64,
    /// Retries of a shard that cannot be read (with doubling backoff) before it is skipped.
    pub retries: u32,
    /// First backoff between retries, in milliseconds.
    pub retry_backoff_ms: u64,
    /// Longest wait for a shard's next bytes, in seconds.
    pub timeout_s: u64,
    /// Write every step's sample keys to `<run dir>/data-keys-rankR.jsonl` (for checking
    /// the order; costs a line per step).
    pub log_keys: bool,
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            source: DataSource::Synthetic,
            seed: 0,
            train_size: 100_000,
            max_objects: 2,
            tokenizer: "grammar".into(),
            shards: String::new(),
            eval_shards: String::new(),
            image_key: "jpg;jpeg;png;webp".into(),
            caption_key: "txt;json".into(),
            caption_field: "caption".into(),
            question_field: "question".into(),
            answer_field: "answer".into(),
            streams: 8,
            workers: 0,
            shuffle_buffer: 1000,
            prefetch: 2,
            max_bad_fraction: 0.1,
            retries: 3,
            retry_backoff_ms: 1000,
            timeout_s: 60,
            log_keys: false,
        }
    }
}

/// `[train]`: optimisation and the step loop.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Optimizer steps to run.
    pub steps: u64,
    /// Samples per optimizer step, over all data-parallel ranks and micro-batches.
    pub global_batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate as a fraction of `lr` (cosine decay ends there).
    pub min_lr_ratio: f64,
    /// Linear warmup steps.
    pub warmup_steps: u64,
    /// AdamW decoupled weight decay (not applied to norms, biases, positions, gates).
    pub weight_decay: f64,
    /// AdamW beta1.
    pub beta1: f64,
    /// AdamW beta2.
    pub beta2: f64,
    /// AdamW epsilon.
    pub eps: f64,
    /// Clip the global gradient norm to this value (0 disables).
    pub grad_clip: f64,
    /// Seed of the parameter initialisation.
    pub seed: u64,
    /// Evaluate every N steps (0: only at the end).
    pub eval_every: u64,
    /// Write a metrics line every N steps.
    pub log_every: u64,
    /// Weight of the image-text contrastive loss.
    pub itc_weight: f64,
    /// Weight of the captioning (next-token) loss.
    pub caption_weight: f64,
    /// Weight of the image-text matching loss (0 skips its negative pairs entirely).
    pub itm_weight: f64,
    /// Weight of masked language modelling over the text and multimodal layers: a second,
    /// bidirectional pass of each caption with tokens masked BERT-style, predicted with the
    /// image as context (0, the default, skips the pass entirely).
    pub mlm_weight: f64,
    /// Fraction of each caption's word tokens the MLM pass masks (of those, 80% become
    /// `[MASK]`, 10% a random token, 10% stay), drawn per sample from `data.seed` and the
    /// sample index (so every layout and a resumed run mask alike).
    pub mlm_rate: f64,
    /// Weight of visual question answering: a question/answer text per sample (generated
    /// from the synthetic scene, or `data.question_field`/`data.answer_field` of a shard's
    /// JSON) through the text and multimodal layers, the answer generated by the captioning
    /// decoder (0, the default, skips it).
    pub vqa_weight: f64,
    /// Negatives of the contrastive loss: `global` (every other sample of the global batch,
    /// as CLIP and CoCa train) or `micro` (the other samples of the micro-batch).
    pub contrastive: Contrastive,
    /// With `contrastive = "global"`: each data-parallel rank computes the loss rows of its
    /// own samples against the whole batch (open_clip's `--local-loss`: `B/dp × B` logits per
    /// rank instead of `B × B`); the loss and the gradients are the same.
    pub contrastive_local_loss: bool,
    /// Compute dtype: `auto` (bf16 on CUDA, f32 on CPU), `f32` or `bf16`. Master weights
    /// and optimizer state are always f32.
    pub dtype: String,
    /// `cpu`, `cuda` or `cuda:K`.
    pub device: String,
    /// Intra-op threads of this process (0: the cores divided by the local processes).
    pub threads: usize,
    /// Peak dense TFLOP/s of one device in the compute dtype, for MFU (0: unknown, no MFU
    /// reported; an H100/H200 SXM does 989 in bf16).
    pub peak_tflops: f64,
    /// Also write the metrics as TensorBoard event files in the run directory
    /// (`events.out.tfevents.*`, for `tensorboard --logdir RUN_DIR`).
    pub tensorboard: bool,
    /// Parts (`vision`, `text`, `multimodal`, `heads`: see `weaver_config::finetune`) or
    /// dotted parameter-name prefixes whose parameters are frozen: no gradient, no optimizer
    /// state, no data-parallel traffic, values unchanged (checkpoints still hold them).
    pub freeze: Vec<String>,
    /// Learning-rate multipliers by part or parameter-name prefix (`lr_mult.vision = 0.1`);
    /// 1 for parameters no key selects; the most specific key wins.
    pub lr_mult: BTreeMap<String, f64>,
    /// Rank of the LoRA adapters (0: no LoRA). With LoRA every base parameter is frozen and
    /// only the adapters train.
    pub lora_rank: usize,
    /// LoRA's alpha: the adapter's output is scaled by `lora_alpha / lora_rank`.
    pub lora_alpha: f64,
    /// The linear layers that get adapters, by the last two components of their name:
    /// `attn.q|k|v|o`, `xattn.q|k|v|o` (cross-attention), `mlp.fc1|fc2`, `xmlp.fc1|fc2`.
    pub lora_targets: Vec<String>,
    /// Fine-tune a magnitude-pruned model with its zeros kept: the mask is the zero pattern
    /// of the transformer blocks' linear weights as `model.init_from` loads them (a
    /// `weaver ckpt prune --method magnitude` checkpoint), re-applied after every optimizer
    /// step, so pruned weights stay exactly zero. Needs `model.init_from`.
    pub prune_mask: bool,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            steps: 300,
            global_batch: 64,
            lr: 1e-3,
            min_lr_ratio: 0.1,
            warmup_steps: 20,
            weight_decay: 0.05,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            grad_clip: 1.0,
            seed: 0,
            eval_every: 0,
            log_every: 1,
            itc_weight: 1.0,
            caption_weight: 1.0,
            itm_weight: 0.5,
            mlm_weight: 0.0,
            mlm_rate: 0.15,
            vqa_weight: 0.0,
            contrastive: Contrastive::Global,
            contrastive_local_loss: false,
            dtype: "auto".into(),
            device: "cpu".into(),
            threads: 0,
            peak_tflops: 0.0,
            tensorboard: false,
            freeze: Vec::new(),
            lr_mult: BTreeMap::new(),
            lora_rank: 0,
            lora_alpha: 16.0,
            lora_targets: vec!["attn.q".into(), "attn.v".into()],
            prune_mask: false,
        }
    }
}

/// `[eval]`: held-out retrieval and captioning.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Image-caption pairs in the retrieval pool (chance recall@1 is 1/pool).
    pub pool: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection { pool: 100 }
    }
}

/// Pipeline schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// All forwards, then all backwards.
    Gpipe,
    /// One forward, one backward in the steady state (PipeDream-flush).
    #[serde(rename = "1f1b")]
    OneFOneB,
    /// 1F1B over `virtual_stages` model chunks per rank (Megatron's interleaved schedule).
    Interleaved,
}

/// Activation recomputation (Korthikanti et al. 2022, "Reducing Activation Recomputation in
/// Large Transformer Models").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recompute {
    /// Every activation the backward needs is kept.
    None,
    /// Attention's core (the scaled-dot-product part) is recomputed; the rest is kept.
    Selective,
    /// Only each layer's input is kept; the layer runs again before its backward.
    Full,
}

impl Recompute {
    /// Every mode, for searches and tests.
    pub const ALL: [Recompute; 3] = [Recompute::None, Recompute::Selective, Recompute::Full];

    /// The name used in config files.
    pub fn name(self) -> &'static str {
        match self {
            Recompute::None => "none",
            Recompute::Selective => "selective",
            Recompute::Full => "full",
        }
    }
}

/// Which of the memory features of `[parallel]` the trainer implements. The config refuses
/// the others by name; `weaver plan` shows plans with them, marked (`--runnable` leaves
/// them out). Each flag turns on when its feature lands in the trainer (issue 12,
/// items 1–3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// `recompute = "selective"`.
    pub recompute_selective: bool,
    /// `recompute = "full"`.
    pub recompute_full: bool,
    /// `shard_optimizer = true`.
    pub shard_optimizer: bool,
    /// `sequence_parallel = true`.
    pub sequence_parallel: bool,
}

impl Features {
    /// What the trainer runs today.
    pub const TRAINER: Features = Features {
        recompute_selective: true,
        recompute_full: true,
        shard_optimizer: true,
        sequence_parallel: true,
    };

    /// Every feature (what the planner may consider for `weaver plan`).
    pub const ALL: Features = Features {
        recompute_selective: true,
        recompute_full: true,
        shard_optimizer: true,
        sequence_parallel: true,
    };

    /// Whether `recompute` is available.
    pub fn recompute(&self, r: Recompute) -> bool {
        match r {
            Recompute::None => true,
            Recompute::Selective => self.recompute_selective,
            Recompute::Full => self.recompute_full,
        }
    }

    /// The first setting of `p` these features lack, as (key, value), if any.
    pub fn missing(&self, p: &ParallelSection) -> Option<(&'static str, String)> {
        if !self.recompute(p.recompute) {
            return Some(("parallel.recompute", format!("{:?}", p.recompute.name())));
        }
        if p.shard_optimizer && !self.shard_optimizer {
            return Some(("parallel.shard_optimizer", "true".into()));
        }
        if p.sequence_parallel && !self.sequence_parallel {
            return Some(("parallel.sequence_parallel", "true".into()));
        }
        None
    }
}

/// Who picks the layout of `[parallel]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayoutMode {
    /// `dp`, `pp`, `tp`, `microbatches`, `schedule`, `virtual_stages` as written.
    #[default]
    Manual,
    /// The coordinator chooses them with weaver-plan from the workers that registered.
    Auto,
}

/// Collective backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// Ring collectives over TCP (CPU tensors).
    Tcp,
    /// NCCL (CUDA tensors).
    Nccl,
}

/// `[parallel]`: the 3-D layout.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelSection {
    /// `manual`: the layout below as written. `auto`: the coordinator chooses `dp`, `pp`,
    /// `tp`, `microbatches`, `schedule`, `virtual_stages` and the memory features the
    /// trainer runs (`recompute`, `shard_optimizer`, `sequence_parallel`) with weaver-plan,
    /// from the devices and memory of the `workers` that registered; the job's effective
    /// config (what the workers receive, `<run dir>/config.toml`) carries the choice.
    pub layout: LayoutMode,
    /// Workers a `layout = "auto"` job gathers (0: `dp × pp × tp` as written; `weaver
    /// launch` sets it to `--nproc`). Ignored with `manual`.
    pub workers: usize,
    /// Data-parallel replicas.
    pub dp: usize,
    /// Pipeline stages.
    pub pp: usize,
    /// Tensor-parallel ranks.
    pub tp: usize,
    /// Micro-batches per data-parallel rank and step (gradient accumulation).
    pub microbatches: usize,
    /// `gpipe`, `1f1b` or `interleaved`.
    pub schedule: Schedule,
    /// Model chunks per pipeline rank for the interleaved schedule.
    pub virtual_stages: usize,
    /// Activation recomputation: `none`, `selective` (attention's core) or `full` (each
    /// layer's input kept, the layer recomputed before its backward).
    pub recompute: Recompute,
    /// Shard the f32 master weights and AdamW moments over the data-parallel group (ZeRO-1).
    pub shard_optimizer: bool,
    /// Split the regions between tensor-parallel blocks along the sequence over the TP group.
    pub sequence_parallel: bool,
    /// `tcp` or `nccl`.
    pub backend: Backend,
    /// Multiplier on the FLOP-based cost of image-encoder blocks when balancing pipeline
    /// stages (raise it if image stages turn out slower than their FLOPs suggest).
    pub vision_block_cost: f64,
    /// Timeout in seconds for rendezvous, the first step, evaluation and checkpoints.
    pub init_timeout_s: u64,
    /// Timeout in seconds for every collective of the steady state: a lost peer is
    /// noticed within this time.
    pub timeout_s: u64,
    /// Size of the gradient buckets all-reduced across data-parallel replicas, in MiB.
    pub bucket_mib: f64,
    /// Start each gradient bucket's data-parallel all-reduce as soon as the backward has
    /// finished its layers (overlapping communication with the rest of the backward), rather
    /// than after the whole backward. The results are the same bits either way.
    pub overlap: bool,
}

impl ParallelSection {
    /// The processes the job runs on: `workers` for an `auto` layout that sets it, else
    /// `dp × pp × tp`.
    pub fn world(&self) -> usize {
        if self.layout == LayoutMode::Auto && self.workers > 0 {
            self.workers
        } else {
            self.dp * self.pp * self.tp
        }
    }
}

impl Default for ParallelSection {
    fn default() -> Self {
        ParallelSection {
            layout: LayoutMode::Manual,
            workers: 0,
            dp: 1,
            pp: 1,
            tp: 1,
            microbatches: 1,
            schedule: Schedule::OneFOneB,
            virtual_stages: 1,
            recompute: Recompute::None,
            shard_optimizer: false,
            sequence_parallel: false,
            backend: Backend::Tcp,
            vision_block_cost: 1.0,
            init_timeout_s: 300,
            timeout_s: 60,
            bucket_mib: 25.0,
            overlap: true,
        }
    }
}

/// `[checkpoint]`: where and how often.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    /// A local path, `file://`, `s3://`, `gs://` or `az://` URL (empty: no checkpoints).
    pub url: String,
    /// Save every N steps (0: only at the end and on demand).
    pub every: u64,
    /// Committed checkpoints to keep (0: all).
    pub keep: usize,
}

/// The file as written, with defaults filled in.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// `[model]`.
    pub model: ModelSection,
    /// `[data]`.
    pub data: DataSection,
    /// `[train]`.
    pub train: TrainSection,
    /// `[eval]`.
    pub eval: EvalSection,
    /// `[parallel]`.
    pub parallel: ParallelSection,
    /// `[checkpoint]`.
    pub checkpoint: CheckpointSection,
    /// `[distill]`: a frozen teacher (see [`crate::distill`]).
    pub distill: crate::distill::DistillSection,
    /// `[infer]` (an inference job when `infer.checkpoint` is set).
    pub infer: crate::infer::InferSection,
}

/// Resolved model dimensions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Flavor it came from.
    pub flavor: String,
    /// Fusion kind.
    pub fusion: Fusion,
    /// Image side in pixels.
    pub image_size: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// Image channels (RGB).
    pub channels: usize,
    /// Image encoder width.
    pub vision_width: usize,
    /// Image encoder blocks.
    pub vision_layers: usize,
    /// Image encoder heads.
    pub vision_heads: usize,
    /// Image encoder head width (`None`: `vision_width / vision_heads`; see
    /// [`ModelConfig::vision_head_size`]).
    #[serde(default)]
    pub vision_head_dim: Option<usize>,
    /// Text width.
    pub text_width: usize,
    /// Text heads.
    pub text_heads: usize,
    /// Text head width (`None`: `text_width / text_heads`).
    #[serde(default)]
    pub text_head_dim: Option<usize>,
    /// Unimodal text layers.
    pub unimodal_layers: usize,
    /// Multimodal text layers.
    pub multimodal_layers: usize,
    /// MLP hidden = ratio × width.
    pub mlp_ratio: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Tokens per caption, BOS and EOS included.
    pub max_text_len: usize,
    /// Contrastive embedding width.
    pub embed_dim: usize,
    /// LayerNorm epsilon.
    pub norm_eps: f64,
    /// MLP activation.
    pub activation: Activation,
    /// Patch embedding bias.
    pub patch_bias: bool,
    /// A class token before the image patches.
    pub vision_class_token: bool,
    /// A norm before the first image block.
    pub vision_ln_pre: bool,
    /// Image pooling.
    pub vision_pool: VisionPool,
    /// Attentional pooler queries.
    pub attn_pool_queries: usize,
    /// Attentional pooler heads.
    pub attn_pool_heads: usize,
    /// Attentional pooler head width (`None`: `embed_dim / attn_pool_heads`).
    #[serde(default)]
    pub attn_pool_head_dim: Option<usize>,
    /// Text pooling.
    pub text_pool: TextPool,
    /// Padding mask of the unimodal layers.
    pub text_pad_mask: PadMask,
    /// Text projection bias.
    pub text_proj_bias: bool,
    /// Multimodal layer layout.
    pub multimodal_block: MultimodalBlock,
    /// Whether the matching head exists.
    pub itm_head: bool,
    /// Checkpoint to take the initial parameters from.
    pub init_from: Option<String>,
}

impl ModelConfig {
    /// The named flavors.
    pub const FLAVORS: [&'static str; 6] = [
        "debug",
        "small",
        "1b",
        "openclip-coca-b32",
        "openclip-coca-l14",
        "openclip-clip-b32",
    ];

    /// The defaults of a named flavor.
    pub fn flavor(name: &str) -> Result<ModelConfig, ConfigError> {
        let base = ModelConfig {
            flavor: name.to_string(),
            fusion: Fusion::CrossAttention,
            image_size: 32,
            patch_size: 8,
            channels: 3,
            vision_width: 64,
            vision_layers: 2,
            vision_heads: 4,
            vision_head_dim: None,
            text_width: 64,
            text_heads: 4,
            text_head_dim: None,
            unimodal_layers: 2,
            multimodal_layers: 2,
            mlp_ratio: 4,
            vocab_size: 64,
            max_text_len: 16,
            embed_dim: 64,
            norm_eps: 1e-5,
            activation: Activation::Gelu,
            patch_bias: true,
            vision_class_token: false,
            vision_ln_pre: false,
            vision_pool: VisionPool::Mean,
            attn_pool_queries: 256,
            attn_pool_heads: 8,
            attn_pool_head_dim: None,
            text_pool: TextPool::Eos,
            text_pad_mask: PadMask::None,
            text_proj_bias: false,
            multimodal_block: MultimodalBlock::Compact,
            itm_head: true,
            init_from: None,
        };
        // open_clip's ViTs and text towers (model_configs/*.json of open_clip 3.3.0): a
        // class token, ln_pre, no patch bias, no matching head; 64-wide vision heads.
        let open_clip = ModelConfig {
            image_size: 224,
            patch_size: 32,
            vision_width: 768,
            vision_layers: 12,
            vision_heads: 12,
            text_width: 512,
            text_heads: 8,
            unimodal_layers: 12,
            multimodal_layers: 12,
            vocab_size: 49408,
            max_text_len: 76,
            embed_dim: 512,
            patch_bias: false,
            vision_class_token: true,
            vision_ln_pre: true,
            vision_pool: VisionPool::Attentional,
            attn_pool_queries: 256,
            attn_pool_heads: 8,
            text_pool: TextPool::ClassToken,
            text_pad_mask: PadMask::OpenClipLegacy,
            multimodal_block: MultimodalBlock::OpenClip,
            itm_head: false,
            ..base.clone()
        };
        match name {
            "debug" => Ok(base),
            "small" => Ok(ModelConfig {
                image_size: 64,
                patch_size: 8,
                vision_width: 256,
                vision_layers: 6,
                vision_heads: 8,
                text_width: 256,
                text_heads: 8,
                unimodal_layers: 4,
                multimodal_layers: 4,
                embed_dim: 256,
                ..base
            }),
            // About 1.0e9 parameters (see `ModelConfig::num_params`): a ViT-L/14 image
            // encoder at 224 px and a 1280-wide, 28-layer text decoder.
            "1b" => Ok(ModelConfig {
                image_size: 224,
                patch_size: 14,
                vision_width: 1024,
                vision_layers: 24,
                vision_heads: 16,
                text_width: 1280,
                text_heads: 20,
                unimodal_layers: 14,
                multimodal_layers: 14,
                vocab_size: 32768,
                max_text_len: 32,
                embed_dim: 1024,
                ..base
            }),
            // open_clip `coca_ViT-B-32`.
            "openclip-coca-b32" => Ok(open_clip),
            // open_clip `coca_ViT-L-14`.
            "openclip-coca-l14" => Ok(ModelConfig {
                patch_size: 14,
                vision_width: 1024,
                vision_layers: 24,
                vision_heads: 16,
                text_width: 768,
                text_heads: 12,
                embed_dim: 768,
                attn_pool_heads: 12,
                ..open_clip
            }),
            // open_clip `ViT-B-32` (CLIP: no decoder; EOS pooling, which is open_clip's
            // argmax pooling under CLIP's tokenizer).
            "openclip-clip-b32" => Ok(ModelConfig {
                multimodal_layers: 0,
                max_text_len: 77,
                vision_pool: VisionPool::ClassToken,
                text_pool: TextPool::Eos,
                text_pad_mask: PadMask::None,
                multimodal_block: MultimodalBlock::Compact,
                ..open_clip
            }),
            other => Err(ConfigError::BadConfig {
                key: "model.flavor".into(),
                message: format!(
                    "unknown flavor {other:?}; choose one of {}",
                    ModelConfig::FLAVORS.join(", ")
                ),
            }),
        }
    }

    /// Patches per image (image tokens).
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    /// Values in one flattened patch.
    pub fn patch_dim(&self) -> usize {
        self.patch_size * self.patch_size * self.channels
    }

    /// Tokens in the image encoder: the patches and the class token, if any.
    pub fn vision_seq_len(&self) -> usize {
        self.num_patches() + usize::from(self.vision_class_token)
    }

    /// Tokens in the unimodal text layers: the caption and the class token, if any.
    pub fn text_seq_len(&self) -> usize {
        self.max_text_len + usize::from(self.text_pool == TextPool::ClassToken)
    }

    /// Image tokens the decoder attends to (the memory), per sample.
    pub fn memory_len(&self) -> usize {
        match self.vision_pool {
            VisionPool::Attentional => self.attn_pool_queries - 1,
            _ => self.num_patches(),
        }
    }

    /// Width of the memory tokens.
    pub fn memory_width(&self) -> usize {
        match self.vision_pool {
            VisionPool::Attentional => self.embed_dim,
            _ => self.vision_width,
        }
    }

    /// Width of one image-encoder attention head (`model.vision_head_dim`, default
    /// `vision_width / vision_heads`).
    pub fn vision_head_size(&self) -> usize {
        self.vision_head_dim
            .unwrap_or(self.vision_width / self.vision_heads.max(1))
    }

    /// Width of one text attention head (`model.text_head_dim`, default
    /// `text_width / text_heads`).
    pub fn text_head_size(&self) -> usize {
        self.text_head_dim
            .unwrap_or(self.text_width / self.text_heads.max(1))
    }

    /// Width of one head of the attentional pooler (`model.attn_pool_head_dim`, default
    /// `embed_dim / attn_pool_heads`).
    pub fn attn_pool_head_size(&self) -> usize {
        self.attn_pool_head_dim
            .unwrap_or(self.embed_dim / self.attn_pool_heads.max(1))
    }

    /// The image encoder's attention width, `vision_heads · vision_head_size` (what q, k
    /// and v project to; the residual width unless `vision_head_dim` is set).
    pub fn vision_attn_width(&self) -> usize {
        self.vision_heads * self.vision_head_size()
    }

    /// The text layers' attention width, `text_heads · text_head_size`.
    pub fn text_attn_width(&self) -> usize {
        self.text_heads * self.text_head_size()
    }

    /// The attentional pooler's attention width, `attn_pool_heads · attn_pool_head_size`.
    pub fn attn_pool_width(&self) -> usize {
        self.attn_pool_heads * self.attn_pool_head_size()
    }

    /// Checks every dimension; the message names the key to fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| {
            Err(ConfigError::BadConfig {
                key: format!("model.{key}"),
                message,
            })
        };
        let positive = [
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
            ("vision_width", self.vision_width),
            ("vision_layers", self.vision_layers),
            ("vision_heads", self.vision_heads),
            ("text_width", self.text_width),
            ("text_heads", self.text_heads),
            ("unimodal_layers", self.unimodal_layers),
            ("mlp_ratio", self.mlp_ratio),
            ("vocab_size", self.vocab_size),
            ("embed_dim", self.embed_dim),
        ];
        for (key, value) in positive {
            if value == 0 {
                return bad(key, "must be at least 1".into());
            }
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            return bad(
                "patch_size",
                format!(
                    "patch_size {} does not divide image_size {}; pick a patch size that divides it (e.g. {})",
                    self.patch_size,
                    self.image_size,
                    largest_divisor_at_most(self.image_size, self.patch_size)
                ),
            );
        }
        let head_dims = [
            ("vision_head_dim", self.vision_head_dim),
            ("text_head_dim", self.text_head_dim),
            ("attn_pool_head_dim", self.attn_pool_head_dim),
        ];
        for (key, value) in head_dims {
            if value == Some(0) {
                return bad(
                    key,
                    "must be at least 1 (or left out: width / heads)".into(),
                );
            }
        }
        if self.vision_head_dim.is_none() && !self.vision_width.is_multiple_of(self.vision_heads) {
            return bad(
                "vision_heads",
                format!(
                    "vision_heads {} does not divide vision_width {}; use a head count that divides the width (e.g. {}) or set model.vision_head_dim",
                    self.vision_heads,
                    self.vision_width,
                    largest_divisor_at_most(self.vision_width, self.vision_heads)
                ),
            );
        }
        if self.text_head_dim.is_none() && !self.text_width.is_multiple_of(self.text_heads) {
            return bad(
                "text_heads",
                format!(
                    "text_heads {} does not divide text_width {}; use a head count that divides the width (e.g. {}) or set model.text_head_dim",
                    self.text_heads,
                    self.text_width,
                    largest_divisor_at_most(self.text_width, self.text_heads)
                ),
            );
        }
        if self.vision_pool == VisionPool::ClassToken && !self.vision_class_token {
            return bad(
                "vision_pool",
                "vision_pool = \"class_token\" needs model.vision_class_token = true".into(),
            );
        }
        if self.vision_pool == VisionPool::Attentional {
            let min = if self.multimodal_layers > 0 { 2 } else { 1 };
            if self.attn_pool_queries < min {
                return bad(
                    "attn_pool_queries",
                    format!(
                        "the attentional pooler needs at least {min} queries (query 0 is the embedding, the others the decoder's memory), got {}",
                        self.attn_pool_queries
                    ),
                );
            }
            if self.attn_pool_heads == 0
                || (self.attn_pool_head_dim.is_none()
                    && !self.embed_dim.is_multiple_of(self.attn_pool_heads))
            {
                return bad(
                    "attn_pool_heads",
                    format!(
                        "attn_pool_heads {} must divide embed_dim {} (the pooler is embed_dim wide) unless model.attn_pool_head_dim is set",
                        self.attn_pool_heads, self.embed_dim
                    ),
                );
            }
        }
        if self.text_pad_mask == PadMask::OpenClipLegacy && self.text_pool != TextPool::ClassToken {
            return bad(
                "text_pad_mask",
                "open_clip_legacy shifts the mask by the appended class token: it needs model.text_pool = \"class_token\"; use \"keys\" otherwise".into(),
            );
        }
        if self.multimodal_layers == 0 && self.fusion != Fusion::CrossAttention {
            return bad(
                "fusion",
                "a model without multimodal layers has no fusion; leave model.fusion at cross_attention".into(),
            );
        }
        if self.max_text_len < 3 {
            return bad(
                "max_text_len",
                format!(
                    "max_text_len {} leaves no room for a word between BOS and EOS; use at least 3",
                    self.max_text_len
                ),
            );
        }
        Ok(())
    }

    /// Applies the `[model]` overrides on top of the flavor's defaults.
    fn apply(mut self, s: &ModelSection) -> ModelConfig {
        macro_rules! take {
            ($($f:ident),*) => { $( if let Some(v) = s.$f { self.$f = v; } )* };
        }
        take!(
            image_size,
            patch_size,
            vision_width,
            vision_layers,
            vision_heads,
            text_width,
            text_heads,
            unimodal_layers,
            multimodal_layers,
            mlp_ratio,
            vocab_size,
            max_text_len,
            embed_dim,
            activation,
            patch_bias,
            vision_class_token,
            vision_ln_pre,
            vision_pool,
            attn_pool_queries,
            attn_pool_heads,
            text_pool,
            text_pad_mask,
            text_proj_bias,
            multimodal_block,
            itm_head
        );
        if let Some(f) = s.fusion {
            self.fusion = f;
        }
        for (mine, theirs) in [
            (&mut self.vision_head_dim, s.vision_head_dim),
            (&mut self.text_head_dim, s.text_head_dim),
            (&mut self.attn_pool_head_dim, s.attn_pool_head_dim),
        ] {
            if theirs.is_some() {
                *mine = theirs;
            }
        }
        if let Some(u) = &s.init_from {
            self.init_from = Some(u.clone());
        }
        self
    }

    /// Trainable parameters, counted from the dimensions (equals the sum over the model's
    /// variables; a unit test checks it).
    pub fn num_params(&self) -> u64 {
        let (dv, dt) = (self.vision_width as u64, self.text_width as u64);
        let e = self.embed_dim as u64;
        let r = self.mlp_ratio as u64;
        let ln = |d: u64| 2 * d;
        let lin = |i: u64, o: u64| i * o + o;
        // q, k, v project to the attention width `a`, o back to the stream's `dq`.
        let attn = |dq: u64, dkv: u64, a: u64| lin(dq, a) + 2 * lin(dkv, a) + lin(a, dq);
        let mlp = |d: u64| lin(d, r * d) + lin(r * d, d);
        let (av, at) = (
            self.vision_attn_width() as u64,
            self.text_attn_width() as u64,
        );
        let block = |d: u64, a: u64| ln(d) + attn(d, d, a) + ln(d) + mlp(d);
        let patch = self.patch_dim() as u64 * dv + if self.patch_bias { dv } else { 0 };
        let pool_dim = match self.vision_pool {
            VisionPool::Attentional => e,
            _ => dv,
        };
        let pooler = match self.vision_pool {
            VisionPool::Attentional => {
                self.attn_pool_queries as u64 * e
                    + ln(e)
                    + ln(dv)
                    + attn(e, dv, self.attn_pool_width() as u64)
            }
            _ => 0,
        };
        let vision = patch
            + self.vision_seq_len() as u64 * dv
            + if self.vision_class_token { dv } else { 0 }
            + if self.vision_ln_pre { ln(dv) } else { 0 }
            + self.vision_layers as u64 * block(dv, av)
            + pooler
            + ln(pool_dim)
            + pool_dim * e;
        let text_in = self.vocab_size as u64 * dt
            + self.text_seq_len() as u64 * dt
            + if self.text_pool == TextPool::ClassToken {
                dt
            } else {
                0
            };
        let unimodal = self.unimodal_layers as u64 * block(dt, at)
            + ln(dt)
            + dt * e
            + if self.text_proj_bias { e } else { 0 };
        let dm = self.memory_width() as u64;
        let cross = match self.multimodal_block {
            MultimodalBlock::Compact => ln(dt) + attn(dt, dm, at),
            MultimodalBlock::OpenClip => ln(dt) + ln(dm) + attn(dt, dm, at) + ln(dt) + mlp(dt),
        };
        let mm_layer = match self.fusion {
            Fusion::CrossAttention => block(dt, at) + cross,
            Fusion::GatedCrossAttention => block(dt, at) + cross + 1,
            Fusion::Prefix => block(dt, at),
        };
        let fusion_in = match self.fusion {
            Fusion::Prefix if self.multimodal_layers > 0 => lin(dm, dt),
            _ => 0,
        };
        let decoder_head = if self.multimodal_layers > 0 {
            ln(dt) + self.vocab_size as u64 * dt
        } else {
            0
        };
        let itm_head = if self.itm_head && self.multimodal_layers > 0 {
            lin(dt, 2)
        } else {
            0
        };
        let heads = decoder_head + itm_head + 1;
        vision + text_in + unimodal + fusion_in + self.multimodal_layers as u64 * mm_layer + heads
    }

    /// Training FLOPs per sample (forward + backward = 3 × forward), counting every matrix
    /// multiply (2 FLOPs per multiply-add) including attention scores and values, with
    /// `itm` whether the matching loss runs the multimodal layers on a negative pair too.
    /// Element-wise work is left out, as in the usual MFU convention (PaLM, Megatron).
    pub fn train_flops_per_sample(&self, itm: bool) -> f64 {
        3.0 * self.forward_flops_per_sample(itm)
    }

    /// Forward FLOPs per sample (see [`ModelConfig::train_flops_per_sample`]).
    pub fn forward_flops_per_sample(&self, itm: bool) -> f64 {
        let (dv, dt) = (self.vision_width as f64, self.text_width as f64);
        let r = self.mlp_ratio as f64;
        let np = self.num_patches() as f64;
        let nv = self.vision_seq_len() as f64;
        let t = self.max_text_len as f64;
        let tu = self.text_seq_len() as f64;
        let (n, dm) = (self.memory_len() as f64, self.memory_width() as f64);
        let e = self.embed_dim as f64;
        let (av, at) = (
            self.vision_attn_width() as f64,
            self.text_attn_width() as f64,
        );
        let ap = self.attn_pool_width() as f64;
        // Per token: projections q,k,v,o (width `d` to the attention width `a`) and the
        // MLP; per query: scores and values.
        let block = |d: f64, a: f64, tokens: f64, keys: f64| {
            tokens * (2.0 * 4.0 * d * a + 2.0 * 2.0 * r * d * d) + 2.0 * 2.0 * tokens * keys * a
        };
        let pool_dim = match self.vision_pool {
            VisionPool::Attentional => {
                let q = self.attn_pool_queries as f64;
                // q and o on the queries, k and v on the image tokens, scores and values
                2.0 * 2.0 * q * e * ap + 2.0 * 2.0 * nv * dv * ap + 2.0 * 2.0 * q * nv * ap
            }
            _ => 0.0,
        };
        let proj_in = match self.vision_pool {
            VisionPool::Attentional => e,
            _ => dv,
        };
        let vision = 2.0 * np * self.patch_dim() as f64 * dv
            + self.vision_layers as f64 * block(dv, av, nv, nv)
            + pool_dim
            + 2.0 * proj_in * e;
        let unimodal = self.unimodal_layers as f64 * block(dt, at, tu, tu) + 2.0 * dt * e;
        let copies = if itm { 2.0 } else { 1.0 };
        let cross_mlp = match self.multimodal_block {
            MultimodalBlock::Compact => 0.0,
            MultimodalBlock::OpenClip => t * 2.0 * 2.0 * r * dt * dt,
        };
        let mm_layer = match self.fusion {
            Fusion::CrossAttention | Fusion::GatedCrossAttention => {
                block(dt, at, t, t)
                    // cross-attention: q and o on text, k and v on the image tokens
                    + 2.0 * 2.0 * t * dt * at
                    + 2.0 * 2.0 * n * dm * at
                    + 2.0 * 2.0 * t * n * at
                    + cross_mlp
            }
            Fusion::Prefix => block(dt, at, t + n, t + n),
        };
        let prefix_in = match self.fusion {
            Fusion::Prefix => 2.0 * n * dm * dt,
            _ => 0.0,
        };
        let lm_head = if self.multimodal_layers > 0 {
            2.0 * t * dt * self.vocab_size as f64
        } else {
            0.0
        };
        let itm_head = if itm { 2.0 * 2.0 * dt * 2.0 } else { 0.0 };
        vision
            + unimodal
            + copies * (prefix_in + self.multimodal_layers as f64 * mm_layer)
            + lm_head
            + itm_head
    }
}

fn largest_divisor_at_most(n: usize, k: usize) -> usize {
    (1..=k.min(n))
        .rev()
        .find(|d| n.is_multiple_of(*d))
        .unwrap_or(1)
}

/// The validated job: everything downstream trusts it.
#[derive(Debug, Clone)]
pub struct JobConfig {
    /// Resolved model dimensions.
    pub model: ModelConfig,
    /// `[data]`.
    pub data: DataSection,
    /// `[train]`.
    pub train: TrainSection,
    /// `[eval]`.
    pub eval: EvalSection,
    /// `[parallel]`.
    pub parallel: ParallelSection,
    /// `[checkpoint]`.
    pub checkpoint: CheckpointSection,
    /// `[distill]`.
    pub distill: crate::distill::DistillSection,
    /// The file config it came from (after overrides), kept for the run directory.
    pub file: FileConfig,
}

impl JobConfig {
    /// Reads `path`, applies `--set` overrides (`section.key=value`, the value parsed as a
    /// TOML literal, else taken as a string) and validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<JobConfig, ConfigError> {
        JobConfig::load_with(path, overrides, Features::TRAINER)
    }

    /// [`JobConfig::load`] allowing the memory features in `features` (`weaver plan` reads
    /// configs that ask for features the trainer lacks).
    pub fn load_with(
        path: &Path,
        overrides: &[String],
        features: Features,
    ) -> Result<JobConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::BadConfig {
            key: "--config".into(),
            message: format!("cannot read {}: {e}", path.display()),
        })?;
        JobConfig::parse_with(&text, overrides, features).map_err(|e| match e {
            ConfigError::BadConfig { key, message } => ConfigError::BadConfig {
                key,
                message: format!("{message} (in {})", path.display()),
            },
            // Variants added later pass through unchanged.
            #[allow(unreachable_patterns)]
            other => other,
        })
    }

    /// As [`JobConfig::load`], from the file's text.
    pub fn parse(text: &str, overrides: &[String]) -> Result<JobConfig, ConfigError> {
        JobConfig::parse_with(text, overrides, Features::TRAINER)
    }

    /// [`JobConfig::parse`] allowing the memory features in `features`.
    pub fn parse_with(
        text: &str,
        overrides: &[String],
        features: Features,
    ) -> Result<JobConfig, ConfigError> {
        let mut value: toml::Table = toml::from_str(text).map_err(|e| ConfigError::BadConfig {
            key: toml_error_key(&e),
            message: e.message().to_string(),
        })?;
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        let file: FileConfig =
            FileConfig::deserialize(toml::Value::Table(value.clone())).map_err(|e| {
                ConfigError::BadConfig {
                    key: value_error_key(&value, &e),
                    message: e.message().to_string(),
                }
            })?;
        JobConfig::from_file_config_with(file, features)
    }

    /// Resolves the flavor and checks every section (the memory features as the trainer
    /// has them, [`Features::TRAINER`]).
    pub fn from_file_config(file: FileConfig) -> Result<JobConfig, ConfigError> {
        JobConfig::from_file_config_with(file, Features::TRAINER)
    }

    /// [`JobConfig::from_file_config`] allowing the memory features in `features`: the
    /// planner checks each candidate layout with the same rules, `weaver plan` with every
    /// feature, `weaver plan --runnable` with the trainer's.
    pub fn from_file_config_with(
        file: FileConfig,
        features: Features,
    ) -> Result<JobConfig, ConfigError> {
        let flavor = file.model.flavor.clone().unwrap_or_else(|| "debug".into());
        let model = ModelConfig::flavor(&flavor)?.apply(&file.model);
        model.validate()?;
        let bad = |key: &str, message: String| ConfigError::BadConfig {
            key: key.into(),
            message,
        };
        let t = &file.train;
        if t.global_batch == 0 {
            return Err(bad("train.global_batch", "must be at least 1".into()));
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            return Err(bad(
                "train.lr",
                format!("must be a positive number, got {}", t.lr),
            ));
        }
        if !(0.0..=1.0).contains(&t.min_lr_ratio) {
            return Err(bad("train.min_lr_ratio", "must lie in [0, 1]".into()));
        }
        if !(0.0..1.0).contains(&t.beta1) || !(0.0..1.0).contains(&t.beta2) {
            return Err(bad(
                "train.beta1",
                "beta1 and beta2 must lie in [0, 1)".into(),
            ));
        }
        if t.grad_clip < 0.0 {
            return Err(bad(
                "train.grad_clip",
                "must be ≥ 0 (0 disables clipping)".into(),
            ));
        }
        if t.log_every == 0 {
            return Err(bad("train.log_every", "must be at least 1".into()));
        }
        if t.itc_weight < 0.0 || t.caption_weight < 0.0 || t.itm_weight < 0.0 {
            return Err(bad("train.itc_weight", "loss weights must be ≥ 0".into()));
        }
        for (key, w) in [
            ("train.mlm_weight", t.mlm_weight),
            ("train.vqa_weight", t.vqa_weight),
        ] {
            if !(w >= 0.0 && w.is_finite()) {
                return Err(bad(key, format!("must be a finite weight ≥ 0, got {w}")));
            }
            if w > 0.0 && model.multimodal_layers == 0 {
                return Err(bad(
                    key,
                    format!(
                        "the model has no multimodal layers (flavor {}), so no decoder predicts tokens: set {key} = 0",
                        model.flavor
                    ),
                ));
            }
        }
        if !(t.mlm_rate > 0.0 && t.mlm_rate < 1.0) {
            return Err(bad(
                "train.mlm_rate",
                format!("must be in (0, 1), got {}", t.mlm_rate),
            ));
        }
        if model.multimodal_layers == 0 && t.caption_weight > 0.0 {
            return Err(bad(
                "train.caption_weight",
                format!(
                    "the model has no multimodal layers (flavor {}), so nothing captions: set train.caption_weight = 0",
                    model.flavor
                ),
            ));
        }
        if (model.multimodal_layers == 0 || !model.itm_head) && t.itm_weight > 0.0 {
            return Err(bad(
                "train.itm_weight",
                format!(
                    "the model has no image-text matching head (flavor {}): set train.itm_weight = 0, or model.itm_head = true with multimodal layers",
                    model.flavor
                ),
            ));
        }
        if !["auto", "f32", "bf16"].contains(&t.dtype.as_str()) {
            return Err(bad(
                "train.dtype",
                format!("unknown dtype {:?}; use auto, f32 or bf16", t.dtype),
            ));
        }
        DeviceName::parse(&t.device)?;
        check_finetune(t)?;
        // The teacher's group against the layout as written (an automatic layout is
        // checked candidate by candidate: the planner's memory model refuses the ones it
        // does not fit).
        let written = (file.parallel.layout == LayoutMode::Manual)
            .then_some((file.parallel.tp, file.parallel.dp));
        file.distill.validate(&model, written)?;
        if t.prune_mask && model.init_from.is_none() {
            return Err(bad(
                "train.prune_mask",
                "the mask is the zero pattern of the weights model.init_from loads: set model.init_from to a pruned checkpoint (weaver ckpt prune --method magnitude)".into(),
            ));
        }
        file.infer.validate()?;
        let d = &file.data;
        if !(1..=2).contains(&d.max_objects) {
            return Err(bad(
                "data.max_objects",
                format!("must be 1 or 2, got {}", d.max_objects),
            ));
        }
        if d.train_size == 0 {
            return Err(bad("data.train_size", "must be at least 1".into()));
        }
        if d.source == DataSource::Shards {
            if d.shards.trim().is_empty() {
                return Err(bad(
                    "data.shards",
                    "data.source = \"shards\" needs data.shards: a brace pattern, a list file or a folder".into(),
                ));
            }
            if d.image_key.split(';').all(|k| k.trim().is_empty()) {
                return Err(bad("data.image_key", "names no extension".into()));
            }
            if d.caption_key.split(';').all(|k| k.trim().is_empty()) {
                return Err(bad("data.caption_key", "names no extension".into()));
            }
            if d.streams == 0 {
                return Err(bad("data.streams", "must be at least 1".into()));
            }
            if !d.streams.is_multiple_of(file.parallel.dp.max(1)) {
                return Err(bad(
                    "data.streams",
                    format!(
                        "data.streams = {} must be a multiple of parallel.dp = {} (each data-parallel rank reads whole streams)",
                        d.streams, file.parallel.dp
                    ),
                ));
            }
            if !file.train.global_batch.is_multiple_of(d.streams) {
                return Err(bad(
                    "data.streams",
                    format!(
                        "train.global_batch = {} must be a multiple of data.streams = {} (every step takes as many samples from each stream)",
                        file.train.global_batch, d.streams
                    ),
                ));
            }
            if d.shuffle_buffer == 0 {
                return Err(bad("data.shuffle_buffer", "must be at least 1".into()));
            }
        }
        // VQA on shards (training or held-out) reads each sample's question and answer.
        if t.vqa_weight > 0.0 {
            for (key, v) in [
                ("data.question_field", &d.question_field),
                ("data.answer_field", &d.answer_field),
            ] {
                if v.trim().is_empty() {
                    return Err(bad(key, "names no JSON field".into()));
                }
            }
        }
        if d.prefetch == 0 {
            return Err(bad("data.prefetch", "must be at least 1".into()));
        }
        if !(0.0..=1.0).contains(&d.max_bad_fraction) {
            return Err(bad("data.max_bad_fraction", "must lie in [0, 1]".into()));
        }
        if d.timeout_s == 0 {
            return Err(bad("data.timeout_s", "must be at least 1 second".into()));
        }
        if file.eval.pool < 2 {
            return Err(bad("eval.pool", "must be at least 2".into()));
        }
        let p = &file.parallel;
        for (key, v) in [
            ("parallel.dp", p.dp),
            ("parallel.pp", p.pp),
            ("parallel.tp", p.tp),
            ("parallel.microbatches", p.microbatches),
            ("parallel.virtual_stages", p.virtual_stages),
        ] {
            if v == 0 {
                return Err(bad(key, "must be at least 1".into()));
            }
        }
        if p.timeout_s == 0 || p.init_timeout_s == 0 {
            return Err(bad(
                "parallel.timeout_s",
                "timeouts must be at least 1 second".into(),
            ));
        }
        if p.bucket_mib.is_nan() || p.bucket_mib <= 0.0 {
            return Err(bad(
                "parallel.bucket_mib",
                "must be a positive size in MiB".into(),
            ));
        }
        if p.vision_block_cost.is_nan() || p.vision_block_cost <= 0.0 {
            return Err(bad("parallel.vision_block_cost", "must be positive".into()));
        }
        if let Some((key, value)) = features.missing(p) {
            return Err(bad(
                key,
                format!(
                    "{key} = {value} is not implemented by the trainer yet (issue 12); `weaver plan` shows what it would save"
                ),
            ));
        }
        if p.sequence_parallel && p.tp == 1 {
            return Err(bad(
                "parallel.sequence_parallel",
                "sequence parallelism splits the tensor-parallel group's work: it needs parallel.tp ≥ 2".into(),
            ));
        }
        let per_step = p.dp * p.microbatches;
        if !t.global_batch.is_multiple_of(per_step) {
            return Err(bad(
                "train.global_batch",
                format!(
                    "global_batch {} must divide evenly into dp × microbatches = {} × {} micro-batches",
                    t.global_batch, p.dp, p.microbatches
                ),
            ));
        }
        if t.contrastive == Contrastive::Global && t.global_batch < 2 && t.itc_weight > 0.0 {
            return Err(bad(
                "train.global_batch",
                "a global batch of 1 sample leaves the contrastive loss no negatives; raise global_batch".into(),
            ));
        }
        if t.contrastive == Contrastive::Micro
            && t.global_batch / per_step < 2
            && t.itc_weight > 0.0
        {
            return Err(bad(
                "train.global_batch",
                format!(
                    "a micro-batch of {} sample leaves the contrastive loss no negatives; raise global_batch or lower dp × microbatches",
                    t.global_batch / per_step
                ),
            ));
        }
        Ok(JobConfig {
            model,
            data: file.data.clone(),
            train: file.train.clone(),
            eval: file.eval.clone(),
            parallel: file.parallel.clone(),
            checkpoint: file.checkpoint.clone(),
            distill: file.distill.clone(),
            file,
        })
    }

    /// Samples in one micro-batch (the unit of contrastive and matching negatives).
    pub fn micro_batch_size(&self) -> usize {
        self.train.global_batch / (self.parallel.dp * self.parallel.microbatches)
    }

    /// The effective config as TOML, for the run directory.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(&self.file).unwrap_or_default()
    }
}

fn toml_error_key(e: &toml::de::Error) -> String {
    // serde reports unknown keys as "unknown field `x`"; the key itself is the useful part.
    let msg = e.message();
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        if let Some(end) = rest.find('`') {
            return rest[..end].to_string();
        }
    }
    "config".into()
}

/// The key a deserialization error of the (overridden) table `value` is about: serde's
/// unknown field, else the `section.key` at the error's place in the table written out as
/// text (a value deserialized from a table carries no position; the same text parsed again
/// does), else `config`.
fn value_error_key(value: &toml::Table, e: &toml::de::Error) -> String {
    let key = toml_error_key(e);
    if key != "config" {
        return key;
    }
    let Ok(text) = toml::to_string(value) else {
        return key;
    };
    let Err(again) = toml::from_str::<FileConfig>(&text) else {
        return key;
    };
    let Some(at) = again.span().map(|s| s.start) else {
        return key;
    };
    let before = &text[..at.min(text.len())];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let Some((name, _)) = line.split_once('=') else {
        return key;
    };
    let section = before[..line_start]
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix('[')?.strip_suffix(']'))
        .map(|s| s.trim_matches('[').trim_matches(']').to_string());
    let name = name.trim().trim_matches('"');
    match section {
        Some(sec) => format!("{sec}.{name}"),
        None => name.to_string(),
    }
}

fn apply_override(table: &mut toml::Table, spec: &str) -> Result<(), ConfigError> {
    let bad = |message: String| ConfigError::BadConfig {
        key: "--set".into(),
        message,
    };
    let (path, raw) = spec
        .split_once('=')
        .ok_or_else(|| bad(format!("{spec:?} is not of the form section.key=value")))?;
    let parts: Vec<&str> = path.trim().split('.').collect();
    if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
        return Err(bad(format!(
            "{path:?} must name a section and a key, like train.steps (or a table's key, like train.lr_mult.vision)"
        )));
    }
    let raw = raw.trim();
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    // Every component but the last is a table (created when absent): `train.lr_mult.vision`
    // sets key `vision` of table `lr_mult` of section `train`.
    let (last, tables) = parts.split_last().unwrap_or((&"", &[]));
    let mut t = table;
    for (i, name) in tables.iter().enumerate() {
        let entry = t
            .entry(name.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = match entry {
            toml::Value::Table(t) => t,
            _ => return Err(bad(format!("{} is not a table", parts[..=i].join(".")))),
        };
    }
    t.insert(last.to_string(), value);
    Ok(())
}

/// Checks `train.freeze`, `train.lr_mult` and the LoRA keys against the parts and targets
/// of [`crate::finetune`] (whether a prefix names real parameters is checked by the trainer,
/// which has the model).
fn check_finetune(t: &TrainSection) -> Result<(), ConfigError> {
    use crate::finetune::LORA_TARGETS;
    let bad = |key: &str, message: String| ConfigError::BadConfig {
        key: key.into(),
        message,
    };
    for e in &t.freeze {
        if e.trim().is_empty() || e.starts_with('.') || e.ends_with('.') {
            return Err(bad(
                "train.freeze",
                format!("{e:?} is neither a part (vision, text, multimodal, heads) nor a parameter-name prefix"),
            ));
        }
    }
    for (k, m) in &t.lr_mult {
        if k.trim().is_empty() || k.starts_with('.') || k.ends_with('.') {
            return Err(bad(
                "train.lr_mult",
                format!("{k:?} is neither a part (vision, text, multimodal, heads) nor a parameter-name prefix"),
            ));
        }
        if !(m.is_finite() && *m >= 0.0) {
            return Err(bad(
                "train.lr_mult",
                format!("lr_mult.{k} = {m}: a multiplier must be a finite number ≥ 0"),
            ));
        }
    }
    if t.lora_rank > 0 {
        if !(t.lora_alpha.is_finite() && t.lora_alpha > 0.0) {
            return Err(bad(
                "train.lora_alpha",
                format!("must be a positive number, got {}", t.lora_alpha),
            ));
        }
        if t.lora_targets.is_empty() {
            return Err(bad(
                "train.lora_targets",
                "train.lora_rank > 0 needs at least one target, e.g. [\"attn.q\", \"attn.v\"]"
                    .into(),
            ));
        }
        for target in &t.lora_targets {
            if !LORA_TARGETS.contains(&target.as_str()) {
                return Err(bad(
                    "train.lora_targets",
                    format!(
                        "unknown target {target:?}; the targets are {}",
                        LORA_TARGETS.join(", ")
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(r: Result<JobConfig, ConfigError>) -> String {
        match r {
            Err(ConfigError::BadConfig { key, .. }) => key,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn finetune_keys_parse_from_set_and_refuse_bad_values() {
        let j = JobConfig::parse(
            "",
            &[
                "train.lr_mult.vision=0.1".into(),
                "train.freeze=[\"text\"]".into(),
                "train.lora_rank=4".into(),
            ],
        )
        .unwrap();
        assert_eq!(j.train.lr_mult.get("vision"), Some(&0.1));
        assert_eq!(j.train.freeze, vec!["text".to_string()]);
        assert_eq!(j.train.lora_rank, 4);
        let bad = |o: &str| key_of(JobConfig::parse("", &[o.into()]));
        assert_eq!(bad("train.lr_mult.vision=-1.0"), "train.lr_mult");
        assert_eq!(bad("train.freeze=[\"vision.\"]"), "train.freeze");
        assert_eq!(
            key_of(JobConfig::parse(
                "[train]\nlora_rank = 2\nlora_targets = [\"attn.x\"]",
                &[]
            )),
            "train.lora_targets"
        );
        // A key that is not a table cannot take a sub-key.
        let r = JobConfig::parse("[train]\nsteps = 3", &["train.steps.x=1".into()]);
        assert_eq!(key_of(r), "--set");
    }

    #[test]
    fn defaults_are_valid() {
        let c = JobConfig::parse("", &[]).unwrap();
        assert_eq!(c.model.flavor, "debug");
        assert_eq!(c.micro_batch_size(), 64);
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        assert_eq!(
            key_of(JobConfig::parse("[train]\nstepz = 3\n", &[])),
            "stepz"
        );
        assert_eq!(key_of(JobConfig::parse("[bogus]\nx = 1\n", &[])), "bogus");
        assert_eq!(
            key_of(JobConfig::parse("", &["model.widht=3".into()])),
            "widht"
        );
    }

    #[test]
    fn values_of_the_wrong_kind_are_refused_by_their_key() {
        assert_eq!(
            key_of(JobConfig::parse("[train]\nsteps = \"x\"\n", &[])),
            "train.steps"
        );
        assert_eq!(
            key_of(JobConfig::parse("", &["distill.itc_scale=mine".into()])),
            "distill.itc_scale"
        );
        assert_eq!(
            key_of(JobConfig::parse(
                "[train.lr_mult]\nvision = \"half\"\n",
                &[]
            )),
            "train.lr_mult.vision"
        );
    }

    #[test]
    fn head_dim_keys_default_to_width_over_heads_and_free_the_head_count() {
        let j = JobConfig::parse("", &[]).unwrap();
        let m = &j.model;
        assert_eq!(m.vision_head_dim, None);
        assert_eq!(m.vision_head_size(), m.vision_width / m.vision_heads);
        assert_eq!(m.vision_attn_width(), m.vision_width);
        assert_eq!(m.text_attn_width(), m.text_width);
        assert_eq!(m.attn_pool_width(), m.embed_dim);
        // Three text heads of 16 (48 of the 64-wide stream): allowed once the head width
        // is given, and it round-trips through the saved config.
        let j = JobConfig::parse(
            "[model]\ntext_heads = 3\n",
            &[
                "model.text_head_dim=16".into(),
                "model.vision_head_dim=8".into(),
            ],
        )
        .unwrap();
        assert_eq!(j.model.text_attn_width(), 48);
        assert_eq!(j.model.vision_attn_width(), 32);
        let again = JobConfig::parse(&j.to_toml(), &[]).unwrap();
        assert_eq!(again.model, j.model);
        assert_eq!(
            key_of(JobConfig::parse("[model]\ntext_head_dim = 0\n", &[])),
            "model.text_head_dim"
        );
        assert_eq!(
            key_of(JobConfig::parse("[model]\nvision_heade_dim = 8\n", &[])),
            "vision_heade_dim"
        );
        // Tensor parallelism still splits whole heads, and says which count to change.
        let e = crate::layout::ParallelLayout::new(
            &JobConfig::parse(
                "[model]\ntext_heads = 3\ntext_head_dim = 16\n[parallel]\ntp = 2\n",
                &[],
            )
            .unwrap(),
            2,
        )
        .unwrap_err();
        assert!(e.0.contains("model.text_heads"), "{e}");
    }

    #[test]
    fn impossible_shapes_name_the_key() {
        assert_eq!(
            key_of(JobConfig::parse("[model]\nvision_heads = 3\n", &[])),
            "model.vision_heads"
        );
        assert_eq!(
            key_of(JobConfig::parse("[model]\ntext_heads = 5\n", &[])),
            "model.text_heads"
        );
        assert_eq!(
            key_of(JobConfig::parse("[model]\npatch_size = 5\n", &[])),
            "model.patch_size"
        );
        assert_eq!(
            key_of(JobConfig::parse("[model]\nflavor = \"huge\"\n", &[])),
            "model.flavor"
        );
        assert_eq!(
            key_of(JobConfig::parse(
                "[train]\nglobal_batch = 10\n[parallel]\ndp = 4\n",
                &[]
            )),
            "train.global_batch"
        );
    }

    #[test]
    fn shard_settings_are_checked_by_key() {
        assert_eq!(
            key_of(JobConfig::parse("[data]\nsource = \"shards\"\n", &[])),
            "data.shards"
        );
        let ok = "[data]\nsource = \"shards\"\nshards = \"/d/{0..9}.tar\"\nstreams = 4\n";
        assert!(JobConfig::parse(ok, &[]).is_ok());
        assert_eq!(
            key_of(JobConfig::parse(ok, &["parallel.dp=8".into()])),
            "data.streams"
        );
        assert_eq!(
            key_of(JobConfig::parse(ok, &["train.global_batch=66".into()])),
            "data.streams"
        );
        assert_eq!(
            key_of(JobConfig::parse(ok, &["data.max_bad_fraction=2".into()])),
            "data.max_bad_fraction"
        );
        assert_eq!(
            key_of(JobConfig::parse("[data]\nsource = \"tfrecord\"\n", &[])),
            "data.source"
        );
    }

    #[test]
    fn overrides_apply_and_parse_types() {
        let c = JobConfig::parse(
            "[train]\nsteps = 5\n",
            &[
                "train.steps=7".into(),
                "model.fusion=prefix".into(),
                "train.lr=0.5".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.train.steps, 7);
        assert_eq!(c.model.fusion, Fusion::Prefix);
        assert_eq!(c.train.lr, 0.5);
        assert_eq!(key_of(JobConfig::parse("", &["steps=3".into()])), "--set");
    }

    #[test]
    fn objective_keys_are_checked() {
        let c = JobConfig::parse("", &[]).unwrap();
        assert_eq!(
            (c.train.mlm_weight, c.train.mlm_rate, c.train.vqa_weight),
            (0.0, 0.15, 0.0)
        );
        for (set, key) in [
            ("train.mlm_rate=0", "train.mlm_rate"),
            ("train.mlm_rate=1", "train.mlm_rate"),
            ("train.mlm_weight=-1", "train.mlm_weight"),
            ("train.vqa_weight=-0.5", "train.vqa_weight"),
        ] {
            assert_eq!(key_of(JobConfig::parse("", &[set.into()])), key, "{set}");
        }
        // CLIP has no decoder to predict tokens with.
        let clip = "[model]\nflavor = \"openclip-clip-b32\"\n[train]\nitm_weight = 0\ncaption_weight = 0\n";
        assert_eq!(
            key_of(JobConfig::parse(clip, &["train.mlm_weight=1".into()])),
            "train.mlm_weight"
        );
        // VQA from shards reads the questions from the fields named.
        let shards = "[data]\nsource = \"shards\"\nshards = \"x/{0..1}.tar\"\n";
        let c = JobConfig::parse(shards, &["train.vqa_weight=1".into()]).unwrap();
        assert_eq!(
            (c.data.question_field.as_str(), c.data.answer_field.as_str()),
            ("question", "answer")
        );
        assert_eq!(
            key_of(JobConfig::parse(
                shards,
                &[
                    "train.vqa_weight=1".into(),
                    "data.answer_field=\" \"".into()
                ]
            )),
            "data.answer_field"
        );
        assert!(JobConfig::parse(shards, &["train.mlm_weight=1".into()]).is_ok());
    }

    #[test]
    fn open_clip_flavors_need_their_loss_weights() {
        assert_eq!(
            key_of(JobConfig::parse(
                "[model]\nflavor = \"openclip-clip-b32\"\n[train]\nitm_weight = 0\n",
                &[]
            )),
            "train.caption_weight"
        );
        assert_eq!(
            key_of(JobConfig::parse(
                "[model]\nflavor = \"openclip-coca-b32\"\n",
                &[]
            )),
            "train.itm_weight"
        );
        let c = JobConfig::parse(
            "[model]\nflavor = \"openclip-coca-l14\"\n[train]\nitm_weight = 0\n",
            &["model.init_from=\"ckpt/x\"".into()],
        )
        .unwrap();
        assert_eq!(c.model.init_from.as_deref(), Some("ckpt/x"));
        assert_eq!(c.model.memory_len(), 255);
        assert_eq!(
            key_of(JobConfig::parse(
                "[model]\nvision_pool = \"class_token\"\n",
                &[]
            )),
            "model.vision_pool"
        );
        assert_eq!(
            key_of(JobConfig::parse(
                "[model]\ntext_pad_mask = \"open_clip_legacy\"\n",
                &[]
            )),
            "model.text_pad_mask"
        );
    }

    #[test]
    fn memory_features_the_trainer_lacks_are_refused_by_key() {
        for (set, key) in [
            ("parallel.recompute=\"full\"", "parallel.recompute"),
            ("parallel.recompute=\"selective\"", "parallel.recompute"),
            ("parallel.shard_optimizer=true", "parallel.shard_optimizer"),
            (
                "parallel.sequence_parallel=true",
                "parallel.sequence_parallel",
            ),
        ] {
            let r = JobConfig::parse("", &[set.into()]);
            let available = match key {
                "parallel.shard_optimizer" => Features::TRAINER.shard_optimizer,
                "parallel.sequence_parallel" => Features::TRAINER.sequence_parallel,
                _ => Features::TRAINER.recompute_full && Features::TRAINER.recompute_selective,
            };
            if !available {
                assert_eq!(key_of(r), key);
            }
        }
        assert!(JobConfig::parse("", &["parallel.recompute=\"none\"".into()]).is_ok());
        // The distributed optimizer is implemented (issue 12 item 2).
        assert!(JobConfig::parse("", &["parallel.shard_optimizer=true".into()]).is_ok());
        // Sequence parallelism is implemented (issue 12 item 3); it needs a TP group.
        assert_eq!(
            key_of(JobConfig::parse(
                "",
                &["parallel.sequence_parallel=true".into()]
            )),
            "parallel.sequence_parallel"
        );
        assert!(JobConfig::parse(
            "",
            &[
                "parallel.sequence_parallel=true".into(),
                "parallel.tp=2".into()
            ]
        )
        .is_ok());
        assert_eq!(
            key_of(JobConfig::parse(
                "",
                &["parallel.recompute=\"most\"".into()]
            )),
            "parallel.recompute"
        );
    }

    #[test]
    fn one_b_is_about_a_billion() {
        let c = ModelConfig::flavor("1b").unwrap();
        let n = c.num_params() as f64;
        assert!((0.9e9..1.15e9).contains(&n), "{n}");
    }
}
