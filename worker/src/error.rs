//! The one error type of the worker crate.

use std::path::Path;

/// What stopped a training process.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// The model, config or data failed.
    #[error(transparent)]
    Model(#[from] weaver_models::ModelError),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Torch(#[from] tch::TchError),
    /// The training data (shards, decoding, the data position) failed.
    #[error(transparent)]
    Data(#[from] weaver_data::DataError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The loss stopped being a number.
    #[error("loss is {loss} at step {step}: training diverged; lower train.lr or raise train.warmup_steps")]
    Diverged {
        /// The step.
        step: u64,
        /// The value seen.
        loss: f64,
    },
    /// A collective or pipeline transfer failed (a lost peer, a timeout, an abort).
    #[error("communication failed: {0}")]
    Comm(String),
    /// The parallel layout does not fit the model or the process count.
    #[error("{0}")]
    Layout(String),
    /// The coordinator cannot be reached (it died, or the network to it is down).
    #[error(
        "lost the coordinator ({0}); this worker stops. Checkpoints committed before are \
         intact: start the coordinator again with --resume latest, then the workers"
    )]
    CoordinatorLost(String),
    /// Saving or loading a checkpoint failed.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// Anything else, described.
    #[error("{0}")]
    Other(String),
    /// A fine-tuning key (`train.freeze`, `train.lr_mult`, `train.lora_*`) that does not fit
    /// the model.
    #[error("train.{key}: {message}")]
    Finetune {
        /// The key under `[train]`.
        key: &'static str,
        /// What is wrong and what to change.
        message: String,
    },
}

/// A config error (from `weaver-config`) is a model error, as it was before the config
/// moved out of the model crate: `JobConfig::parse(..)?` keeps working in this crate.
impl From<weaver_models::ConfigError> for WorkerError {
    fn from(e: weaver_models::ConfigError) -> Self {
        WorkerError::Model(e.into())
    }
}

impl WorkerError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> WorkerError {
        WorkerError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}
