//! weaver-launch: how a job's processes get started.
//!
//! - [`local`]: `weaver launch` — the coordinator in-process plus N local workers
//!   (torchrun's standalone mode), with exit watching, respawn and a progress bar.
//! - [`cluster`]: `weaver coordinator` (serve one job), `weaver status`, `weaver ckpt save`
//!   and shutdown against a running coordinator.
//! - [`env`]: the environment contract between every launcher and `weaver worker`.
//! - `launch/scripts/`: SLURM (`slurm.sbatch`), SSH (`ssh.sh`) and Kubernetes (`k8s.yaml`)
//!   for clusters, each running `weaver coordinator` once and `weaver worker` per device.

pub mod cluster;
pub mod env;
pub mod local;
pub mod progress;

pub use cluster::{request_checkpoint, serve_coordinator, shutdown, status};
pub use env::{resolve_token, WorkerEnv};
pub use local::{describe_exit, launch, launch_async, LaunchOptions, LaunchReport};
pub use progress::ProgressMode;

/// What went wrong while launching.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LaunchError {
    /// The options cannot work; the message says what to change.
    #[error("bad launch options: {0}")]
    BadOptions(String),
    /// A worker process could not be started.
    #[error("cannot start {command}: {message}")]
    Spawn {
        /// The program.
        command: String,
        /// The OS error.
        message: String,
    },
    /// The coordinator refused or failed.
    #[error(transparent)]
    Coordinator(#[from] weaver_coordinator::CoordinatorError),
    /// Another I/O failure.
    #[error("{0}")]
    Io(String),
}
