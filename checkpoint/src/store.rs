//! Where checkpoints live: a checkpoint URL turned into an `object_store` store plus a root
//! prefix, with error mapping that names the object.
//!
//! | URL | store |
//! |---|---|
//! | `/abs/dir`, `rel/dir`, `file:///abs/dir` | local files; every write is fsync'd, and so is its directory (disk writeback starts as each part lands, see the `local` module) |
//! | `s3://bucket/prefix` (or `s3a://`) | any S3 API: credentials, region and endpoint from the standard `AWS_*` variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP=true` for a plain-http endpoint) |
//! | `gs://bucket/prefix` | Google Cloud Storage (`GOOGLE_*` variables, e.g. `GOOGLE_SERVICE_ACCOUNT`) |
//! | `az://container/prefix` (or `abfs[s]://`) | Azure Blob Storage (`AZURE_*` variables, e.g. `AZURE_STORAGE_ACCOUNT_NAME`) |
//!
//! Options passed to [`CkptStore::open_with_options`] (object_store's config keys, e.g.
//! `("aws_endpoint", "http://127.0.0.1:9000")`) override the environment. Create-only puts
//! (the manifest commit) need a store that honours `If-None-Match: *`: AWS S3, GCS, Azure,
//! MinIO, R2 and s3s do.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::path::Path;
use object_store::ObjectStore;

use crate::error::{CheckpointError, Result};

/// The cloud stores a URL may name, by scheme (lower case).
pub const CLOUD_SCHEMES: &[&str] = &["s3", "s3a", "gs", "az", "abfs", "abfss", "azure", "adl"];

/// How old a local put's staging file (`NAME#N`) must be before opening the location
/// deletes it as the leftover of a put killed mid-way. Uploads that live hold a lock on
/// theirs and are never swept whatever their age; a single put writes its staging file in
/// one go (seconds), so an hour without a write means its process is gone.
pub const STALE_STAGING_AGE: Duration = Duration::from_secs(3600);

/// What a store URL names, read before any store is built. Pure parsing (property-tested:
/// it never panics), and the one place a URL's scheme is read: a string that starts with a
/// scheme (`s3:`, `gs:`, `file:`, ...) is a URL or an error, never a local folder, so that
/// `s3://` or `s3:/bucket/run` cannot quietly write checkpoints into a directory called
/// `s3:` on a node that is about to disappear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// A local folder: a path (trailing slashes dropped), or `file:///ABSOLUTE/PATH`.
    Local(PathBuf),
    /// A prefix in a bucket (container) of a cloud store.
    Cloud {
        /// Lower case, one of [`CLOUD_SCHEMES`].
        scheme: String,
        /// The bucket or container (for `abfs[s]://`, `container@account...`); never empty.
        bucket: String,
        /// Slash-separated, without leading, trailing or doubled slashes; empty for the
        /// bucket's root.
        prefix: String,
    },
}

impl StoreUrl {
    /// Reads `url`: a path, `file://`, or `SCHEME://BUCKET[/PREFIX]` for a cloud scheme.
    /// Errors: [`CheckpointError::MalformedUrl`] when a known scheme is followed by
    /// something that is not a location (`s3://`, `s3:/bucket/run`, `s3:bucket`, `gs://`,
    /// `s3://bucket/../x`), [`CheckpointError::BadUrl`] for an empty URL or an unknown
    /// scheme.
    pub fn parse(url: &str) -> Result<StoreUrl> {
        let bad = |message: String| CheckpointError::BadUrl {
            url: url.to_string(),
            message,
        };
        if url.trim().is_empty() {
            return Err(bad("empty".into()));
        }
        let Some(scheme) = scheme_of(url) else {
            // A path: trailing slashes name the same folder (and `/` stays the root).
            let trimmed = url.trim_end_matches('/');
            return Ok(StoreUrl::Local(PathBuf::from(if trimmed.is_empty() {
                "/"
            } else {
                trimmed
            })));
        };
        let lower = scheme.to_ascii_lowercase();
        let rest = &url[scheme.len() + 1..];
        let malformed = |reason: &str, expected: &str| CheckpointError::MalformedUrl {
            url: url.to_string(),
            scheme: lower.clone(),
            reason: reason.to_string(),
            expected: expected.to_string(),
        };
        if lower == "file" {
            const FILE: &str = "file:///ABSOLUTE/PATH";
            if !rest.starts_with('/') || rest.trim_start_matches('/').is_empty() {
                return Err(malformed("no absolute path after file:", FILE));
            }
            let parsed = url::Url::parse(&format!("file:{rest}"))
                .map_err(|e| malformed(&e.to_string(), FILE))?;
            let path = parsed
                .to_file_path()
                .map_err(|()| malformed("not a path on this machine", FILE))?;
            let text = path.to_string_lossy();
            let trimmed = text.trim_end_matches('/');
            return Ok(StoreUrl::Local(PathBuf::from(if trimmed.is_empty() {
                "/"
            } else {
                trimmed
            })));
        }
        if !CLOUD_SCHEMES.contains(&lower.as_str()) {
            return Err(bad(format!(
                "unsupported scheme {lower}: (use a path, file://, s3://, gs:// or az://; a \
                 local folder whose name has a colon is written ./{url})"
            )));
        }
        let expected = format!("{lower}://BUCKET/PREFIX");
        let Some(after) = rest.strip_prefix("//") else {
            return Err(malformed(
                &format!("{lower}: is not followed by //BUCKET"),
                &expected,
            ));
        };
        let (bucket, path) = after.split_once('/').unwrap_or((after, ""));
        if bucket.is_empty() {
            return Err(malformed("no bucket after //", &expected));
        }
        // `@` only in Azure's `container@account.dfs.core.windows.net`; elsewhere it would
        // read as user information and name another host.
        let azure = matches!(lower.as_str(), "az" | "abfs" | "abfss" | "azure" | "adl");
        if let Some(c) = bucket.chars().find(|&c| {
            !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') || (azure && c == '@'))
        }) {
            return Err(malformed(
                &format!("the bucket {bucket:?} has the character {c:?}"),
                &expected,
            ));
        }
        let mut segments = Vec::new();
        for s in path.split('/').filter(|s| !s.is_empty()) {
            if s == "." || s == ".." {
                return Err(malformed(
                    &format!("the prefix has a {s:?} segment"),
                    &expected,
                ));
            }
            if let Some(c) = s
                .chars()
                .find(|c| c.is_control() || matches!(c, '?' | '#' | '\\'))
            {
                return Err(malformed(
                    &format!("the prefix has the character {c:?}"),
                    &expected,
                ));
            }
            segments.push(s);
        }
        Ok(StoreUrl::Cloud {
            scheme: lower,
            bucket: bucket.to_string(),
            prefix: segments.join("/"),
        })
    }
}

/// The scheme of `url` if it starts with one (RFC 3986: a letter, then letters, digits,
/// `+`, `-` or `.`, then `:`).
fn scheme_of(url: &str) -> Option<&str> {
    let (head, _) = url.split_once(':')?;
    let mut chars = head.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
    .then_some(head)
}

/// A checkpoint location: an object store and the prefix under which the `step-…`
/// directories and `latest` live. Cheap to clone.
#[derive(Debug, Clone)]
pub struct CkptStore {
    store: Arc<dyn ObjectStore>,
    root: Path,
    /// `scheme://bucket` for cloud stores, empty for local files.
    base: String,
    local: bool,
    /// Local and not wrapped: readers may use the files directly.
    direct: bool,
}

impl CkptStore {
    /// Opens a checkpoint URL (see the module docs), configured from the environment.
    pub fn open(url: &str) -> Result<CkptStore> {
        CkptStore::open_with_options(url, std::iter::empty::<(String, String)>())
    }

    /// Opens a checkpoint URL with explicit object_store options (`key`, `value`) that take
    /// precedence over the environment; ignored for local paths.
    pub fn open_with_options<K, V>(
        url: &str,
        options: impl IntoIterator<Item = (K, V)>,
    ) -> Result<CkptStore>
    where
        K: AsRef<str>,
        V: Into<String>,
    {
        let bad = |message: String| CheckpointError::BadUrl {
            url: url.to_string(),
            message,
        };
        let (scheme, bucket, prefix) = match StoreUrl::parse(url)? {
            StoreUrl::Local(dir) => return CkptStore::local(url, dir),
            StoreUrl::Cloud {
                scheme,
                bucket,
                prefix,
            } => (scheme, bucket, prefix),
        };
        // Rebuilt from the parsed parts: what the builders see has no trailing slash, a
        // lower-case scheme and a bucket that was checked to be there.
        let canonical = if prefix.is_empty() {
            format!("{scheme}://{bucket}")
        } else {
            format!("{scheme}://{bucket}/{prefix}")
        };
        let parsed = url::Url::parse(&canonical).map_err(|e| bad(e.to_string()))?;
        let root = Path::from_url_path(parsed.path()).map_err(|e| bad(e.to_string()))?;
        let options: Vec<(String, String)> = options
            .into_iter()
            .map(|(k, v)| (k.as_ref().to_ascii_lowercase(), v.into()))
            .collect();
        install_tls_provider();
        let store: Arc<dyn ObjectStore> = match scheme.as_str() {
            "s3" | "s3a" => {
                let mut b = AmazonS3Builder::from_env().with_url(&canonical);
                for (k, v) in options {
                    b = b.with_config(k.parse().map_err(|e| bad(format!("{e}")))?, v);
                }
                Arc::new(b.build().map_err(|e| bad(e.to_string()))?)
            }
            "gs" => {
                let mut b = GoogleCloudStorageBuilder::from_env().with_url(&canonical);
                for (k, v) in options {
                    b = b.with_config(k.parse().map_err(|e| bad(format!("{e}")))?, v);
                }
                Arc::new(b.build().map_err(|e| bad(e.to_string()))?)
            }
            "az" | "abfs" | "abfss" | "azure" | "adl" => {
                let mut b = MicrosoftAzureBuilder::from_env().with_url(&canonical);
                for (k, v) in options {
                    b = b.with_config(k.parse().map_err(|e| bad(format!("{e}")))?, v);
                }
                Arc::new(b.build().map_err(|e| bad(e.to_string()))?)
            }
            other => {
                return Err(bad(format!(
                    "unsupported scheme {other}:// (use a path, file://, s3://, gs:// or az://)"
                )))
            }
        };
        Ok(CkptStore {
            store,
            root,
            base: format!("{scheme}://{bucket}"),
            local: false,
            direct: false,
        })
    }

    fn local(url: &str, dir: PathBuf) -> Result<CkptStore> {
        let abs = std::path::absolute(&dir).map_err(|e| CheckpointError::BadUrl {
            url: url.to_string(),
            message: e.to_string(),
        })?;
        let root = Path::from_absolute_path(&abs).map_err(|e| CheckpointError::BadUrl {
            url: url.to_string(),
            message: e.to_string(),
        })?;
        // Rooted at `/` so that a directory that does not exist yet is no error: writes
        // create it, reads report the missing object.
        let store = crate::local::WritebackLocal::new();
        let store = CkptStore {
            store: Arc::new(store),
            root,
            base: String::new(),
            local: true,
            direct: true,
        };
        // Best effort: a location this process may only read (or a full disk) still opens.
        if let Err(e) = store.sweep_staging(STALE_STAGING_AGE) {
            tracing::warn!(url = %store.url(), error = %e, "could not sweep stale staging files");
        }
        Ok(store)
    }

    /// Deletes what puts killed mid-way left under a local location: staging files
    /// (`NAME#N`, which listings never show) last written more than `min_age` ago and not
    /// held by a live upload. Committed objects are never touched. Opening a local location
    /// runs it with [`STALE_STAGING_AGE`]; cloud stores have no staging files (an
    /// unfinished multipart upload is theirs to expire), so there it deletes nothing.
    /// Returns the deleted files' names.
    pub fn sweep_staging(&self, min_age: Duration) -> Result<Vec<String>> {
        let Some(dir) = self.local_path(&self.root) else {
            return Ok(Vec::new());
        };
        let deleted =
            crate::local::sweep_staging(&dir, min_age).map_err(|source| CheckpointError::Io {
                path: dir.display().to_string(),
                source,
            })?;
        let deleted: Vec<String> = deleted.iter().map(|p| p.display().to_string()).collect();
        if !deleted.is_empty() {
            tracing::info!(url = %self.url(), files = ?deleted, "deleted staging files of puts that never finished");
        }
        Ok(deleted)
    }

    /// The same location seen through a wrapper (fault injection, byte counting); the
    /// wrapper must forward every method. Reads then go through it too (a plain local
    /// store reads its files directly).
    pub fn wrap(&self, f: impl FnOnce(Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore>) -> CkptStore {
        CkptStore {
            store: f(self.store.clone()),
            direct: false,
            ..self.clone()
        }
    }

    /// The object store underneath.
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The prefix all checkpoint objects live under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether this is the local file system (reads then default to exact ranges).
    pub fn is_local(&self) -> bool {
        self.local
    }

    /// The location as a URL-ish string for messages: a path for local files,
    /// `scheme://bucket/prefix` otherwise.
    pub fn url(&self) -> String {
        self.display(&self.root)
    }

    /// The path of `rel` (slash-separated, relative to the root).
    pub fn path(&self, rel: &str) -> Path {
        rel.split('/')
            .filter(|s| !s.is_empty())
            .fold(self.root.clone(), |p, s| p.join(s))
    }

    /// An object's name for messages.
    pub fn display(&self, path: &Path) -> String {
        if self.local {
            format!("/{path}")
        } else if path.as_ref().is_empty() {
            self.base.clone()
        } else {
            format!("{}/{path}", self.base)
        }
    }

    /// The file-system path of `path` for local stores.
    pub(crate) fn local_path(&self, path: &Path) -> Option<PathBuf> {
        self.local.then(|| PathBuf::from(format!("/{path}")))
    }

    /// The file-system path of `path` when reads may bypass the object store.
    pub(crate) fn direct_path(&self, path: &Path) -> Option<PathBuf> {
        if self.direct {
            self.local_path(path)
        } else {
            None
        }
    }

    /// Maps a store error on `path` to the crate's error, naming the object.
    pub fn err(&self, path: &Path, e: object_store::Error) -> CheckpointError {
        match e {
            object_store::Error::NotFound { .. } => CheckpointError::MissingObject {
                object: self.display(path),
            },
            source if out_of_space(&source) => CheckpointError::NoSpace {
                object: self.display(path),
                source,
            },
            source => CheckpointError::Store {
                object: self.display(path),
                source,
            },
        }
    }
}

/// Whether an OS error somewhere in `e`'s chain says the storage is full (ENOSPC, EDQUOT,
/// EFBIG).
fn out_of_space(e: &object_store::Error) -> bool {
    use std::io::ErrorKind;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(x) = cur {
        if let Some(io) = x.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                ErrorKind::StorageFull | ErrorKind::QuotaExceeded | ErrorKind::FileTooLarge
            ) {
                return true;
            }
        }
        cur = x.source();
    }
    false
}

/// reqwest is built with rustls but no bundled crypto provider (keeping aws-lc out of the
/// build); install ring's as the process default before the first cloud client exists. A
/// provider installed earlier by the application wins.
fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let s = CkptStore::open("/tmp/ck").unwrap();
        assert!(s.is_local());
        assert_eq!(s.url(), "/tmp/ck");
        assert_eq!(
            s.display(&s.path("step-00000001/MANIFEST.json")),
            "/tmp/ck/step-00000001/MANIFEST.json"
        );
        let s = CkptStore::open("file:///tmp/ck/").unwrap();
        assert_eq!(s.url(), "/tmp/ck");
        let s = CkptStore::open_with_options(
            "s3://bucket/a/b",
            [
                ("aws_region", "us-east-1"),
                ("aws_access_key_id", "k"),
                ("aws_secret_access_key", "s"),
            ],
        )
        .unwrap();
        assert!(!s.is_local());
        assert_eq!(s.url(), "s3://bucket/a/b");
        assert_eq!(s.display(&s.path("latest")), "s3://bucket/a/b/latest");
        assert!(matches!(
            CkptStore::open("ftp://x/y"),
            Err(CheckpointError::BadUrl { .. })
        ));
        assert!(matches!(
            CkptStore::open(""),
            Err(CheckpointError::BadUrl { .. })
        ));
        assert!(matches!(
            CkptStore::open_with_options("s3://b/p", [("no_such_key", "1")]),
            Err(CheckpointError::BadUrl { .. })
        ));
    }
}

#[cfg(test)]
mod parse_tests {
    use super::*;
    use proptest::prelude::*;

    fn cloud(scheme: &str, bucket: &str, prefix: &str) -> StoreUrl {
        StoreUrl::Cloud {
            scheme: scheme.into(),
            bucket: bucket.into(),
            prefix: prefix.into(),
        }
    }

    #[test]
    fn well_formed_urls() {
        let local = |p: &str| StoreUrl::Local(PathBuf::from(p));
        for (url, want) in [
            ("/tmp/ck", local("/tmp/ck")),
            ("/tmp/ck///", local("/tmp/ck")),
            ("runs/a:b/ck", local("runs/a:b/ck")),
            ("./s3:", local("./s3:")),
            ("/", local("/")),
            ("file:///tmp/ck/", local("/tmp/ck")),
            ("file:/tmp/ck", local("/tmp/ck")),
            ("file://localhost/tmp/ck", local("/tmp/ck")),
            ("s3://bucket", cloud("s3", "bucket", "")),
            ("s3://bucket/", cloud("s3", "bucket", "")),
            ("S3://bucket/a//b/", cloud("s3", "bucket", "a/b")),
            ("s3a://b.c-d/run", cloud("s3a", "b.c-d", "run")),
            ("gs://b/p/q", cloud("gs", "b", "p/q")),
            ("az://container/x", cloud("az", "container", "x")),
            (
                "abfss://fs@acct.dfs.core.windows.net/x",
                cloud("abfss", "fs@acct.dfs.core.windows.net", "x"),
            ),
        ] {
            assert_eq!(StoreUrl::parse(url).unwrap(), want, "{url}");
        }
    }

    /// The cases: each names a cloud scheme, and each used to become a local
    /// folder (`s3:`, `s3:/bucket/run`, ...).
    #[test]
    fn malformed_cloud_urls_are_refused_not_local() {
        for url in [
            "s3://",
            "s3:///",
            "s3:/bucket/run",
            "s3:bucket",
            "s3:",
            "gs://",
            "gs:/b",
            "az:/x",
            "az://",
            "abfss://",
            "S3:/Bucket",
            "s3:///bucket/run",
            "s3://bucket/../x",
            "s3://bucket/./x",
            "s3://bu cket/x",
            "s3://user@bucket/x",
            "s3://bucket?x=1",
            "s3://bucket:9000/x",
            "file:",
            "file://",
            "file:relative/dir",
        ] {
            match StoreUrl::parse(url) {
                Err(CheckpointError::MalformedUrl { scheme, .. }) => {
                    assert_eq!(scheme, url.split(':').next().unwrap().to_ascii_lowercase())
                }
                other => panic!("{url}: {other:?}"),
            }
            assert!(
                matches!(
                    CkptStore::open(url),
                    Err(CheckpointError::MalformedUrl { .. })
                ),
                "{url}"
            );
        }
        let e = StoreUrl::parse("s3://").unwrap_err().to_string();
        assert!(e.contains("s3://BUCKET/PREFIX"), "{e}");
    }

    #[test]
    fn unknown_schemes_and_empty_urls() {
        for url in ["", "  ", "ftp://x/y", "hdfs:/x", "ck:1"] {
            assert!(
                matches!(StoreUrl::parse(url), Err(CheckpointError::BadUrl { .. })),
                "{url}"
            );
        }
    }

    proptest! {
        /// Any string: parsing never panics; one that starts with a cloud scheme and a colon
        /// is a cloud location or an error, never a local folder; cloud results are
        /// normalised (non-empty bucket, no empty or dot segments).
        #[test]
        fn parse_never_panics(
            scheme in prop::sample::select(vec!["s3", "gs", "az", "file", "S3", "x", ""]),
            sep in prop::sample::select(vec!["", ":", ":/", "://", ":///"]),
            rest in "[a-zA-Z0-9./:@?# _-]{0,24}",
        ) {
            let url = format!("{scheme}{sep}{rest}");
            let parsed = StoreUrl::parse(&url);
            let lower = scheme.to_ascii_lowercase();
            if CLOUD_SCHEMES.contains(&lower.as_str()) && sep.starts_with(':') {
                prop_assert!(!matches!(parsed, Ok(StoreUrl::Local(_))), "{url} -> {parsed:?}");
            }
            if let Ok(StoreUrl::Cloud { bucket, prefix, .. }) = &parsed {
                prop_assert!(!bucket.is_empty());
                prop_assert!(prefix.split('/').all(|s| prefix.is_empty() || (!s.is_empty() && s != "." && s != "..")));
            }
        }

        #[test]
        fn arbitrary_text_never_panics(url in "\\PC{0,40}") {
            let _ = StoreUrl::parse(&url);
        }
    }
}

#[cfg(test)]
mod space_tests {
    use super::out_of_space;

    fn generic(e: std::io::Error) -> object_store::Error {
        object_store::Error::Generic {
            store: "test",
            source: Box::new(e),
        }
    }

    #[test]
    fn a_full_disk_is_recognised_through_the_store_error() {
        for code in [libc::ENOSPC, libc::EDQUOT, libc::EFBIG] {
            assert!(
                out_of_space(&generic(std::io::Error::from_raw_os_error(code))),
                "{code}"
            );
        }
        assert!(!out_of_space(&generic(std::io::Error::from_raw_os_error(
            libc::EACCES
        ))));
    }
}
