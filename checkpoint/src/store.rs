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

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::path::Path;
use object_store::ObjectStore;

use crate::error::{CheckpointError, Result};

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
        let trimmed = url.trim_end_matches('/');
        if trimmed.is_empty() {
            return Err(bad("empty".into()));
        }
        let Some((scheme, _)) = trimmed.split_once("://") else {
            return CkptStore::local(url, PathBuf::from(trimmed));
        };
        if scheme == "file" {
            let parsed = url::Url::parse(trimmed).map_err(|e| bad(e.to_string()))?;
            let path = parsed
                .to_file_path()
                .map_err(|()| bad("not a local file URL".into()))?;
            return CkptStore::local(url, path);
        }
        let parsed = url::Url::parse(trimmed).map_err(|e| bad(e.to_string()))?;
        let host = parsed
            .host_str()
            .ok_or_else(|| bad("no bucket or container".into()))?;
        let root = Path::from_url_path(parsed.path()).map_err(|e| bad(e.to_string()))?;
        let options: Vec<(String, String)> = options
            .into_iter()
            .map(|(k, v)| (k.as_ref().to_ascii_lowercase(), v.into()))
            .collect();
        install_tls_provider();
        let store: Arc<dyn ObjectStore> = match scheme {
            "s3" | "s3a" => {
                let mut b = AmazonS3Builder::from_env().with_url(trimmed);
                for (k, v) in options {
                    b = b.with_config(k.parse().map_err(|e| bad(format!("{e}")))?, v);
                }
                Arc::new(b.build().map_err(|e| bad(e.to_string()))?)
            }
            "gs" => {
                let mut b = GoogleCloudStorageBuilder::from_env().with_url(trimmed);
                for (k, v) in options {
                    b = b.with_config(k.parse().map_err(|e| bad(format!("{e}")))?, v);
                }
                Arc::new(b.build().map_err(|e| bad(e.to_string()))?)
            }
            "az" | "abfs" | "abfss" | "azure" | "adl" => {
                let mut b = MicrosoftAzureBuilder::from_env().with_url(trimmed);
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
            base: format!("{scheme}://{host}"),
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
        Ok(CkptStore {
            store: Arc::new(store),
            root,
            base: String::new(),
            local: true,
            direct: true,
        })
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
    pub(crate) fn path(&self, rel: &str) -> Path {
        rel.split('/')
            .filter(|s| !s.is_empty())
            .fold(self.root.clone(), |p, s| p.join(s))
    }

    /// An object's name for messages.
    pub(crate) fn display(&self, path: &Path) -> String {
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
    pub(crate) fn err(&self, path: &Path, e: object_store::Error) -> CheckpointError {
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
