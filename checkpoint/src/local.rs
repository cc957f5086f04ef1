//! The local-disk store: object_store's `LocalFileSystem` (fsync on) with its multipart
//! upload replaced by one that starts disk writeback as each part lands
//! (`sync_file_range(SYNC_FILE_RANGE_WRITE)` on Linux) instead of leaving the whole file dirty
//! until the final fsync. Writing the page cache and writing the disk then overlap; on this
//! project's machine that halved the time to make 1 GiB durable (0.7 s instead of 1.4–2 s).
//! Completion is as durable as LocalFileSystem's: fsync of the file, atomic rename into
//! place, fsync of the directory. Every other method is LocalFileSystem's.

use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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

static STAGING: AtomicU64 = AtomicU64::new(0);

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
        let n = STAGING.fetch_add(1, Ordering::Relaxed);
        let mut name = dest.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".{}-{n}.partial", std::process::id()));
        let staging = dest.with_file_name(name);
        let open = {
            let (staging, dest) = (staging.clone(), dest.clone());
            move || {
                if let Some(dir) = dest.parent() {
                    create_dirs(dir)?;
                }
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&staging)
            }
        };
        let file = tokio::task::spawn_blocking(open)
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
