//! The async client: one method per RPC, the job token added to every call, statuses
//! turned back into [`CoordinatorError`]s. Clones share one HTTP/2 channel.
//! [`crate::WorkerSession`] builds the blocking facade for training processes on top.

use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::error::{CoordinatorError, Result};
use crate::pb;
use crate::pb::coordinator_client::CoordinatorClient as RawClient;
use crate::token::{AddToken, JobToken};

/// The longest a single long-poll call is held by the server; clients poll again.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// How to trust the coordinator's TLS certificate.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// The CA (or self-signed) certificate that signed the server's (PEM).
    pub ca_pem: Vec<u8>,
    /// The name to check in the certificate (default: the URL's host).
    pub domain: Option<String>,
}

impl ClientTls {
    /// Reads the CA certificate file.
    pub fn from_file(path: &std::path::Path) -> Result<ClientTls> {
        Ok(ClientTls {
            ca_pem: std::fs::read(path).map_err(|e| {
                CoordinatorError::Tls(format!("cannot read {}: {e}", path.display()))
            })?,
            domain: None,
        })
    }
}

/// A connection to a coordinator.
#[derive(Debug, Clone)]
pub struct CoordinatorClient {
    raw: RawClient<InterceptedService<Channel, AddToken>>,
}

/// Accepts `host:port`, `http://host:port` and `https://host:port`.
pub fn normalize_url(url: &str, tls: bool) -> String {
    if url.contains("://") {
        url.to_string()
    } else if tls {
        format!("https://{url}")
    } else {
        format!("http://{url}")
    }
}

impl CoordinatorClient {
    /// A client that connects on first use (and reconnects after failures), so a worker
    /// may start before its coordinator listens. Must be called inside a tokio runtime.
    pub fn connect_lazy(
        url: &str,
        token: &JobToken,
        tls: Option<&ClientTls>,
    ) -> Result<CoordinatorClient> {
        let url = normalize_url(url, tls.is_some());
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| CoordinatorError::BadConfig(format!("bad coordinator URL {url:?}: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        if let Some(tls) = tls {
            let mut config =
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
            if let Some(d) = &tls.domain {
                config = config.domain_name(d.clone());
            }
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| CoordinatorError::Tls(e.to_string()))?;
        }
        CoordinatorClient::from_channel(endpoint.connect_lazy(), token)
    }

    /// A client over an existing channel (benchmarks share a few channels among many
    /// simulated workers).
    pub fn from_channel(channel: Channel, token: &JobToken) -> Result<CoordinatorClient> {
        let raw = RawClient::with_interceptor(channel, AddToken(token.header()?))
            .max_decoding_message_size(64 << 20);
        Ok(CoordinatorClient { raw })
    }

    /// Joins the current generation.
    pub async fn register(&self, info: pb::WorkerInfo) -> Result<pb::RegisterResponse> {
        let r = self
            .raw
            .clone()
            .register(pb::RegisterRequest { info: Some(info) })
            .await?;
        Ok(r.into_inner())
    }

    /// Waits up to `wait` (capped by the server) for the assignment.
    pub async fn get_assignment(&self, worker_id: u64, wait: Duration) -> Result<pb::Assignment> {
        let r = self
            .raw
            .clone()
            .get_assignment(pb::GetAssignmentRequest {
                worker_id,
                wait_ms: wait.as_millis().min(u128::from(u32::MAX)) as u32,
            })
            .await?;
        Ok(r.into_inner())
    }

    /// The stream of control events after `after_seq`.
    pub async fn watch(
        &self,
        worker_id: u64,
        after_seq: u64,
    ) -> Result<tonic::Streaming<pb::ControlEvent>> {
        let r = self
            .raw
            .clone()
            .watch(pb::WatchRequest {
                worker_id,
                after_seq,
            })
            .await?;
        Ok(r.into_inner())
    }

    /// One heartbeat.
    pub async fn heartbeat(&self, req: pb::HeartbeatRequest) -> Result<pb::HeartbeatResponse> {
        Ok(self.raw.clone().heartbeat(req).await?.into_inner())
    }

    /// Sets a rendezvous key.
    pub async fn kv_set(&self, key: &str, value: Vec<u8>) -> Result<()> {
        self.raw
            .clone()
            .kv_set(pb::KvSetRequest {
                key: key.to_string(),
                value,
            })
            .await?;
        Ok(())
    }

    /// Waits up to `wait` (capped by the server) for a rendezvous key.
    pub async fn kv_get(&self, key: &str, wait: Duration) -> Result<Vec<u8>> {
        let r = self
            .raw
            .clone()
            .kv_get(pb::KvGetRequest {
                key: key.to_string(),
                wait_ms: wait.as_millis().min(u128::from(u32::MAX)) as u32,
            })
            .await?;
        Ok(r.into_inner().value)
    }

    /// Adds to a rendezvous counter.
    pub async fn kv_add(&self, key: &str, delta: i64) -> Result<i64> {
        let r = self
            .raw
            .clone()
            .kv_add(pb::KvAddRequest {
                key: key.to_string(),
                delta,
            })
            .await?;
        Ok(r.into_inner().value)
    }

    /// Reports a durable shard.
    pub async fn report_shard(
        &self,
        worker_id: u64,
        step: u64,
        report: Vec<u8>,
        stopping: bool,
    ) -> Result<pb::ReportShardResponse> {
        let r = self
            .raw
            .clone()
            .report_shard(pb::ReportShardRequest {
                worker_id,
                step,
                report,
                stopping,
            })
            .await?;
        Ok(r.into_inner())
    }

    /// Reports a failure.
    pub async fn report_error(&self, worker_id: u64, message: &str, retryable: bool) -> Result<()> {
        self.raw
            .clone()
            .report_error(pb::ReportErrorRequest {
                worker_id,
                message: message.to_string(),
                retryable,
            })
            .await?;
        Ok(())
    }

    /// Reports the last step done.
    pub async fn report_done(&self, worker_id: u64, step: u64, summary_json: String) -> Result<()> {
        self.raw
            .clone()
            .report_done(pb::ReportDoneRequest {
                worker_id,
                step,
                summary_json,
            })
            .await?;
        Ok(())
    }

    /// Asks for an on-demand checkpoint; returns the step it will be taken at.
    pub async fn save_checkpoint(&self) -> Result<u64> {
        let r = self
            .raw
            .clone()
            .save_checkpoint(pb::SaveCheckpointRequest {})
            .await?;
        Ok(r.into_inner().step)
    }

    /// The job's status.
    pub async fn status(&self) -> Result<pb::StatusResponse> {
        Ok(self
            .raw
            .clone()
            .status(pb::StatusRequest {})
            .await?
            .into_inner())
    }

    /// Stops the job gracefully.
    pub async fn shutdown(&self, reason: &str) -> Result<()> {
        self.raw
            .clone()
            .shutdown(pb::ShutdownRequest {
                reason: reason.to_string(),
            })
            .await?;
        Ok(())
    }
}
