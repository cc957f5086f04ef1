//! Shared test helpers: a byte-counting store wrapper, a simulated (dp, pp, tp) model layout,
//! and an S3 server started on loopback.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
};
use tch::{Device, Kind, Tensor};
use weaver_checkpoint::{
    block_on, commit, CkptStore, Layout, Manifest, SavedTensor, ShardWriter, SliceRequest,
    WriterOptions,
};

/// Counts what is read through it; forwards every method.
#[derive(Debug)]
pub struct CountingStore {
    inner: Arc<dyn ObjectStore>,
    pub bytes: AtomicU64,
    pub gets: AtomicU64,
    pub ranges: Mutex<Vec<(String, Range<u64>)>>,
}

impl CountingStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Arc<CountingStore> {
        Arc::new(CountingStore {
            inner,
            bytes: AtomicU64::new(0),
            gets: AtomicU64::new(0),
            ranges: Mutex::new(Vec::new()),
        })
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }

    pub fn reset(&self) {
        self.bytes.store(0, Ordering::SeqCst);
        self.gets.store(0, Ordering::SeqCst);
        self.ranges.lock().unwrap().clear();
    }
}

impl fmt::Display for CountingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Counting({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for CountingStore {
    async fn put_opts(
        &self,
        l: &Path,
        p: PutPayload,
        o: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.inner.put_opts(l, p, o).await
    }

    async fn put_multipart_opts(
        &self,
        l: &Path,
        o: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(l, o).await
    }

    async fn get_opts(&self, l: &Path, o: GetOptions) -> object_store::Result<GetResult> {
        let head = o.head;
        let r = self.inner.get_opts(l, o).await?;
        if !head {
            self.gets.fetch_add(1, Ordering::SeqCst);
            self.bytes
                .fetch_add(r.range.end - r.range.start, Ordering::SeqCst);
            self.ranges
                .lock()
                .unwrap()
                .push((l.to_string(), r.range.clone()));
        }
        Ok(r)
    }

    async fn get_ranges(
        &self,
        l: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<bytes::Bytes>> {
        let r = self.inner.get_ranges(l, ranges).await?;
        for x in ranges {
            self.gets.fetch_add(1, Ordering::SeqCst);
            self.bytes.fetch_add(x.end - x.start, Ordering::SeqCst);
            self.ranges.lock().unwrap().push((l.to_string(), x.clone()));
        }
        Ok(r)
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

    async fn copy_opts(&self, from: &Path, to: &Path, o: CopyOptions) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, o).await
    }

    async fn rename_opts(
        &self,
        from: &Path,
        to: &Path,
        o: RenameOptions,
    ) -> object_store::Result<()> {
        self.inner.rename_opts(from, to, o).await
    }
}

/// A global tensor of the simulated model and how layouts split it.
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: String,
    pub shape: Vec<u64>,
    pub kind: Kind,
    /// Dimension tensor parallelism splits (`None`: replicated over tp, tp rank 0 saves).
    pub tp_dim: Option<usize>,
    /// Pipeline stage as a fraction of the depth: layer index out of `LAYERS`.
    pub layer: usize,
    /// Optimizer state: additionally split over dp along dim 0 (ZeRO-1); parameters are
    /// saved by dp rank 0 only.
    pub dp_sharded: bool,
}

pub const LAYERS: usize = 4;

/// The model: 4 layers of column- and row-parallel weights, a replicated norm, an embedding
/// on the first stage and a head on the last, Adam moments sharded over dp.
pub fn model() -> Vec<Spec> {
    let mut v = Vec::new();
    let mut add = |name: String, shape: Vec<u64>, kind, tp_dim, layer, dp_sharded| {
        v.push(Spec {
            name,
            shape,
            kind,
            tp_dim,
            layer,
            dp_sharded,
        })
    };
    add(
        "embed".into(),
        vec![32, 8],
        Kind::BFloat16,
        Some(0),
        0,
        false,
    );
    add(
        "optim.exp_avg.embed".into(),
        vec![32, 8],
        Kind::Float,
        Some(0),
        0,
        true,
    );
    for i in 0..LAYERS {
        add(
            format!("layers.{i}.wq"),
            vec![16, 8],
            Kind::Float,
            Some(0),
            i,
            false,
        );
        add(
            format!("layers.{i}.wo"),
            vec![8, 16],
            Kind::Float,
            Some(1),
            i,
            false,
        );
        add(
            format!("layers.{i}.norm"),
            vec![8],
            Kind::Float,
            None,
            i,
            false,
        );
        add(
            format!("optim.exp_avg.layers.{i}.wq"),
            vec![16, 8],
            Kind::Float,
            Some(0),
            i,
            true,
        );
        add(
            format!("optim.exp_avg_sq.layers.{i}.wo"),
            vec![8, 16],
            Kind::Float,
            Some(1),
            i,
            true,
        );
        add(
            format!("optim.exp_avg.layers.{i}.norm"),
            vec![8],
            Kind::Float,
            None,
            i,
            true,
        );
    }
    add(
        "head.bias".into(),
        vec![32],
        Kind::Half,
        Some(0),
        LAYERS - 1,
        false,
    );
    v
}

/// Deterministic global values for every spec, plus the run's scalars.
pub fn globals(specs: &[Spec]) -> BTreeMap<String, Tensor> {
    tch::manual_seed(7);
    specs
        .iter()
        .map(|s| {
            let shape: Vec<i64> = s.shape.iter().map(|&d| d as i64).collect();
            let t = Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu)).to_kind(s.kind);
            (s.name.clone(), t)
        })
        .collect()
}

pub fn stage_of(layer: usize, pp: usize) -> usize {
    layer * pp / LAYERS
}

/// The slice (ranges) of `spec` that rank (dp, pp, tp) of layout `dims` owns, or `None`.
/// `for_save`: parameters only on dp rank 0 and replicated tensors only on tp rank 0 (what a
/// rank writes); otherwise what a rank needs to load (every dp rank loads the parameters).
pub fn owned(
    spec: &Spec,
    dims: (usize, usize, usize),
    coord: (usize, usize, usize),
    for_save: bool,
) -> Option<Vec<Range<u64>>> {
    let (dp, pp, tp) = dims;
    let (d, p, t) = coord;
    if stage_of(spec.layer, pp) != p {
        return None;
    }
    let mut ranges: Vec<Range<u64>> = spec.shape.iter().map(|&s| 0..s).collect();
    match spec.tp_dim {
        Some(dim) => {
            let n = spec.shape[dim] / tp as u64;
            ranges[dim] = t as u64 * n..(t as u64 + 1) * n;
        }
        None => {
            if for_save && t != 0 {
                return None;
            }
        }
    }
    if spec.dp_sharded {
        let r = ranges[0].clone();
        let n = (r.end - r.start) / dp as u64;
        ranges[0] = r.start + d as u64 * n..r.start + (d as u64 + 1) * n;
    } else if for_save && d != 0 {
        return None;
    }
    Some(ranges)
}

pub fn narrow(t: &Tensor, ranges: &[Range<u64>]) -> Tensor {
    let mut out = t.shallow_clone();
    for (d, r) in ranges.iter().enumerate() {
        out = out.narrow(d as i64, r.start as i64, (r.end - r.start) as i64);
    }
    out.contiguous()
}

pub fn coords(dims: (usize, usize, usize)) -> Vec<(usize, usize, usize)> {
    let (dp, pp, tp) = dims;
    let mut v = Vec::new();
    for d in 0..dp {
        for p in 0..pp {
            for t in 0..tp {
                v.push((d, p, t));
            }
        }
    }
    v
}

pub fn rank_of(dims: (usize, usize, usize), c: (usize, usize, usize)) -> usize {
    (c.0 * dims.1 + c.1) * dims.2 + c.2
}

/// Saves `globals` as layout `dims` would (every rank's shard, uploads overlapping), plus
/// `train.step` on rank 0 and one RNG row per rank, then commits.
pub fn save_layout(
    store: &CkptStore,
    step: u64,
    dims: (usize, usize, usize),
    specs: &[Spec],
    globals: &BTreeMap<String, Tensor>,
    options: WriterOptions,
) -> Manifest {
    let world = (dims.0 * dims.1 * dims.2) as u64;
    let writer = ShardWriter::new(store).with_options(options);
    let mut pending = Vec::new();
    for c in coords(dims) {
        let rank = rank_of(dims, c);
        let mut tensors = Vec::new();
        for s in specs {
            if let Some(r) = owned(s, dims, c, true) {
                let piece = narrow(&globals[&s.name], &r);
                tensors.push(SavedTensor::piece(
                    s.name.clone(),
                    piece,
                    s.shape.clone(),
                    r.iter().map(|x| x.start).collect(),
                ));
            }
        }
        if rank == 0 {
            tensors.push(SavedTensor::from_i64s("train.step", &[step as i64, 3]));
        }
        let row: Vec<u8> = (0..16)
            .map(|i| (rank as u8).wrapping_mul(31).wrapping_add(i))
            .collect();
        tensors.push(SavedTensor::piece(
            "rng",
            Tensor::from_slice(&row).reshape([1, 16]),
            vec![world, 16],
            vec![rank as u64, 0],
        ));
        pending.push(writer.start(step, rank, tensors).expect("start"));
    }
    let reports = pending
        .into_iter()
        .map(|p| p.wait().expect("upload"))
        .collect();
    block_on(commit(
        store,
        step,
        Layout::new(dims.0, dims.1, dims.2),
        reports,
    ))
    .expect("commit")
}

/// What rank `c` of layout `dims` loads, with the expected tensors.
pub fn load_requests(
    dims: (usize, usize, usize),
    c: (usize, usize, usize),
    specs: &[Spec],
    globals: &BTreeMap<String, Tensor>,
) -> (Vec<SliceRequest>, Vec<Tensor>) {
    let mut reqs = Vec::new();
    let mut want = Vec::new();
    for s in specs {
        if let Some(r) = owned(s, dims, c, false) {
            want.push(narrow(&globals[&s.name], &r));
            reqs.push(SliceRequest::new(s.name.clone(), r));
        }
    }
    (reqs, want)
}

/// An S3-protocol server (s3s-fs) on a free loopback port, killed on drop.
pub struct S3Server {
    child: std::process::Child,
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

pub const BUCKET: &str = "weaver";

impl S3Server {
    /// Starts the server found through `WEAVER_S3_SERVER`; panics with instructions when it
    /// is not installed (S3 tests must not skip silently).
    pub fn start() -> S3Server {
        use std::io::BufRead;
        let bin = std::env::var("WEAVER_S3_SERVER").unwrap_or_default();
        assert!(
            !bin.is_empty() && std::path::Path::new(&bin).is_file(),
            "WEAVER_S3_SERVER={bin:?} is not an S3 server binary. Install it and export its path with \
             `eval \"$(scripts/install-s3-server.sh)\"` (from the repository root), then rerun."
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(BUCKET)).unwrap();
        let mut child = std::process::Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args([
                "--access-key",
                "weaver-test",
                "--secret-key",
                "weaver-test-secret",
            ])
            .arg(dir.path())
            .env(
                "RUST_LOG",
                std::env::var("WEAVER_S3_RUST_LOG").unwrap_or_else(|_| "s3s_fs=info".into()),
            )
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        // The server binds port 0 and logs the address it got: read it from its output (no
        // fixed sleep, no port race), then keep draining the pipe so the server never blocks.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            // WEAVER_S3_LOG=FILE keeps the server's log for debugging.
            let mut log = std::env::var("WEAVER_S3_LOG")
                .ok()
                .and_then(|p| std::fs::File::create(p).ok());
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(f) = log.as_mut() {
                    use std::io::Write;
                    let _ = writeln!(f, "{line}");
                }
                if let Some(at) = line.find("server is running at http://") {
                    let addr = line[at + "server is running at ".len()..]
                        .trim()
                        .to_string();
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr);
                    }
                }
            }
        });
        let endpoint = match rx.recv_timeout(std::time::Duration::from_secs(30)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("{bin} did not report its address within 30 s");
            }
        };
        // Ready means accepting connections.
        let hostport = endpoint.trim_start_matches("http://").to_string();
        std::net::TcpStream::connect(&hostport).expect("S3 server accepts connections");
        S3Server {
            child,
            endpoint,
            _dir: dir,
        }
    }

    /// A checkpoint store at `s3://weaver/<prefix>` on this server.
    pub fn store(&self, prefix: &str) -> CkptStore {
        CkptStore::open_with_options(
            &format!("s3://{BUCKET}/{prefix}"),
            [
                ("aws_endpoint", self.endpoint.as_str()),
                ("aws_allow_http", "true"),
                ("aws_region", "us-east-1"),
                ("aws_access_key_id", "weaver-test"),
                ("aws_secret_access_key", "weaver-test-secret"),
            ],
        )
        .expect("s3 store")
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
