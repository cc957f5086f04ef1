//! The job token: 256 random bits generated per job, shared with the workers by file
//! (`--token-file`) or environment (`WEAVER_JOB_TOKEN`), sent as
//! `authorization: Bearer <token>` on every call and checked by the server's interceptor.
//! It is never logged: `Debug` and `Display` print `JobToken(<redacted>)`.

use std::fmt;
use std::path::Path;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Request, Status};

use crate::error::{CoordinatorError, Result};

/// The environment variable that carries the token to workers.
pub const TOKEN_ENV: &str = "WEAVER_JOB_TOKEN";

/// A job's shared secret.
#[derive(Clone, PartialEq, Eq)]
pub struct JobToken(String);

impl JobToken {
    /// A fresh token: 32 bytes from the OS's random source, hex-encoded.
    pub fn generate() -> Result<JobToken> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| {
            CoordinatorError::BadConfig(format!("no OS randomness for the job token: {e}"))
        })?;
        Ok(JobToken(bytes.iter().map(|b| format!("{b:02x}")).collect()))
    }

    /// A token given by the user. At least 16 characters of `[A-Za-z0-9._~+/=-]` (it travels
    /// in an HTTP header); surrounding whitespace (a trailing newline in a file) is dropped.
    pub fn new(text: &str) -> Result<JobToken> {
        let t = text.trim();
        if t.len() < 16 {
            return Err(CoordinatorError::BadConfig(format!(
                "the job token must have at least 16 characters (it has {})",
                t.len()
            )));
        }
        if !t
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._~+/=-".contains(c))
        {
            return Err(CoordinatorError::BadConfig(
                "the job token may only hold letters, digits and . _ ~ + / = -".into(),
            ));
        }
        Ok(JobToken(t.to_string()))
    }

    /// Reads a token file (written by `weaver coordinator --token-file`, a Kubernetes secret…).
    pub fn from_file(path: &Path) -> Result<JobToken> {
        let text = std::fs::read_to_string(path).map_err(|e| CoordinatorError::Io {
            path: path.display().to_string(),
            message: format!("cannot read the job token: {e}"),
        })?;
        JobToken::new(&text)
    }

    /// The token in `path` if the file exists, else a fresh one written there (mode
    /// 0600). `weaver coordinator --token-file F` uses it: the scripts put `F` on a shared
    /// file system or in a secret, and workers read the same file. Returns whether it was
    /// created.
    pub fn load_or_create(path: &Path) -> Result<(JobToken, bool)> {
        if path.exists() {
            return JobToken::from_file(path).map(|t| (t, false));
        }
        let t = JobToken::generate()?;
        t.write_file(path)?;
        Ok((t, true))
    }

    /// The token of `WEAVER_JOB_TOKEN`, if set.
    pub fn from_env() -> Result<Option<JobToken>> {
        match std::env::var(TOKEN_ENV) {
            Ok(v) => JobToken::new(&v).map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Writes the token to `path`, readable by its owner only.
    pub fn write_file(&self, path: &Path) -> Result<()> {
        let io = |e: std::io::Error| CoordinatorError::Io {
            path: path.display().to_string(),
            message: format!("cannot write the job token: {e}"),
        };
        // Created 0600 from the start: never readable by others, not even briefly; an
        // existing file is narrowed before the secret goes in.
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path).map_err(io)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(io)?;
        }
        use std::io::Write;
        writeln!(file, "{}", self.0).map_err(io)?;
        Ok(())
    }

    /// The secret itself, for handing to a child process's environment. Do not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub(crate) fn header(&self) -> Result<MetadataValue<Ascii>> {
        format!("Bearer {}", self.0)
            .parse()
            .map_err(|_| CoordinatorError::BadConfig("the job token is not a valid header".into()))
    }

    /// Compares in time independent of where the first difference lies.
    fn matches(&self, presented: &[u8]) -> bool {
        let mine = self.0.as_bytes();
        if mine.len() != presented.len() {
            return false;
        }
        mine.iter()
            .zip(presented)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl fmt::Debug for JobToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JobToken(<redacted>)")
    }
}

impl fmt::Display for JobToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The server's interceptor: refuses calls without the job's token.
#[derive(Clone, Debug)]
pub struct CheckToken(pub JobToken);

impl tonic::service::Interceptor for CheckToken {
    fn call(&mut self, req: Request<()>) -> std::result::Result<Request<()>, Status> {
        let presented = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match presented {
            None => Err(CoordinatorError::Unauthenticated(
                "no job token: pass it with --token-file or WEAVER_JOB_TOKEN".into(),
            )
            .into_status()),
            Some(t) if self.0.matches(t.as_bytes()) => Ok(req),
            Some(_) => Err(CoordinatorError::Unauthenticated(
                "wrong job token: this coordinator runs another job".into(),
            )
            .into_status()),
        }
    }
}

/// The client's interceptor: adds the token to every call.
#[derive(Clone)]
pub(crate) struct AddToken(pub(crate) MetadataValue<Ascii>);

impl fmt::Debug for AddToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AddToken(<redacted>)")
    }
}

impl tonic::service::Interceptor for AddToken {
    fn call(&mut self, mut req: Request<()>) -> std::result::Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_long_random_and_redacted() {
        let a = JobToken::generate().unwrap();
        let b = JobToken::generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), 64);
        assert!(!format!("{a:?}").contains(a.expose()));
        assert!(!format!("{a}").contains(a.expose()));
        assert!(JobToken::new(a.expose()).is_ok());
    }

    #[test]
    fn refuses_short_or_odd_tokens_and_trims_files() {
        assert!(JobToken::new("short").is_err());
        assert!(JobToken::new("has spaces in the middle!").is_err());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        let t = JobToken::generate().unwrap();
        t.write_file(&p).unwrap();
        assert_eq!(JobToken::from_file(&p).unwrap(), t);
        let q = dir.path().join("new");
        let (made, created) = JobToken::load_or_create(&q).unwrap();
        assert!(created);
        assert_eq!(JobToken::load_or_create(&q).unwrap(), (made, false));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&q).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn interceptor_checks_the_token() {
        use tonic::service::Interceptor;
        let t = JobToken::generate().unwrap();
        let mut check = CheckToken(t.clone());
        assert!(check.call(Request::new(())).is_err());
        let mut add = AddToken(JobToken::generate().unwrap().header().unwrap());
        let e = check.call(add.call(Request::new(())).unwrap()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let mut add = AddToken(t.header().unwrap());
        assert!(check.call(add.call(Request::new(())).unwrap()).is_ok());
    }
}
