//! The one error type of the config crate.

/// What is wrong with a job configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A configuration value is wrong; `key` names it (`section.key`, or the unknown key).
    #[error("bad config `{key}`: {message}")]
    BadConfig {
        /// The key to fix.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

/// Result with [`ConfigError`].
pub type Result<T, E = ConfigError> = std::result::Result<T, E>;
