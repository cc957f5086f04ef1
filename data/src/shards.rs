//! Shard lists and reading one shard as a byte stream.
//!
//! `data.shards` takes, as webdataset and open_clip do:
//! - a brace pattern, `s3://bucket/train-{00000..01023}.tar` (ranges keep their zero
//!   padding; `{a,b}` lists; several patterns joined with `::`);
//! - a list file (a name ending in `.txt` or `.list`), one shard URL or pattern a line (`#`
//!   comments; relative names are relative to the list file's folder);
//! - a folder (a local directory, or a URL ending in `/`), meaning every `*.tar` in it,
//!   sorted by name.
//!
//! Every store weaver checkpoints to works: a local path, `file://`, `s3://`, `gs://`, `az://`
//! (weaver-checkpoint's URL → object_store code, configured from the environment or explicit
//! options). A shard is read front to back as it downloads, never whole: a remote read is an
//! HTTP range GET whose body is consumed chunk by chunk; a read that fails midway continues
//! from the byte it reached, with retries and backoff, and every wait has a timeout.

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::path::Path as StorePath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};
use tokio::runtime::Runtime;
use tracing::warn;
use weaver_checkpoint::StoreUrl;

use crate::error::{DataError, Result};

/// Where one shard lives.
#[derive(Debug, Clone)]
pub enum Location {
    /// A local file.
    Local(PathBuf),
    /// An object in a store.
    Remote {
        /// The store.
        store: Arc<dyn ObjectStore>,
        /// The object.
        path: StorePath,
    },
}

/// One shard: its URL (for messages and metrics) and where to read it.
#[derive(Debug, Clone)]
pub struct Shard {
    /// The URL as the user wrote it (expanded).
    pub url: String,
    /// Where it is.
    pub location: Location,
}

/// Opens stores for URLs, one per bucket, with optional object_store options
/// (`aws_endpoint`, credentials...) that take precedence over the environment.
#[derive(Debug, Default, Clone)]
pub struct Stores {
    options: Vec<(String, String)>,
    open: Arc<Mutex<HashMap<String, Arc<dyn ObjectStore>>>>,
}

impl Stores {
    /// Stores configured from the environment and `options`.
    pub fn new(options: Vec<(String, String)>) -> Stores {
        Stores {
            options,
            open: Arc::default(),
        }
    }

    /// Where `url` lives.
    pub fn locate(&self, url: &str) -> Result<Location> {
        let bad = |message: String| DataError::Read {
            url: url.to_string(),
            message,
        };
        // weaver-checkpoint's parser reads the scheme: `s3:/bucket/x` or `s3://` is an
        // error there, never a local path.
        let (base, prefix) = match StoreUrl::parse(url).map_err(|e| bad(e.to_string()))? {
            StoreUrl::Local(path) => return Ok(Location::Local(path)),
            StoreUrl::Cloud {
                scheme,
                bucket,
                prefix,
            } => (format!("{scheme}://{bucket}"), prefix),
        };
        let path = StorePath::from_url_path(&prefix).map_err(|e| bad(e.to_string()))?;
        let mut open = self
            .open
            .lock()
            .map_err(|_| DataError::Loader("store cache poisoned".into()))?;
        let store = match open.get(&base) {
            Some(s) => s.clone(),
            None => {
                let s = weaver_checkpoint::CkptStore::open_with_options(
                    &base,
                    self.options.iter().map(|(k, v)| (k.as_str(), v.clone())),
                )
                .map_err(|e| bad(e.to_string()))?
                .object_store()
                .clone();
                open.insert(base, s.clone());
                s
            }
        };
        Ok(Location::Remote { store, path })
    }

    fn list_folder(&self, key: &str, spec: &str) -> Result<Vec<String>> {
        let read_err = |message: String| DataError::Read {
            url: spec.to_string(),
            message,
        };
        let mut names = match self.locate(spec.trim_end_matches('/'))? {
            Location::Local(dir) => {
                let rd = std::fs::read_dir(&dir).map_err(|e| read_err(e.to_string()))?;
                let mut out = Vec::new();
                for e in rd {
                    let p = e.map_err(|e| read_err(e.to_string()))?.path();
                    if p.extension().is_some_and(|x| x == "tar") && p.is_file() {
                        out.push(p.to_string_lossy().into_owned());
                    }
                }
                out
            }
            Location::Remote { store, path } => {
                let base = spec.trim_end_matches('/').to_string();
                let prefix = path.clone();
                let metas: Vec<object_store::ObjectMeta> = runtime()?
                    .block_on(async move {
                        store
                            .list(Some(&prefix))
                            .collect::<Vec<_>>()
                            .await
                            .into_iter()
                            .collect::<std::result::Result<Vec<_>, _>>()
                    })
                    .map_err(|e| read_err(e.to_string()))?;
                let plen = path.as_ref().len();
                metas
                    .into_iter()
                    .map(|m| {
                        m.location.as_ref()[plen..]
                            .trim_start_matches('/')
                            .to_string()
                    })
                    .filter(|rel| rel.ends_with(".tar") && !rel.contains('/'))
                    .map(|rel| format!("{base}/{rel}"))
                    .collect()
            }
        };
        names.sort();
        if names.is_empty() {
            return Err(DataError::NoShards {
                key: key.into(),
                spec: spec.into(),
                message: "the folder holds no .tar files".into(),
            });
        }
        Ok(names)
    }

    fn read_small(&self, url: &str) -> Result<Vec<u8>> {
        let err = |message: String| DataError::Read {
            url: url.to_string(),
            message,
        };
        match self.locate(url)? {
            Location::Local(p) => std::fs::read(&p).map_err(|e| err(e.to_string())),
            Location::Remote { store, path } => runtime()?
                .block_on(async move { store.get(&path).await?.bytes().await })
                .map(|b| b.to_vec())
                .map_err(|e| err(e.to_string())),
        }
    }

    /// Expands `spec` (the value of config key `key`) into its shards, in order.
    pub fn expand(&self, key: &str, spec: &str) -> Result<Vec<Shard>> {
        let urls = self.expand_urls(key, spec)?;
        urls.into_iter()
            .map(|url| {
                Ok(Shard {
                    location: self.locate(&url)?,
                    url,
                })
            })
            .collect()
    }

    fn expand_urls(&self, key: &str, spec: &str) -> Result<Vec<String>> {
        let spec = spec.trim();
        let none = |message: &str| DataError::NoShards {
            key: key.into(),
            spec: spec.into(),
            message: message.into(),
        };
        if spec.is_empty() {
            return Err(none("empty; give a brace pattern, a list file or a folder"));
        }
        let mut out = Vec::new();
        for part in spec.split("::").map(str::trim).filter(|p| !p.is_empty()) {
            if part.ends_with(".txt") || part.ends_with(".list") {
                let text =
                    String::from_utf8(self.read_small(part)?).map_err(|_| DataError::Read {
                        url: part.into(),
                        message: "the list file is not UTF-8".into(),
                    })?;
                let dir = match part.rfind('/') {
                    Some(i) => &part[..i + 1],
                    None => "",
                };
                for line in text.lines().map(str::trim) {
                    if line.is_empty() || line.starts_with('#') {
                        continue;
                    }
                    let absolute = line.contains("://") || line.starts_with('/');
                    let full = if absolute {
                        line.to_string()
                    } else {
                        format!("{dir}{line}")
                    };
                    out.extend(brace_expand(&full).map_err(|m| DataError::BadConfig {
                        key: key.into(),
                        message: format!("{part}: {line:?}: {m}"),
                    })?);
                }
            } else if part.ends_with('/')
                || (!part.contains("://") && std::path::Path::new(part).is_dir())
            {
                out.extend(self.list_folder(key, part)?);
            } else {
                out.extend(brace_expand(part).map_err(|m| DataError::BadConfig {
                    key: key.into(),
                    message: format!("{part:?}: {m}"),
                })?);
            }
        }
        if out.is_empty() {
            return Err(none("the list is empty"));
        }
        Ok(out)
    }
}

/// Expands `{a..b}` ranges (zero padding kept when either end has it) and `{x,y}` lists, as
/// Python's `braceexpand`; nested braces work. An unbalanced brace or a bad range is an
/// error.
pub fn brace_expand(s: &str) -> std::result::Result<Vec<String>, String> {
    let Some(open) = s.find('{') else {
        if s.contains('}') {
            return Err("unbalanced '}'".into());
        }
        return Ok(vec![s.to_string()]);
    };
    let mut depth = 0;
    let mut close = None;
    let mut commas = Vec::new();
    for (i, c) in s[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    close = Some(open + i);
                    break;
                }
            }
            ',' if depth == 1 => commas.push(open + i),
            _ => {}
        }
    }
    let close = close.ok_or("unbalanced '{'")?;
    let (head, body, tail) = (&s[..open], &s[open + 1..close], &s[close + 1..]);
    let alternatives: Vec<String> = if commas.is_empty() {
        match body.split_once("..") {
            Some((a, b)) => {
                let (x, y) = (
                    a.parse::<u64>()
                        .map_err(|_| format!("bad range start {a:?}"))?,
                    b.parse::<u64>()
                        .map_err(|_| format!("bad range end {b:?}"))?,
                );
                let width = if a.starts_with('0') || b.starts_with('0') {
                    a.len().max(b.len())
                } else {
                    0
                };
                if y < x {
                    return Err(format!("empty range {{{body}}}"));
                }
                if y - x > 10_000_000 {
                    return Err(format!("range {{{body}}} is too large"));
                }
                (x..=y).map(|v| format!("{v:0width$}")).collect()
            }
            None => vec![format!("{{{body}}}")],
        }
    } else {
        let mut parts = Vec::new();
        let mut start = open + 1;
        for &c in &commas {
            parts.push(s[start..c].to_string());
            start = c + 1;
        }
        parts.push(s[start..close].to_string());
        parts
    };
    let mut out = Vec::new();
    for alt in alternatives {
        for rest in brace_expand(&format!("{alt}{tail}"))? {
            out.push(format!("{head}{rest}"));
        }
    }
    Ok(out)
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// The data loader's I/O runtime (two threads, `weaver-data-io`), started on first use.
pub fn runtime() -> Result<&'static Runtime> {
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("weaver-data-io")
        .enable_all()
        .build()
        .map_err(|e| DataError::io("tokio runtime", e))?;
    let _ = RUNTIME.set(rt);
    RUNTIME
        .get()
        .ok_or_else(|| DataError::Loader("no I/O runtime".into()))
}

/// How persistent a reader is.
#[derive(Debug, Clone, Copy)]
pub struct ReadPolicy {
    /// Retries of a failed open or read before the shard is given up.
    pub retries: u32,
    /// First backoff; doubled after each retry.
    pub backoff: Duration,
    /// Longest wait for the next bytes.
    pub timeout: Duration,
}

/// A shard's bytes from an offset on, as a [`Read`], downloaded as it is read.
pub struct ShardReader {
    url: String,
    policy: ReadPolicy,
    inner: Inner,
}

impl std::fmt::Debug for ShardReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardReader")
            .field("url", &self.url)
            .finish()
    }
}

enum Inner {
    Local(io::BufReader<std::fs::File>),
    Remote {
        store: Arc<dyn ObjectStore>,
        path: StorePath,
        /// Next byte of the object to deliver.
        at: u64,
        body: Option<BoxStream<'static, object_store::Result<Bytes>>>,
        chunk: Bytes,
        /// The whole object has been delivered.
        finished: bool,
    },
}

impl ShardReader {
    /// Opens `shard` at byte `offset`, retrying per `policy`.
    pub fn open(shard: &Shard, offset: u64, policy: ReadPolicy) -> Result<ShardReader> {
        let read_err = |message: String| DataError::Read {
            url: shard.url.clone(),
            message,
        };
        let inner = match &shard.location {
            Location::Local(p) => {
                let mut last = String::new();
                let mut file = None;
                for attempt in 0..=policy.retries {
                    match std::fs::File::open(p) {
                        Ok(f) => {
                            file = Some(f);
                            break;
                        }
                        Err(e) => {
                            last = e.to_string();
                            if attempt < policy.retries {
                                let wait = policy.backoff * 2u32.pow(attempt.min(16));
                                warn!(shard = %shard.url, attempt = attempt + 1, error = %e, "cannot open shard; retrying in {wait:?}");
                                std::thread::sleep(wait);
                            }
                        }
                    }
                }
                let mut f = file.ok_or_else(|| read_err(last))?;
                if offset > 0 {
                    use std::io::Seek;
                    f.seek(io::SeekFrom::Start(offset))
                        .map_err(|e| read_err(e.to_string()))?;
                }
                Inner::Local(io::BufReader::with_capacity(256 << 10, f))
            }
            Location::Remote { store, path } => Inner::Remote {
                store: store.clone(),
                path: path.clone(),
                at: offset,
                body: None,
                chunk: Bytes::new(),
                finished: false,
            },
        };
        let mut r = ShardReader {
            url: shard.url.clone(),
            policy,
            inner,
        };
        if matches!(r.inner, Inner::Remote { .. }) {
            // Open now, so that a missing shard fails here rather than mid-parse.
            r.refill().map_err(|e| read_err(e.to_string()))?;
        }
        Ok(r)
    }

    /// Bytes of a remote shard fetched from the store so far (delivered or buffered);
    /// `None` for local files.
    pub fn fetched(&self) -> Option<u64> {
        match &self.inner {
            Inner::Remote { at, .. } => Some(*at),
            Inner::Local(_) => None,
        }
    }

    /// Fetches the next chunk of a remote shard (re-issuing the GET from the current byte
    /// after a failure); leaves an empty chunk at the end of the object.
    fn refill(&mut self) -> io::Result<()> {
        let Inner::Remote {
            store,
            path,
            at,
            body,
            chunk,
            finished,
        } = &mut self.inner
        else {
            return Ok(());
        };
        let rt = runtime().map_err(|e| io::Error::other(e.to_string()))?;
        let mut attempt = 0u32;
        loop {
            let result: std::result::Result<Option<Bytes>, String> = rt.block_on(async {
                if body.is_none() {
                    let opts = GetOptions {
                        range: (*at > 0).then_some(GetRange::Offset(*at)),
                        ..Default::default()
                    };
                    match tokio::time::timeout(self.policy.timeout, store.get_opts(path, opts))
                        .await
                    {
                        Err(_) => {
                            return Err(format!("no answer within {:?}", self.policy.timeout))
                        }
                        Ok(Err(e)) => return Err(e.to_string()),
                        Ok(Ok(r)) => *body = Some(r.into_stream()),
                    }
                }
                let Some(b) = body.as_mut() else {
                    return Err("no body".into());
                };
                match tokio::time::timeout(self.policy.timeout, b.next()).await {
                    Err(_) => Err(format!("no data within {:?}", self.policy.timeout)),
                    Ok(None) => Ok(None),
                    Ok(Some(Err(e))) => Err(e.to_string()),
                    Ok(Some(Ok(bytes))) => Ok(Some(bytes)),
                }
            });
            match result {
                Ok(Some(bytes)) => {
                    *at += bytes.len() as u64;
                    *chunk = bytes;
                    return Ok(());
                }
                Ok(None) => {
                    *chunk = Bytes::new();
                    *finished = true;
                    return Ok(());
                }
                Err(e) => {
                    *body = None;
                    if attempt >= self.policy.retries {
                        return Err(io::Error::other(format!(
                            "{e} (after {} retries, at byte {at})",
                            self.policy.retries
                        )));
                    }
                    let wait = self.policy.backoff * 2u32.pow(attempt.min(16));
                    warn!(shard = %self.url, byte = *at, attempt = attempt + 1, error = %e, "shard read failed; retrying in {wait:?}");
                    std::thread::sleep(wait);
                    attempt += 1;
                }
            }
        }
    }
}

impl Read for ShardReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match &mut self.inner {
                Inner::Local(f) => return f.read(buf),
                Inner::Remote {
                    chunk, finished, ..
                } => {
                    if !chunk.is_empty() {
                        let n = chunk.len().min(buf.len());
                        buf[..n].copy_from_slice(&chunk[..n]);
                        let _ = chunk.split_to(n);
                        return Ok(n);
                    }
                    if *finished {
                        return Ok(0);
                    }
                }
            }
            self.refill()?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braces_expand_as_braceexpand() {
        assert_eq!(
            brace_expand("s3://b/t-{000..002}.tar").unwrap(),
            vec!["s3://b/t-000.tar", "s3://b/t-001.tar", "s3://b/t-002.tar"]
        );
        assert_eq!(
            brace_expand("a{1,2}{x,y}").unwrap(),
            vec!["a1x", "a1y", "a2x", "a2y"]
        );
        assert_eq!(
            brace_expand("d/{8..10}.tar").unwrap(),
            vec!["d/8.tar", "d/9.tar", "d/10.tar"]
        );
        assert!(brace_expand("a{1..").is_err());
        assert!(brace_expand("a{x..3}").is_err());
        assert!(brace_expand("a}").is_err());
    }

    #[test]
    fn lists_folders_and_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        for n in ["b.tar", "a.tar", "notes.md"] {
            std::fs::write(dir.path().join(n), b"").unwrap();
        }
        let s = Stores::default();
        let d = dir.path().to_str().unwrap();
        let urls: Vec<String> = s
            .expand("data.shards", d)
            .unwrap()
            .into_iter()
            .map(|x| x.url)
            .collect();
        assert_eq!(urls, vec![format!("{d}/a.tar"), format!("{d}/b.tar")]);
        let list = dir.path().join("shards.txt");
        std::fs::write(&list, "# train\na.tar\n/x/{0..1}.tar\n\n").unwrap();
        let urls: Vec<String> = s
            .expand("data.shards", list.to_str().unwrap())
            .unwrap()
            .into_iter()
            .map(|x| x.url)
            .collect();
        assert_eq!(
            urls,
            vec![format!("{d}/a.tar"), "/x/0.tar".into(), "/x/1.tar".into()]
        );
        let empty = tempfile::tempdir().unwrap();
        match s.expand("data.eval_shards", empty.path().to_str().unwrap()) {
            Err(DataError::NoShards { key, .. }) => assert_eq!(key, "data.eval_shards"),
            other => panic!("{other:?}"),
        }
        match s.expand("data.shards", "x/{1..") {
            Err(DataError::BadConfig { key, .. }) => assert_eq!(key, "data.shards"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            s.expand("data.shards", " "),
            Err(DataError::NoShards { .. })
        ));
    }
}
