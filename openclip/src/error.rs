//! The one error type of the open_clip interop crate.

/// What went wrong reading, converting or writing open_clip weights.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InteropError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A `.pt`/`.bin` file that is not a torch.save zip archive (torch < 1.6's legacy
    /// format, or not PyTorch at all).
    #[error("{path} is not a torch.save zip archive (the legacy pre-1.6 format is not read): re-save it with torch.save in PyTorch ≥ 1.6, or convert it to .safetensors")]
    NotTorchZip {
        /// The file.
        path: String,
    },
    /// The zip archive is malformed.
    #[error("{path}: {message}")]
    Zip {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The pickle inside the archive is malformed or uses something a state dict does not.
    #[error("{path}: data.pkl at byte {offset}: {message}")]
    Pickle {
        /// The file.
        path: String,
        /// Where in data.pkl.
        offset: usize,
        /// What is wrong.
        message: String,
    },
    /// The file holds no `name → tensor` dict.
    #[error("{path} holds no state dict (found {found}); save model.state_dict()")]
    NoStateDict {
        /// The file.
        path: String,
        /// What it holds instead.
        found: String,
    },
    /// A tensor's description does not fit its storage.
    #[error("{path}: tensor {name}: {message}")]
    BadTensor {
        /// The file.
        path: String,
        /// The tensor.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// An architecture weaver has no flavor for.
    #[error("unknown open_clip architecture {arch:?}; weaver maps {known}")]
    UnknownArch {
        /// What was asked for.
        arch: String,
        /// The supported ones.
        known: String,
    },
    /// The state dict lacks a tensor the architecture has.
    #[error("the state dict has no {key}, which open_clip's {arch} has: is --arch right?")]
    MissingKey {
        /// The open_clip name.
        key: String,
        /// The architecture.
        arch: String,
    },
    /// The state dict has tensors the architecture does not.
    #[error("the state dict has {count} tensors that {arch} does not (e.g. {example}): is --arch right?")]
    UnexpectedKeys {
        /// How many.
        count: usize,
        /// One of them.
        example: String,
        /// The architecture.
        arch: String,
    },
    /// A tensor has another shape than the architecture's.
    #[error("{key}: shape {got:?}, but {arch} has {expected:?}")]
    ShapeMismatch {
        /// The name.
        key: String,
        /// The architecture's shape.
        expected: Vec<i64>,
        /// The file's.
        got: Vec<i64>,
        /// The architecture.
        arch: String,
    },
    /// A weaver model that open_clip cannot represent.
    #[error("open_clip has no equivalent of model.{option} = {value}: {hint}")]
    NotOpenClip {
        /// The `[model]` key.
        option: String,
        /// Its value.
        value: String,
        /// What to do.
        hint: String,
    },
    /// A checkpoint operation failed.
    #[error(transparent)]
    Checkpoint(#[from] weaver_checkpoint::CheckpointError),
    /// The model or its config.
    #[error(transparent)]
    Model(#[from] weaver_models::ModelError),
    /// The job configuration is invalid.
    #[error(transparent)]
    Config(#[from] weaver_models::ConfigError),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Torch(#[from] tch::TchError),
}

/// Result with [`InteropError`].
pub type Result<T, E = InteropError> = std::result::Result<T, E>;
