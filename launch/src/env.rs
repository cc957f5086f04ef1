//! The environment contract between launchers (this crate's local launcher, the SLURM,
//! SSH and Kubernetes scripts) and `weaver worker`: which variables a worker reads, and
//! where its job token comes from.

use std::path::Path;

use weaver_coordinator::{JobToken, WorkerInfo, TOKEN_ENV};

use crate::LaunchError;

/// The coordinator's URL (`weaver worker` uses it when `--coordinator` is absent).
pub const COORDINATOR_ENV: &str = "WEAVER_COORDINATOR";
/// A file holding the job token (alternative to `WEAVER_JOB_TOKEN`).
pub const TOKEN_FILE_ENV: &str = "WEAVER_TOKEN_FILE";
/// The worker's index on its host.
pub const LOCAL_RANK_ENV: &str = "WEAVER_LOCAL_RANK";
/// Workers the launcher starts on this host.
pub const LOCAL_WORLD_SIZE_ENV: &str = "WEAVER_LOCAL_WORLD_SIZE";
/// The host name the worker registers with (workers sharing it may share a TP group).
pub const HOST_ENV: &str = "WEAVER_HOST";
/// Intra-op threads for the worker's libtorch (cores divided by local workers).
pub const THREADS_ENV: &str = "WEAVER_NUM_THREADS";
/// How many times the launcher restarted this local rank (0 for the first start).
pub const RESTART_ENV: &str = "WEAVER_RESTART_COUNT";

/// What a worker process learns from its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerEnv {
    /// `WEAVER_COORDINATOR`.
    pub coordinator: Option<String>,
    /// `WEAVER_LOCAL_RANK` (default 0).
    pub local_rank: u32,
    /// `WEAVER_LOCAL_WORLD_SIZE` (default 1).
    pub local_world_size: u32,
    /// `WEAVER_HOST`, else this machine's host name.
    pub host: String,
    /// `WEAVER_NUM_THREADS`.
    pub threads: Option<usize>,
    /// `WEAVER_RESTART_COUNT` (default 0).
    pub restart: u32,
}

fn parse<T: std::str::FromStr>(name: &str) -> Result<Option<T>, LaunchError> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| LaunchError::BadOptions(format!("{name}={v:?} is not a number"))),
        _ => Ok(None),
    }
}

impl WorkerEnv {
    /// Reads the variables; refuses malformed numbers.
    pub fn from_env() -> Result<WorkerEnv, LaunchError> {
        Ok(WorkerEnv {
            coordinator: std::env::var(COORDINATOR_ENV)
                .ok()
                .filter(|s| !s.is_empty()),
            local_rank: parse(LOCAL_RANK_ENV)?.unwrap_or(0),
            local_world_size: parse(LOCAL_WORLD_SIZE_ENV)?.unwrap_or(1),
            host: WorkerInfo::local_host_name(),
            threads: parse(THREADS_ENV)?,
            restart: parse(RESTART_ENV)?.unwrap_or(0),
        })
    }
}

/// The job token for a worker or CLI client: `--token-file FILE` if given, else
/// `WEAVER_TOKEN_FILE`, else `WEAVER_JOB_TOKEN`.
pub fn resolve_token(token_file: Option<&Path>) -> Result<JobToken, LaunchError> {
    if let Some(f) = token_file {
        return Ok(JobToken::from_file(f)?);
    }
    if let Ok(f) = std::env::var(TOKEN_FILE_ENV) {
        if !f.is_empty() {
            return Ok(JobToken::from_file(Path::new(&f))?);
        }
    }
    JobToken::from_env()?.ok_or_else(|| {
        LaunchError::BadOptions(format!(
            "no job token: pass --token-file FILE or set {TOKEN_ENV} (the coordinator writes the \
             token with --token-file, or generates one and prints where it is)"
        ))
    })
}
