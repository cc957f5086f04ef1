//! weaver's training process: the step loop ([`train`]), AdamW with f32 master weights and
//! the learning-rate schedule ([`optim`]), held-out evaluation ([`eval`]) and the run
//! directory's metrics ([`metrics`]).

pub mod agent;
pub mod ckpt;
pub mod error;
pub mod eval;
pub mod metrics;
pub mod optim;
pub mod parallel;
pub mod shim;
pub mod train;

pub use error::WorkerError;
pub use train::Trainer;
