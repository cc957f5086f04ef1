//! The crate's one error type. Every variant names the object (file) or tensor it is about,
//! so that a message alone says what to look at.

use std::fmt;

/// Everything that can go wrong while saving, committing, opening or reading a checkpoint.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The checkpoint URL could not be understood or its store could not be built.
    #[error("bad checkpoint URL {url:?}: {message}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        message: String,
    },
    /// A URL that names a store's scheme but no location in it (`s3://`, `s3:/bucket/run`,
    /// `gs://`, `file:relative`): refused, never taken for a local folder.
    #[error(
        "URL {url:?} names a {scheme} store but is malformed: {reason}; write {expected} \
         (a folder whose name has a colon is written ./NAME)"
    )]
    MalformedUrl {
        /// The URL as given.
        url: String,
        /// The scheme it names (lower case).
        scheme: String,
        /// What is wrong.
        reason: String,
        /// The form it must have.
        expected: String,
    },
    /// A new run (no `--resume`) would write its checkpoints where another run's committed
    /// checkpoints are: it would fail at its first commit, or mix two runs' steps.
    #[error(
        "{url} already holds committed checkpoints (the newest is step {step}); continue \
         that run with --resume latest, or give this run another checkpoint URL \
         (--set checkpoint.url=...)"
    )]
    UrlTaken {
        /// The checkpoint URL.
        url: String,
        /// The newest step with a manifest.
        step: u64,
    },
    /// The object store failed (network, permissions, local I/O).
    #[error("{object}: {source}")]
    Store {
        /// The object (or prefix) the request was about.
        object: String,
        /// What the store said.
        #[source]
        source: object_store::Error,
    },
    /// The store ran out of space: a full disk, a quota, a file-size limit.
    #[error(
        "{object}: the checkpoint store is full ({source}); free space there or lower \
         checkpoint.keep (committed checkpoints are untouched)"
    )]
    NoSpace {
        /// The object being written.
        object: String,
        /// What the store said.
        #[source]
        source: object_store::Error,
    },
    /// An object the manifest (or a report) names does not exist.
    #[error("{object}: object is missing")]
    MissingObject {
        /// The missing object.
        object: String,
    },
    /// The checkpoint has no (readable) `MANIFEST.json`: it was never committed, or the
    /// manifest was lost. A checkpoint without a manifest does not exist.
    #[error("no checkpoint at {url}: {reason}")]
    NoManifest {
        /// The checkpoint directory.
        url: String,
        /// Why (missing, unreadable).
        reason: String,
    },
    /// No complete checkpoint was found under a checkpoint URL.
    #[error("no complete checkpoint under {url}{}", skipped_list(.skipped))]
    NoCheckpoint {
        /// The checkpoint URL searched.
        url: String,
        /// Why each candidate was passed over, newest first.
        skipped: Vec<String>,
    },
    /// Stored bytes do not match their checksum.
    #[error("{object}: tensor {tensor} is corrupt: {detail}")]
    Corrupt {
        /// The shard file holding the bad bytes.
        object: String,
        /// The tensor whose bytes are bad.
        tensor: String,
        /// Which bytes, expected and found checksums.
        detail: String,
    },
    /// An object is shorter (or longer) than the manifest says.
    #[error("{object} is truncated or resized: expected {expected} bytes, found {actual}")]
    Truncated {
        /// The object.
        object: String,
        /// Size recorded in the manifest.
        expected: u64,
        /// Size found in the store (or bytes a read returned).
        actual: u64,
    },
    /// A manifest that cannot be parsed or is inconsistent.
    #[error("{object}: bad manifest: {message}")]
    BadManifest {
        /// The manifest object.
        object: String,
        /// What is wrong.
        message: String,
    },
    /// A shard file whose safetensors header cannot be parsed or disagrees with the manifest.
    #[error("{object}: bad shard: {message}")]
    BadShard {
        /// The shard object.
        object: String,
        /// What is wrong.
        message: String,
    },
    /// The step was committed already: a second create-only put of its manifest was refused.
    #[error("{object} exists: step {step} is already committed")]
    AlreadyCommitted {
        /// The manifest object.
        object: String,
        /// The step.
        step: u64,
    },
    /// Pieces that do not form a valid layout: overlap, gaps, shape or dtype disagreement,
    /// reports for another step.
    #[error("checkpoint layout: {0}")]
    Layout(String),
    /// A tensor handed to the writer that it cannot save.
    #[error("tensor {tensor}: {message}")]
    BadTensor {
        /// The tensor name.
        tensor: String,
        /// What is wrong (device, dtype, shape).
        message: String,
    },
    /// The checkpoint has no tensor of that name.
    #[error("{object}: no tensor named {tensor}")]
    UnknownTensor {
        /// The manifest searched.
        object: String,
        /// The name asked for.
        tensor: String,
    },
    /// A requested slice does not fit the tensor.
    #[error("bad slice of tensor {tensor}: {message}")]
    BadSlice {
        /// The tensor name.
        tensor: String,
        /// What is wrong.
        message: String,
    },
    /// libtorch failed on a tensor operation.
    #[error("tensor {tensor}: {source}")]
    Torch {
        /// The tensor name.
        tensor: String,
        /// libtorch's error.
        #[source]
        source: tch::TchError,
    },
    /// Local file I/O outside the object store (export).
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A background upload ended without a result (its task panicked or was cancelled).
    #[error("background upload of {object} failed: {message}")]
    Background {
        /// The shard being uploaded.
        object: String,
        /// What happened.
        message: String,
    },
    /// A blocking helper was called on a thread that runs an async runtime; await the async
    /// function instead.
    #[error("cannot block on checkpoint I/O inside an async runtime: await the async API instead")]
    BlockingInAsync,
}

fn skipped_list(skipped: &[String]) -> SkippedList<'_> {
    SkippedList(skipped)
}

struct SkippedList<'a>(&'a [String]);

impl fmt::Display for SkippedList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return write!(f, " (no committed step found)");
        }
        write!(f, "; passed over:")?;
        for s in self.0 {
            write!(f, "\n  - {s}")?;
        }
        Ok(())
    }
}

/// The crate's result type.
pub type Result<T, E = CheckpointError> = std::result::Result<T, E>;
