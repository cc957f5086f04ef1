//! weaver's coordinator (DESIGN.md, "Coordinator"): the gRPC service that gathers a job's
//! workers, places them on the (dp, pp, tp) mesh, hands out assignments, keeps the
//! rendezvous store, watches heartbeats, restarts the job in a new generation when a
//! worker is lost, commits checkpoints and writes `metrics.jsonl`.
//!
//! - [`job`]: the state machine (pure, unit- and property-tested).
//! - [`placement`](crate::placement): ranks on hosts, TP groups inside one host.
//! - [`server`]: [`Coordinator`], serving on a bound listener with a shutdown future.
//! - [`prometheus`]: the job's metrics for Prometheus (`--metrics-listen`).
//! - [`status`]: the operator's table.
//!
//! The protocol ([`pb`]), the client, the worker session, the shared types and the token
//! live in `weaver-rpc`, which training processes link without this server; they are
//! re-exported here, so `weaver_coordinator::{WorkerSession, pb, client, session, …}`
//! name the same items. The job config comes from `weaver-config`: this crate does not
//! link libtorch.

pub mod job;
mod kv;
pub mod metrics;
mod placement;
pub mod prometheus;
pub mod server;
pub mod status;

pub use weaver_rpc::{client, error, pb, session, token, types};

pub use client::{normalize_url, ClientTls, CoordinatorClient};
pub use error::CoordinatorError;
pub use job::{default_limits, even_stages, Phase, Policy, ResumePoint, StagePlanner};
pub use kv::{MAX_KEY_LEN, MAX_VALUE_LEN};
pub use metrics::METRICS_FILE;
pub use server::{CheckpointCommitter, Coordinator, CoordinatorOptions, TlsIdentity};
pub use session::{EventHook, GrpcStore, Registration, SessionOptions, WorkerSession};
pub use status::render_status;
pub use token::{JobToken, TOKEN_ENV};
pub use types::{Assignment, ControlEvent, JobOutcome, ShardStats, StepMetrics, WorkerInfo};
