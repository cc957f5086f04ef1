//! `[infer]`: sharded batch inference (`weaver infer`, or any job whose config sets
//! `infer.checkpoint`): embeddings or captions of every input sample (`[data]`: the shards,
//! or synthetic "shards"), written to object storage, one output object and one progress
//! marker per input shard.

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// What an inference job computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum InferTask {
    /// Normalised image and text embeddings (the contrastive ones), as safetensors.
    #[default]
    Embed,
    /// Generated captions (greedy or beam search with the key/value cache), as JSONL.
    Caption,
}

impl InferTask {
    /// The name used in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            InferTask::Embed => "embed",
            InferTask::Caption => "caption",
        }
    }
}

/// `[infer]`. Empty `checkpoint`: the job trains (this section is ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferSection {
    /// The weights to run: a checkpoint URL (a step directory, or a root for its latest
    /// committed step), float or INT8 (`weaver ckpt quantize`). Non-empty makes the job an
    /// inference job.
    pub checkpoint: String,
    /// `embed` or `caption`.
    pub task: InferTask,
    /// Where the outputs and progress markers go (local path, file://, s3://, gs://, az://).
    pub out: String,
    /// Samples per forward (per data-parallel replica).
    pub batch: usize,
    /// With `data.source = "synthetic"`: how many synthetic input shards ...
    pub synthetic_shards: usize,
    /// ... of how many samples each (held-out split, consecutive indices).
    pub shard_size: usize,
    /// Captions: beams per image (1: greedy decoding).
    pub beam: usize,
    /// Captions: most tokens generated after BOS (0: as many as `model.max_text_len` allows).
    pub max_new_tokens: usize,
    /// Captions: beam search's length penalty (`log p / len^penalty`).
    pub length_penalty: f64,
    /// Captions: the stop token: `"eos"` (the tokenizer's), `"none"` (always
    /// `max_new_tokens` tokens) or a token id.
    pub stop: String,
}

impl Default for InferSection {
    fn default() -> Self {
        InferSection {
            checkpoint: String::new(),
            task: InferTask::Embed,
            out: String::new(),
            batch: 32,
            synthetic_shards: 4,
            shard_size: 64,
            beam: 1,
            max_new_tokens: 0,
            length_penalty: 0.0,
            stop: "eos".into(),
        }
    }
}

/// The stop token `[infer] stop` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopToken {
    /// The tokenizer's EOS.
    Eos,
    /// None: generate exactly `max_new_tokens`.
    None,
    /// This token id.
    Id(i64),
}

impl InferSection {
    /// Whether the job is an inference job.
    pub fn enabled(&self) -> bool {
        !self.checkpoint.trim().is_empty()
    }

    /// The parsed `stop`.
    pub fn stop_token(&self) -> Result<StopToken, ConfigError> {
        match self.stop.trim() {
            "eos" => Ok(StopToken::Eos),
            "none" => Ok(StopToken::None),
            s => s
                .parse::<i64>()
                .ok()
                .filter(|&id| id >= 0)
                .map(StopToken::Id)
                .ok_or_else(|| ConfigError::BadConfig {
                    key: "infer.stop".into(),
                    message: format!("{s:?} is not \"eos\", \"none\" or a token id"),
                }),
        }
    }

    /// Checks the section (only when the job is an inference job).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled() {
            return Ok(());
        }
        let bad = |key: &str, message: &str| ConfigError::BadConfig {
            key: key.into(),
            message: message.into(),
        };
        if self.out.trim().is_empty() {
            return Err(bad(
                "infer.out",
                "an inference job needs an output location (a path or a store URL)",
            ));
        }
        if self.batch == 0 {
            return Err(bad("infer.batch", "must be at least 1"));
        }
        if self.synthetic_shards == 0 || self.shard_size == 0 {
            return Err(bad(
                "infer.synthetic_shards",
                "infer.synthetic_shards and infer.shard_size must be at least 1",
            ));
        }
        if self.beam == 0 {
            return Err(bad(
                "infer.beam",
                "must be at least 1 (1 is greedy decoding)",
            ));
        }
        if !(self.length_penalty.is_finite() && self.length_penalty >= 0.0) {
            return Err(bad("infer.length_penalty", "must be a finite number ≥ 0"));
        }
        self.stop_token()?;
        Ok(())
    }
}
