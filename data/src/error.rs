//! The crate's one error type. Every variant names what the user must look at: the config
//! key, the shard (URL) and, where there is one, the sample key.

/// Everything that can go wrong while listing, reading, decoding or batching training data.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A `[data]` setting (or one it depends on) is unusable.
    #[error("bad config {key}: {message}")]
    BadConfig {
        /// The key to fix, e.g. `data.shards`.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A shard pattern, list file or folder named no shards.
    #[error("{key} = {spec:?} names no shards: {message}")]
    NoShards {
        /// `data.shards` or `data.eval_shards`.
        key: String,
        /// The value as given.
        spec: String,
        /// Why (empty folder, empty list file, ...).
        message: String,
    },
    /// A shard (or a list file, folder, caption file) could not be read.
    #[error("{url}: {message}")]
    Read {
        /// The object.
        url: String,
        /// What the store or the file system said.
        message: String,
    },
    /// A shard stalled: no bytes arrived within the timeout.
    #[error("{url}: no data for {secs} s (data.timeout_s); the store is unreachable or stalled")]
    Timeout {
        /// The shard.
        url: String,
        /// The timeout.
        secs: u64,
    },
    /// A stream found no readable shard in a whole pass over its shards.
    #[error(
        "stream {stream}: none of its last {tried} shards could be read (last: {last}); check \
         data.shards and the store's credentials"
    )]
    NoReadableShards {
        /// The logical stream.
        stream: usize,
        /// Shards tried in a row.
        tried: u64,
        /// The last failure.
        last: String,
    },
    /// More samples were bad than `data.max_bad_fraction` allows.
    #[error(
        "{bad} of {seen} samples were bad ({:.1}% > data.max_bad_fraction = {:.1}%); worst shards: {}",
        100.0 * *.bad as f64 / (*.seen).max(1) as f64,
        100.0 * .limit,
        worst_list(.worst)
    )]
    TooManyBad {
        /// Bad samples seen by this rank.
        bad: u64,
        /// Samples examined by this rank.
        seen: u64,
        /// `data.max_bad_fraction`.
        limit: f64,
        /// The shards with the most bad samples: (URL, bad, examined), worst first.
        worst: Vec<(String, u64, u64)>,
    },
    /// A checkpointed data position cannot be used.
    #[error("data position {piece}: {message}")]
    BadPosition {
        /// The checkpoint piece.
        piece: String,
        /// What is wrong with it.
        message: String,
    },
    /// A background thread of the loader is gone (it failed, or panicked).
    #[error("data loader: {0}")]
    Loader(String),
    /// The caption file given to `weaver data pack` is malformed.
    #[error("{path}:{line}: {message}")]
    Captions {
        /// The caption file.
        path: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The tokenizer (loading or encoding).
    #[error(transparent)]
    Model(#[from] weaver_models::ModelError),
    /// libtorch (building the batch tensors).
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    /// Local I/O.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn worst_list(worst: &[(String, u64, u64)]) -> String {
    worst
        .iter()
        .map(|(url, bad, seen)| format!("{url} ({bad} bad of {seen})"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl DataError {
    pub(crate) fn io(path: impl std::fmt::Display, source: std::io::Error) -> DataError {
        DataError::Io {
            path: path.to_string(),
            source,
        }
    }

    pub(crate) fn config(key: &str, message: impl Into<String>) -> DataError {
        DataError::BadConfig {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// The crate's result.
pub type Result<T, E = DataError> = std::result::Result<T, E>;
