//! The cluster-mode entry points behind the binary's subcommands: `weaver coordinator`
//! (serve one job until it ends, Ctrl-C or SIGTERM), and the operator's `weaver status`,
//! `weaver ckpt save` and shutdown calls against a running coordinator.

use std::net::SocketAddr;
use std::time::Duration;

use weaver_coordinator::{
    render_status, ClientTls, Coordinator, CoordinatorClient, CoordinatorOptions, JobOutcome,
    JobToken,
};

use crate::LaunchError;

fn runtime() -> Result<tokio::runtime::Runtime, LaunchError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| LaunchError::Io(format!("cannot start a runtime: {e}")))
}

/// Binds `addr` and serves the coordinator's `/metrics` there until `shutdown` resolves;
/// logs the URL (with port 0, the only way to learn the port). Fails at once when the
/// address cannot be bound, before any worker is started.
pub async fn spawn_metrics(
    coordinator: &Coordinator,
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>, LaunchError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        LaunchError::Io(format!("cannot listen on {addr} for --metrics-listen: {e}"))
    })?;
    let bound = listener
        .local_addr()
        .map_err(|e| LaunchError::Io(format!("metrics listener address: {e}")))?;
    tracing::info!(url = %format!("http://{bound}/metrics"), "metrics endpoint listening");
    let c = coordinator.clone();
    Ok(tokio::spawn(async move {
        c.serve_metrics(listener, shutdown).await
    }))
}

/// `weaver coordinator`: validates the job, listens on `listen`, serves until the job
/// ends (or Ctrl-C / SIGTERM stop it, telling the workers to stop) and returns how it
/// ended. `on_listening` gets the bound address (log it; with port 0 it is the only way
/// to know the port). With `metrics_listen` in the options, `/metrics` is served there
/// while the coordinator runs.
pub fn serve_coordinator(
    options: CoordinatorOptions,
    listen: SocketAddr,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<JobOutcome, LaunchError> {
    let metrics_listen = options.metrics_listen;
    let grace = options.preempt_grace;
    let coordinator = Coordinator::new(options)?;
    runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| LaunchError::Io(format!("cannot listen on {listen}: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| LaunchError::Io(format!("listener address: {e}")))?;
        on_listening(addr);
        let (metrics_stop, metrics_rx) = tokio::sync::oneshot::channel::<()>();
        let metrics = match metrics_listen {
            Some(m) => Some(
                spawn_metrics(&coordinator, m, async {
                    let _ = metrics_rx.await;
                })
                .await?,
            ),
            None => None,
        };
        let stop = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => tracing::warn!("interrupted: stopping the job"),
                _ = async {
                    match term.as_mut() {
                        Some(t) => { t.recv().await; }
                        None => std::future::pending::<()>().await,
                    }
                } => {
                    // Preemption: keep the work done since the last checkpoint (a
                    // scheduler's SIGTERM reaches the workers too; they checkpoint at the
                    // end of their step, which only this coordinator can commit).
                    tracing::warn!("SIGTERM: checkpointing, then stopping the job (at most {grace:?})");
                    match coordinator.checkpoint_and_stop(grace).await {
                        Some(step) => tracing::warn!(
                            step,
                            "preempted: the checkpoint at step {step} is committed; continue with --resume latest"
                        ),
                        None => tracing::warn!(
                            "preempted: no new checkpoint committed within {grace:?}; --resume latest continues from the last one"
                        ),
                    }
                }
            }
        };
        let outcome = coordinator.serve(listener, stop).await;
        let _ = metrics_stop.send(());
        if let Some(m) = metrics {
            let _ = m.await;
        }
        Ok(outcome?)
    })
}

fn client_call<T, F, Fut>(
    url: &str,
    token: &JobToken,
    tls: Option<&ClientTls>,
    call: F,
) -> Result<T, LaunchError>
where
    F: FnOnce(CoordinatorClient) -> Fut,
    Fut: std::future::Future<Output = weaver_coordinator::error::Result<T>>,
{
    let rt = runtime()?;
    let client = {
        let _g = rt.enter();
        CoordinatorClient::connect_lazy(url, token, tls)?
    };
    rt.block_on(async move {
        tokio::time::timeout(Duration::from_secs(30), call(client))
            .await
            .map_err(|_| {
                LaunchError::Io(format!(
                    "no answer from the coordinator at {url} within 30 s"
                ))
            })?
            .map_err(LaunchError::from)
    })
}

/// `weaver status --coordinator URL`: the job state and the per-worker table.
pub fn status(url: &str, token: &JobToken, tls: Option<&ClientTls>) -> Result<String, LaunchError> {
    let s = client_call(url, token, tls, |c| async move { c.status().await })?;
    Ok(render_status(&s))
}

/// `weaver ckpt save --coordinator URL`: asks for a checkpoint; returns its step.
pub fn request_checkpoint(
    url: &str,
    token: &JobToken,
    tls: Option<&ClientTls>,
) -> Result<u64, LaunchError> {
    client_call(
        url,
        token,
        tls,
        |c| async move { c.save_checkpoint().await },
    )
}

/// Stops a running job gracefully (workers are told to stop; the job ends as failed with
/// `reason`).
pub fn shutdown(
    url: &str,
    token: &JobToken,
    tls: Option<&ClientTls>,
    reason: &str,
) -> Result<(), LaunchError> {
    let reason = reason.to_string();
    client_call(url, token, tls, move |c| async move {
        c.shutdown(&reason).await
    })
}
