//! The local-disk store: object_store's `LocalFileSystem` (fsync on) with its multipart
//! upload replaced by one that starts disk writeback as each part lands
//! (`sync_file_range(SYNC_FILE_RANGE_WRITE)` on Linux) instead of leaving the whole file dirty
//! until the final fsync. Writing the page cache and writing the disk then overlap; on this
//! project's machine that halved the time to make 1 GiB durable (0.7 s instead of 1.4–2 s).
//! Completion is as durable as LocalFileSystem's: fsync of the file, atomic rename into
//! place, fsync of the directory. Every other method is LocalFileSystem's.
//!
//! Staging files: every put writes `NAME#N` (N a number) next to its destination and
//! renames it into place when complete — LocalFileSystem's single puts and this module's
//! multipart uploads alike (the latter also hold an exclusive `flock` on it while they
//! live). LocalFileSystem's listings ignore such names and refuses them as object names, so
//! no committed object is ever called that. A put killed mid-way leaves its staging file
//! behind; [`sweep_staging`] deletes those that are older than a safe age and not locked by
//! a live upload ([`crate::CkptStore`] runs it when it opens a local location).

use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::FutureExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, UploadPart,
};

const STORE: &str = "weaver-local";

/// LocalFileSystem with early-writeback multipart uploads.
#[derive(Debug)]
pub(crate) struct WritebackLocal {
    inner: LocalFileSystem,
}

impl WritebackLocal {
    pub(crate) fn new() -> WritebackLocal {
        WritebackLocal {
            inner: LocalFileSystem::new().with_fsync(true),
        }
    }
}

impl fmt::Display for WritebackLocal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WritebackLocal({})", self.inner)
    }
}

fn generic(e: impl std::error::Error + Send + Sync + 'static) -> object_store::Error {
    object_store::Error::Generic {
        store: STORE,
        source: Box::new(e),
    }
}

/// fsync a directory, so that entries created or renamed in it are durable.
fn sync_dir(dir: &FsPath) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` and any missing ancestors, making each new entry durable.
fn create_dirs(dir: &FsPath) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut at = dir;
    while !at.exists() {
        missing.push(at.to_path_buf());
        match at.parent() {
            Some(p) => at = p,
            None => break,
        }
    }
    std::fs::create_dir_all(dir)?;
    // The first existing ancestor gained an entry, and so did each new directory but the last.
    sync_dir(at)?;
    for d in missing.iter().skip(1) {
        sync_dir(d)?;
    }
    Ok(())
}

/// Asks the kernel to start writing `len` bytes at `offset` to disk now (no waiting).
fn start_writeback(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on an open descriptor; it only schedules I/O. Failure is
        // harmless (the final fsync writes everything anyway), so the result is ignored.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

/// Whether `name` (a file name) is a put's staging file: `NAME#N`, N all digits, with no
/// `#` in NAME — exactly the names LocalFileSystem refuses as object names and ignores in
/// listings, so that nothing this matches can be a committed object. (The staging file of
/// an object whose own name has a `#` is not recognised: it stays, and is listed.)
pub(crate) fn is_staging(name: &str) -> bool {
    match name.split_once('#') {
        Some((_, n)) => !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()),
        None => false,
    }
}

/// Creates a new staging file `DEST#N` (the first free N from 1, as LocalFileSystem
/// numbers them), with any missing directories; exclusively `flock`ed, so that
/// [`sweep_staging`] leaves it alone while this process lives, however long the upload
/// waits between parts.
fn create_staging(dest: &FsPath) -> std::io::Result<(File, PathBuf)> {
    if let Some(dir) = dest.parent() {
        create_dirs(dir)?;
    }
    let mut n = 1u64;
    loop {
        let mut name = dest.as_os_str().to_os_string();
        name.push(format!("#{n}"));
        let staging = PathBuf::from(name);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&staging)
        {
            Ok(file) => {
                // A file system without locks only loses the protection; the age rule of
                // the sweep still applies.
                let _ = try_lock(&file);
                return Ok((file, staging));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Takes an exclusive `flock` on `file` without waiting: `Ok(false)` when another open
/// file (any process's) holds one.
fn try_lock(file: &File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on an open descriptor.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.kind() == std::io::ErrorKind::WouldBlock {
        Ok(false)
    } else {
        Err(e)
    }
}

/// How deep [`sweep_staging`] looks below its directory: weaver writes objects at most two
/// levels down (`step-N/shard…`, `_progress/…`); the bound keeps a location pointed at a
/// large tree by mistake from being walked whole.
const SWEEP_DEPTH: usize = 4;

/// Deletes the staging files under `dir` (see the module docs) that were last written
/// more than `min_age` ago and that no live upload holds locked: what puts killed mid-way
/// left behind. Committed objects never have a staging name, so none is touched. Does not
/// follow symbolic links. Returns the files deleted; a missing `dir` has none.
pub(crate) fn sweep_staging(dir: &FsPath, min_age: Duration) -> std::io::Result<Vec<PathBuf>> {
    let mut deleted = Vec::new();
    sweep_dir(dir, min_age, SWEEP_DEPTH, &mut deleted)?;
    Ok(deleted)
}

fn sweep_dir(
    dir: &FsPath,
    min_age: Duration,
    depth: usize,
    deleted: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let kind = entry.file_type()?;
        let path = entry.path();
        if kind.is_dir() {
            if depth > 1 {
                sweep_dir(&path, min_age, depth - 1, deleted)?;
            }
            continue;
        }
        if !kind.is_file() || !is_staging(&entry.file_name().to_string_lossy()) {
            continue;
        }
        match sweep_file(&path, min_age) {
            Ok(true) => deleted.push(path),
            Ok(false) => {}
            // Gone meanwhile: renamed into place, or swept by another process.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Deletes the staging file `path` if it is older than `min_age` and unlocked.
fn sweep_file(path: &FsPath, min_age: Duration) -> std::io::Result<bool> {
    let modified = std::fs::symlink_metadata(path)?.modified()?;
    // A time in the future (clock skew between writers sharing the disk) counts as new.
    let old = SystemTime::now()
        .duration_since(modified)
        .is_ok_and(|age| age > min_age);
    if !old {
        return Ok(false);
    }
    let file = File::open(path)?;
    // Held: a live upload's. (Where the file system has no locks, the age alone decides.)
    if let Ok(false) = try_lock(&file) {
        return Ok(false);
    }
    std::fs::remove_file(path)?;
    Ok(true)
}

#[derive(Debug)]
struct Upload {
    file: Arc<File>,
    staging: PathBuf,
    dest: PathBuf,
    offset: u64,
    done: bool,
}

#[async_trait]
impl MultipartUpload for Upload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let start = self.offset;
        self.offset += data.content_length() as u64;
        let file = self.file.clone();
        let task = tokio::task::spawn_blocking(move || {
            let mut at = start;
            for chunk in data.iter() {
                file.write_all_at(chunk, at)?;
                at += chunk.len() as u64;
            }
            start_writeback(&file, start, at - start);
            Ok::<(), std::io::Error>(())
        });
        async move {
            match task.await {
                Ok(r) => r.map_err(generic),
                Err(e) => Err(generic(e)),
            }
        }
        .boxed()
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        let file = self.file.clone();
        let (staging, dest) = (self.staging.clone(), self.dest.clone());
        tokio::task::spawn_blocking(move || {
            file.sync_all()?;
            std::fs::rename(&staging, &dest)?;
            if let Some(dir) = dest.parent() {
                sync_dir(dir)?;
            }
            Ok::<(), std::io::Error>(())
        })
        .await
        .map_err(generic)?
        .map_err(generic)?;
        self.done = true;
        Ok(PutResult {
            e_tag: None,
            version: None,
            extensions: Default::default(),
        })
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.done = true;
        std::fs::remove_file(&self.staging).map_err(generic)
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.staging);
        }
    }
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl ObjectStore for WritebackLocal {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        if !opts.attributes.is_empty() {
            return self.inner.put_multipart_opts(location, opts).await;
        }
        let dest = self.inner.path_to_filesystem(location)?;
        let (file, staging) = tokio::task::spawn_blocking({
            let dest = dest.clone();
            move || create_staging(&dest)
        })
        .await
        .map_err(generic)?
        .map_err(generic)?;
        Ok(Box::new(Upload {
            file: Arc::new(file),
            staging,
            dest,
            offset: 0,
            done: false,
        }))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(
        &self,
        from: &Path,
        to: &Path,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::is_staging;

    #[test]
    fn staging_names_are_those_no_object_may_have() {
        for name in ["shard.safetensors#1", "latest#12", "MANIFEST.json#3"] {
            assert!(is_staging(name), "{name}");
        }
        for name in ["shard.safetensors", "notes#v2", "x#", "a#1#2", "#", "a#1x"] {
            assert!(!is_staging(name), "{name}");
        }
    }
}
