//! The one error type of the compression crate.

/// What went wrong while quantizing, pruning or loading a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CompressError {
    /// An option or configuration value is wrong; `key` names it (a CLI flag or
    /// `section.key`).
    #[error("bad option `{key}`: {message}")]
    BadOption {
        /// The flag or key to fix.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The checkpoint does not fit what was asked of it (no config, a tensor missing or of
    /// the wrong shape or dtype, already quantized).
    #[error("checkpoint {url}: {message}")]
    BadCheckpoint {
        /// The checkpoint.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// Reading the held-out data of the calibration pass failed (the shards and the fix
    /// are in the message).
    #[error("held-out data for calibration: {0}")]
    Heldout(String),
    /// Reading or writing the checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] weaver_checkpoint::CheckpointError),
    /// Building or running the model failed.
    #[error(transparent)]
    Model(#[from] weaver_models::ModelError),
    /// A tensor operation failed inside libtorch.
    #[error("tensor operation failed: {0}")]
    Torch(#[from] tch::TchError),
}

impl From<weaver_models::ConfigError> for CompressError {
    fn from(e: weaver_models::ConfigError) -> Self {
        CompressError::Model(e.into())
    }
}

/// Result with [`CompressError`].
pub type Result<T, E = CompressError> = std::result::Result<T, E>;
