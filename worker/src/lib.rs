//! weaver's training process: the rank's step loop and its parts ([`parallel`]: the
//! composition; [`schedule`], [`grads`], [`optim`], [`data`], [`ckpt`], [`control`]), the
//! global contrastive batch ([`contrastive`]), the single-process reference trainer ([`train`]), held-out evaluation ([`eval`]), held-out shards read outside training ([`heldout`]), the run
//! directory's metrics ([`metrics`]), each rank's peak memory ([`memory`]), the counted host reads ([`sync`]), the C++ shim
//! ([`shim`]), initial weights from a checkpoint ([`init`]), linear probes ([`probe`]) and
//! the fine-tuning controls: freezing, lr multipliers, LoRA ([`finetune`]), and
//! distillation from a frozen teacher ([`distill`]); fine-tuning a pruned model with its
//! mask kept ([`prune_mask`]).

pub mod agent;
pub mod buckets;
pub mod ckpt;
pub mod contrastive;
pub mod control;
pub mod data;
pub mod decode;
pub mod distill;
pub mod error;
pub mod eval;
pub mod finetune;
pub mod grads;
pub mod heldout;
pub mod infer;
pub mod init;
pub mod memory;
pub mod metrics;
pub mod optim;
pub mod parallel;
pub mod probe;
pub mod prune_mask;
pub mod schedule;
pub mod shim;
pub mod sync;
pub mod train;

pub use error::WorkerError;
pub use train::Trainer;
