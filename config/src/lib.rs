//! weaver's job configuration and the parallel layout, with no libtorch and no async
//! runtime: what the control plane (coordinator, launcher) shares with the trainer.
//!
//! - [`config`]: the TOML file ([`FileConfig`](config::FileConfig)), `--set` overrides,
//!   validation, the flavors' dimensions and the FLOP formulas ([`JobConfig`],
//!   [`ModelConfig`]).
//! - [`layers`]: the model's cuttable layers, their costs and the layout's limits.
//! - [`mesh`]: the 3-D layout ([`ParallelDims`](mesh::ParallelDims)), ranks and groups.
//! - [`pp`]: pipeline parallelism as data: the stage partition and the schedules.
//! - [`layout`]: the whole layout a job asks for, validated once (mesh, schedule, stages):
//!   what the trainer builds, the coordinator assigns and the planner searches.
//! - [`store`]: the rendezvous store trait.
//! - [`device`]: the `train.device` string.
//! - [`distill`]: `[distill]`, a frozen teacher's checkpoint and the distillation losses' weights.
//! - [`finetune`]: the model's parts (`train.freeze`, `train.lr_mult`) and LoRA targets.
//!
//! `weaver_models` re-exports [`config`] and `weaver_parallel` re-exports [`mesh`], [`pp`]
//! and [`store`], so their old paths keep working.

pub mod config;
pub mod device;
pub mod distill;
pub mod error;
pub mod finetune;
pub mod infer;
pub mod layers;
pub mod layout;
pub mod mesh;
pub mod pp;
pub mod store;

pub use config::{Fusion, JobConfig, ModelConfig};
pub use error::ConfigError;
pub use layers::{ActField, LayerKind, LayerParams};
