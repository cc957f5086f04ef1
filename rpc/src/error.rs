//! The one error type of the coordinator crate, for the server and the client library
//! alike, and its mapping to and from `tonic::Status` — in exactly one place
//! ([`CoordinatorError::into_status`] / [`CoordinatorError::from_status`]).
//!
//! A status carries the variant's kind in the `weaver-error` metadata entry so that a
//! client gets back the same variant the server raised.

use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

/// What went wrong, named so that a caller can act on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CoordinatorError {
    /// The job or coordinator configuration is unusable; the message says what to change.
    #[error("bad configuration: {0}")]
    BadConfig(String),
    /// The workers that came cannot run the requested layout (mixed device kinds, a TP
    /// group that cannot stay inside one host, ...).
    #[error("impossible placement: {0}")]
    Placement(String),
    /// The call carried no job token, or another job's.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// Another live process already holds this (host, local rank) slot.
    #[error("already registered: {0}")]
    AlreadyRegistered(String),
    /// The generation is planned with its full count of workers; no one else may join.
    #[error("job full: {0}")]
    JobFull(String),
    /// The registration belongs to an older generation (or was never made): register again.
    #[error("stale registration: {0}")]
    StaleWorker(String),
    /// The job ended with a failure; no further work will be assigned.
    #[error("job failed: {0}")]
    JobFailed(String),
    /// The job completed; no further work will be assigned.
    #[error("job completed: {0}")]
    JobCompleted(String),
    /// A wait ran out.
    #[error("{op} timed out after {after:?}")]
    Timeout {
        /// What was waited for.
        op: String,
        /// How long.
        after: Duration,
    },
    /// The coordinator cannot be reached.
    #[error("coordinator unreachable: {0}")]
    Unavailable(String),
    /// The request itself was malformed (a bug in the caller).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Another gRPC failure.
    #[error("rpc failed ({code}): {message}")]
    Rpc {
        /// The gRPC status code, as text.
        code: String,
        /// The server's message.
        message: String,
    },
    /// Reading or writing a local file failed.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        message: String,
    },
    /// Setting up TLS failed (unreadable certificate or key, bad PEM).
    #[error("tls: {0}")]
    Tls(String),
    /// The background runtime of the client library is gone.
    #[error("client runtime stopped: {0}")]
    Runtime(String),
    /// A new job (no resume point) was given a checkpoint URL that already holds committed
    /// checkpoints: refused before any worker is gathered.
    #[error(
        "{url} already holds committed checkpoints (the newest is step {step}); continue \
         that job with --resume latest, or give this job another checkpoint URL \
         (--set checkpoint.url=...)"
    )]
    CheckpointUrlTaken {
        /// The checkpoint URL.
        url: String,
        /// The newest committed step there.
        step: u64,
    },
}

/// Result with [`CoordinatorError`].
pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;

const KIND_KEY: &str = "weaver-error";

impl CoordinatorError {
    /// A short stable name of the variant (sent as `weaver-error` metadata).
    pub fn kind(&self) -> &'static str {
        match self {
            CoordinatorError::BadConfig(_) => "bad-config",
            CoordinatorError::Placement(_) => "placement",
            CoordinatorError::Unauthenticated(_) => "unauthenticated",
            CoordinatorError::AlreadyRegistered(_) => "already-registered",
            CoordinatorError::JobFull(_) => "job-full",
            CoordinatorError::StaleWorker(_) => "stale-worker",
            CoordinatorError::JobFailed(_) => "job-failed",
            CoordinatorError::JobCompleted(_) => "job-completed",
            CoordinatorError::Timeout { .. } => "timeout",
            CoordinatorError::Unavailable(_) => "unavailable",
            CoordinatorError::InvalidRequest(_) => "invalid-request",
            CoordinatorError::Rpc { .. } => "rpc",
            CoordinatorError::Io { .. } => "io",
            CoordinatorError::Tls(_) => "tls",
            CoordinatorError::Runtime(_) => "runtime",
            CoordinatorError::CheckpointUrlTaken { .. } => "checkpoint-url-taken",
        }
    }

    /// True when the job itself is over (completed or failed): stop, do not retry.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            CoordinatorError::JobFailed(_) | CoordinatorError::JobCompleted(_)
        )
    }

    /// The server side: the status a handler returns. The one place errors become statuses.
    pub fn into_status(self) -> Status {
        let code = match &self {
            CoordinatorError::BadConfig(_) | CoordinatorError::InvalidRequest(_) => {
                Code::InvalidArgument
            }
            CoordinatorError::Placement(_)
            | CoordinatorError::JobFailed(_)
            | CoordinatorError::JobCompleted(_)
            | CoordinatorError::CheckpointUrlTaken { .. } => Code::FailedPrecondition,
            CoordinatorError::Unauthenticated(_) => Code::Unauthenticated,
            CoordinatorError::AlreadyRegistered(_) => Code::AlreadyExists,
            CoordinatorError::JobFull(_) => Code::ResourceExhausted,
            CoordinatorError::StaleWorker(_) => Code::NotFound,
            CoordinatorError::Timeout { .. } => Code::DeadlineExceeded,
            CoordinatorError::Unavailable(_) => Code::Unavailable,
            CoordinatorError::Rpc { .. }
            | CoordinatorError::Io { .. }
            | CoordinatorError::Tls(_)
            | CoordinatorError::Runtime(_) => Code::Internal,
        };
        let kind = self.kind();
        let message = match &self {
            // The client rebuilds the variant from the message: send the payload only.
            CoordinatorError::Timeout { op, after } => format!("{op}|{}", after.as_millis()),
            CoordinatorError::CheckpointUrlTaken { url, step } => format!("{url}|{step}"),
            CoordinatorError::BadConfig(m)
            | CoordinatorError::Placement(m)
            | CoordinatorError::Unauthenticated(m)
            | CoordinatorError::AlreadyRegistered(m)
            | CoordinatorError::JobFull(m)
            | CoordinatorError::StaleWorker(m)
            | CoordinatorError::JobFailed(m)
            | CoordinatorError::JobCompleted(m)
            | CoordinatorError::Unavailable(m)
            | CoordinatorError::InvalidRequest(m)
            | CoordinatorError::Tls(m)
            | CoordinatorError::Runtime(m) => m.clone(),
            other => other.to_string(),
        };
        let mut status = Status::new(code, message);
        status
            .metadata_mut()
            .insert(KIND_KEY, MetadataValue::from_static(kind));
        status
    }

    /// The client side: the error a status stands for.
    pub fn from_status(status: &Status) -> CoordinatorError {
        let message = status.message().to_string();
        let kind = status
            .metadata()
            .get(KIND_KEY)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        match kind {
            "bad-config" => return CoordinatorError::BadConfig(message),
            "placement" => return CoordinatorError::Placement(message),
            "unauthenticated" => return CoordinatorError::Unauthenticated(message),
            "already-registered" => return CoordinatorError::AlreadyRegistered(message),
            "job-full" => return CoordinatorError::JobFull(message),
            "stale-worker" => return CoordinatorError::StaleWorker(message),
            "job-failed" => return CoordinatorError::JobFailed(message),
            "job-completed" => return CoordinatorError::JobCompleted(message),
            "invalid-request" => return CoordinatorError::InvalidRequest(message),
            "checkpoint-url-taken" => {
                if let Some((url, step)) = message.rsplit_once('|') {
                    if let Ok(step) = step.parse() {
                        return CoordinatorError::CheckpointUrlTaken {
                            url: url.to_string(),
                            step,
                        };
                    }
                }
            }
            "timeout" => {
                let (op, ms) = message.rsplit_once('|').unwrap_or((&message, "0"));
                return CoordinatorError::Timeout {
                    op: op.to_string(),
                    after: Duration::from_millis(ms.parse().unwrap_or(0)),
                };
            }
            _ => {}
        }
        match status.code() {
            Code::Unavailable => CoordinatorError::Unavailable(message),
            // Made on this side from a broken connection (tonic's "transport error": the
            // coordinator died mid-call), not sent by a server: unreachable, like a refused
            // connect.
            Code::Unknown if std::error::Error::source(status).is_some() => {
                CoordinatorError::Unavailable(format!("connection lost: {message}"))
            }
            Code::Unauthenticated => CoordinatorError::Unauthenticated(message),
            Code::DeadlineExceeded => CoordinatorError::Timeout {
                op: "rpc".into(),
                after: Duration::ZERO,
            },
            code => CoordinatorError::Rpc {
                code: format!("{code:?}"),
                message,
            },
        }
    }
}

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Status {
        e.into_status()
    }
}

impl From<Status> for CoordinatorError {
    fn from(s: Status) -> CoordinatorError {
        CoordinatorError::from_status(&s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_survive_the_wire() {
        for e in [
            CoordinatorError::AlreadyRegistered("host a local rank 0".into()),
            CoordinatorError::StaleWorker("worker 3".into()),
            CoordinatorError::JobFailed("expected 8 workers".into()),
            CoordinatorError::Unauthenticated("wrong token".into()),
            CoordinatorError::Timeout {
                op: "rendezvous key \"g1/x\"".into(),
                after: Duration::from_millis(1500),
            },
            CoordinatorError::CheckpointUrlTaken {
                url: "s3://b/run".into(),
                step: 300,
            },
        ] {
            assert_eq!(CoordinatorError::from_status(&e.clone().into_status()), e);
        }
        let plain = Status::unavailable("connection refused");
        assert!(matches!(
            CoordinatorError::from_status(&plain),
            CoordinatorError::Unavailable(_)
        ));
        // A connection that broke mid-call: tonic makes an Unknown status with the error
        // as its source. A server's Unknown status (no source) stays an rpc failure.
        let broken = Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        )));
        assert_eq!(broken.code(), Code::Unknown);
        assert!(
            matches!(
                CoordinatorError::from_status(&broken),
                CoordinatorError::Unavailable(_)
            ),
            "{:?}",
            CoordinatorError::from_status(&broken)
        );
        assert!(matches!(
            CoordinatorError::from_status(&Status::unknown("boom")),
            CoordinatorError::Rpc { .. }
        ));
    }
}
