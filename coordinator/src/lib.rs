//! weaver's coordinator (DESIGN.md, "Coordinator"): the gRPC service that gathers a job's
//! workers, places them on the (dp, pp, tp) mesh, hands out assignments, keeps the
//! rendezvous store, watches heartbeats, restarts the job in a new generation when a
//! worker is lost, commits checkpoints and writes `metrics.jsonl` — and the worker-side
//! client library a training process uses to talk to it.
//!
//! - [`job`]: the state machine (pure, unit- and property-tested).
//! - [`placement`](crate::placement): ranks on hosts, TP groups inside one host.
//! - [`server`]: [`Coordinator`], serving on a bound listener with a shutdown future.
//! - [`client`]: the async [`CoordinatorClient`]; [`session`]: the blocking
//!   [`WorkerSession`] for training processes and its [`GrpcStore`] rendezvous store.
//! - [`token`]: the job token; [`status`]: the operator's table.
//!
//! The protocol is `proto/weaver.proto`, compiled into [`pb`].

pub mod client;
pub mod error;
pub mod job;
mod kv;
pub mod metrics;
mod placement;
pub mod server;
pub mod session;
pub mod status;
pub mod token;
pub mod types;

/// The generated protocol types and gRPC stubs of `proto/weaver.proto`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod pb {
    tonic::include_proto!("weaver.v1");
}

pub use client::{normalize_url, ClientTls, CoordinatorClient};
pub use error::CoordinatorError;
pub use job::{default_limits, even_stages, Phase, Policy, ResumePoint, StagePlanner};
pub use kv::{MAX_KEY_LEN, MAX_VALUE_LEN};
pub use metrics::METRICS_FILE;
pub use server::{CheckpointCommitter, Coordinator, CoordinatorOptions, TlsIdentity};
pub use session::{EventHook, GrpcStore, Registration, SessionOptions, WorkerSession};
pub use status::render_status;
pub use token::{JobToken, TOKEN_ENV};
pub use types::{Assignment, ControlEvent, JobOutcome, StepMetrics, WorkerInfo};
