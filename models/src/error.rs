//! The one error type of the models crate.

/// What went wrong while configuring, building or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A configuration value is wrong; `key` names it (`section.key`, or the unknown key).
    #[error("bad config `{key}`: {message}")]
    BadConfig {
        /// The key to fix.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A tensor operation failed inside libtorch.
    #[error("tensor operation failed in {op}: {source}")]
    Torch {
        /// What the model was doing.
        op: &'static str,
        /// libtorch's error.
        #[source]
        source: tch::TchError,
    },
    /// A tokenizer could not be loaded or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A tensor-parallel collective failed.
    #[error("parallel: {0}")]
    Parallel(String),
    /// A sample cannot serve an objective (a question and answer that do not fit the
    /// text length, a batch missing the rows its objectives need).
    #[error("data: {0}")]
    Data(String),
    /// Parameters do not match what the model expects.
    #[error("parameter mismatch: {0}")]
    ParamMismatch(String),
    /// Another configuration error of `weaver-config` (its `BadConfig` becomes
    /// [`ModelError::BadConfig`]).
    #[error(transparent)]
    Config(weaver_config::ConfigError),
}

impl From<weaver_config::ConfigError> for ModelError {
    fn from(e: weaver_config::ConfigError) -> Self {
        match e {
            weaver_config::ConfigError::BadConfig { key, message } => {
                ModelError::BadConfig { key, message }
            }
            other => ModelError::Config(other),
        }
    }
}

impl From<tch::TchError> for ModelError {
    fn from(source: tch::TchError) -> Self {
        ModelError::Torch {
            op: "model",
            source,
        }
    }
}

/// Result with [`ModelError`].
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
