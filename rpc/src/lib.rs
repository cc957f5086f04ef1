//! The coordinator's protocol and the worker-side client library (DESIGN.md,
//! "Coordinator"): what a training process links to talk to the coordinator, without the
//! server and without libtorch. The server is `weaver-coordinator`, which re-exports all of
//! this (`weaver_coordinator::{WorkerSession, pb, …}` are these items).
//!
//! - [`client`]: the async [`CoordinatorClient`]; [`session`]: the blocking
//!   [`WorkerSession`] for training processes and its [`GrpcStore`] rendezvous store.
//! - [`types`]: [`Assignment`], [`ControlEvent`], [`StepMetrics`], [`WorkerInfo`],
//!   [`JobOutcome`] and the [`CheckpointCommitter`] a trainer hands the coordinator.
//! - [`token`]: the job token; [`error`]: [`CoordinatorError`], shared with the server and
//!   carried across the wire.
//!
//! The protocol is `proto/weaver.proto`, compiled into [`pb`].

pub mod client;
pub mod error;
pub mod session;
pub mod token;
pub mod types;

/// The generated protocol types and gRPC stubs of `proto/weaver.proto`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod pb {
    tonic::include_proto!("weaver.v1");
}

pub use client::{normalize_url, ClientTls, CoordinatorClient, MAX_WAIT};
pub use error::CoordinatorError;
pub use session::{EventHook, GrpcStore, Registration, SessionOptions, WorkerSession};
pub use token::{JobToken, TOKEN_ENV};
pub use types::{
    Assignment, CheckpointCommitter, ControlEvent, JobOutcome, ShardStats, StepMetrics, WorkerInfo,
};
