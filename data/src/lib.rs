//! weaver-data: the training data. WebDataset tar shards streamed from object storage, a
//! sample order that resumes exactly on any data-parallel layout, a pool of threads that
//! decodes, crops, normalises and tokenises ahead of the step, and the sources the trainer
//! draws its step batches from (shards, or the synthetic dataset of `weaver-models`).
//!
//! | module | owns |
//! |---|---|
//! | [`shards`] | shard lists (brace patterns, list files, folders), stores, streaming reads with retries |
//! | [`tar`] | a streaming tar reader (offsets, resynchronisation) and writer |
//! | [`sample`] | grouping members into samples by key; image and caption fields |
//! | [`image`] | JPEG/PNG/WebP decoding, centre and random-resized crops, CLIP normalisation |
//! | [`order`] | the layout-independent order: epochs, streams, windows, positions |
//! | [`loader`] | readers → decoding pool → step builder, bad-data accounting |
//! | [`source`] | [`BatchSource`]: the one call per step the trainer makes; prefetch, pinned memory |
//! | [`pack`] | `weaver data pack` and `weaver data inspect` |

pub mod error;
pub mod image;
pub mod loader;
pub mod order;
pub mod pack;
pub mod sample;
pub mod shards;
pub mod source;
pub mod tar;

pub use error::{DataError, Result};
pub use loader::{DataStats, DpRank, LoaderConfig, ShardLoader};
pub use order::{Order, StreamPosition};
pub use source::{BatchSource, RankPlace, ShardSource, StepData, SyntheticSource};
