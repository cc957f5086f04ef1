//! The shard loader of one data-parallel rank: reader threads for the streams it owns, a
//! pool of decoding threads, and a builder thread that assembles whole step batches ahead of
//! the trainer (see [`crate::order`] for the order it reproduces).
//!
//! ```text
//!  reader(stream a) ─┐                 ┌─ worker ─┐
//!  reader(stream b) ─┼─ jobs (bounded) ┼─ worker ─┼─ results ─ builder ─ steps (bounded) ─ trainer
//!        ...         ┘                 └─  ...   ─┘   (reorders per stream, skips bad
//!                                                      samples, batches, positions)
//! ```
//!
//! A reader streams its shards (never a whole shard in memory), groups members into
//! samples, permutes each shuffle window and submits the samples in order, each with its
//! coordinates. Workers decode, crop, normalise and tokenise in any order; the builder puts
//! each stream's results back in order, so the batches do not depend on thread timing. A
//! stream holds at most a fixed number of samples between its reader and the trainer (a
//! permit per sample), which bounds memory and keeps every stream's reader just ahead.
//!
//! A bad sample (no image, an image that does not decode, no caption; with questions read,
//! no usable question/answer in its JSON member) is skipped and the
//! next sample of the same stream takes its place; its counts ride with the next good sample
//! so that a checkpoint's counters are exact. A shard that cannot be opened is retried with
//! backoff, then skipped with a warning; a stream that finds nothing readable in a whole
//! pass over the shards, or a rank whose bad fraction exceeds `data.max_bad_fraction`,
//! fails with a typed error.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError, Sender};
use tracing::{info, warn};
use weaver_models::objectives::{encode_qa, TextRows};
use weaver_models::tokenizer::{encode_padded, Tokenizer};

use crate::error::{DataError, Result};
use crate::image::{center_crop, decode_into, random_resized_crop, Normalizer, Resampler, Rgb};
use crate::order::{owned_streams, Order, StreamPosition};
use crate::sample::{BadSample, Fields, Grouper, QaFields, RawSample};
use crate::shards::{ReadPolicy, Shard, ShardReader};
use crate::tar::TarReader;

/// Samples a rank must have examined before the bad fraction is checked (a few bad samples
/// among the first dozen say little).
pub const MIN_SAMPLES_FOR_BAD_CHECK: u64 = 100;
/// Bad samples logged one by one; after that, one line every 1000.
const LOGGED_BAD: u64 = 100;

/// What a loader reads and how.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    /// The shards, in config order.
    pub shards: Vec<Shard>,
    /// Seed of the shard order, the shuffles and the crops.
    pub seed: u64,
    /// Logical streams (`data.streams`).
    pub streams: usize,
    /// Samples per in-shard shuffle window (`data.shuffle_buffer`).
    pub shuffle_buffer: usize,
    /// Which members hold the image and caption.
    pub fields: Fields,
    /// Which JSON fields hold each sample's question and answer, when they are read (VQA
    /// on shards); a sample without them is bad.
    pub qa: Option<QaFields>,
    /// Output image side.
    pub image_size: usize,
    /// Tokens per caption.
    pub text_len: usize,
    /// The tokenizer.
    pub tokenizer: Arc<dyn Tokenizer>,
    /// Random-resized crops (training) or centre crops (evaluation).
    pub train: bool,
    /// Decoding threads.
    pub workers: usize,
    /// Samples per step over all data-parallel ranks.
    pub global_batch: usize,
    /// Largest tolerated fraction of bad samples.
    pub max_bad_fraction: f64,
    /// Retries, backoff, timeout of shard reads.
    pub policy: ReadPolicy,
    /// Steps prepared ahead of the trainer.
    pub prefetch: usize,
}

/// This rank's place in the data-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DpRank {
    /// Data-parallel size.
    pub dp: usize,
    /// This rank's data-parallel coordinate.
    pub rank: usize,
}

/// Counters of this rank's streams, cumulative over the run (resumed runs included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DataStats {
    /// Good samples taken.
    pub samples: u64,
    /// Samples skipped for their image.
    pub bad_image: u64,
    /// Samples skipped for their caption.
    pub bad_caption: u64,
    /// Unreadable tar members.
    pub bad_members: u64,
    /// Shards skipped as unreadable.
    pub shards_skipped: u64,
    /// The lowest epoch any of this rank's streams is in.
    pub epoch: u64,
}

impl DataStats {
    /// Adds another rank's counters (the epoch is the lowest).
    pub fn merge(&mut self, o: &DataStats) {
        self.samples += o.samples;
        self.bad_image += o.bad_image;
        self.bad_caption += o.bad_caption;
        self.bad_members += o.bad_members;
        self.shards_skipped += o.shards_skipped;
        self.epoch = self.epoch.min(o.epoch);
    }
}

/// One step's samples for this rank, on the host (pinned when bound for CUDA).
#[derive(Debug)]
pub struct HostStep {
    /// `[n, 3, S, S]` float, CLIP-normalised.
    pub images: tch::Tensor,
    /// `[n, T]` int64.
    pub tokens: tch::Tensor,
    /// `[n]` int64: position of EOS in each row.
    pub eos: tch::Tensor,
    /// The samples' VQA rows (`[n, T]` input and targets), when questions are read.
    pub vqa: Option<TextRows>,
    /// The samples' keys, in batch order.
    pub keys: Vec<String>,
    /// Positions of this rank's streams after this step.
    pub positions: Vec<(usize, StreamPosition)>,
    /// Counters after this step.
    pub stats: DataStats,
}

/// Where a sample was read.
#[derive(Debug, Clone, Copy)]
struct Coords {
    /// Global shard position.
    g: u64,
    /// The stream's shard ordinal.
    k: u64,
    /// Index in the shard, shuffled order.
    sample: u64,
    /// Byte offset of the sample's window.
    window_offset: u64,
    /// Byte offset of the next window.
    next_window_offset: u64,
}

#[derive(Debug)]
struct Job {
    slot: usize,
    seq: u64,
    shard: usize,
    coords: Coords,
    raw: RawSample,
    lost_members: u64,
    shards_skipped: u64,
}

#[derive(Debug)]
struct Decoded {
    /// The crop, `S × S × 3` bytes of RGB: the builder normalises it into the batch (a
    /// quarter of the bytes of floats between the threads, and one pass fewer).
    image: Vec<u8>,
    tokens: Vec<i64>,
    eos: i64,
    /// The VQA row (input, targets), when questions are read.
    qa: Option<(Vec<i64>, Vec<i64>)>,
}

#[derive(Debug)]
struct Done {
    slot: usize,
    seq: u64,
    shard: usize,
    coords: Coords,
    key: String,
    lost_members: u64,
    shards_skipped: u64,
    outcome: std::result::Result<Decoded, BadSample>,
}

#[derive(Debug)]
enum Work {
    Sample(Box<Job>),
    Fatal(DataError),
}

#[derive(Debug)]
enum Outcome {
    Done(Box<Done>),
    Fatal(DataError),
}

/// A good sample waiting to be batched, with the counts of what was passed over before it.
#[derive(Debug)]
struct Ready {
    key: String,
    coords: Coords,
    decoded: Decoded,
    bad_image: u64,
    bad_caption: u64,
    lost_members: u64,
    shards_skipped: u64,
}

/// What readers, workers and the builder share.
#[derive(Debug)]
struct Shared {
    cfg: LoaderConfig,
    order: Order,
    normalizer: Normalizer,
    stop: AtomicBool,
}

/// Loads this rank's share of every step from WebDataset shards.
#[derive(Debug)]
pub struct ShardLoader {
    steps: Receiver<Result<HostStep>>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    wait: Duration,
    /// Positions after the last step handed out.
    positions: Vec<(usize, StreamPosition)>,
    stats: DataStats,
}

impl ShardLoader {
    /// Starts the threads of data-parallel rank `rank`, its streams continuing from
    /// `positions` (a stream missing there starts at the beginning). `pin` pins the step
    /// tensors for copies to that CUDA device.
    pub fn start(
        cfg: LoaderConfig,
        rank: DpRank,
        positions: &HashMap<usize, StreamPosition>,
        pin: Option<tch::Device>,
    ) -> Result<ShardLoader> {
        crate::order::check_layout(cfg.streams, rank.dp, cfg.global_batch)?;
        if cfg.workers == 0 {
            return Err(DataError::config("data.workers", "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&cfg.max_bad_fraction) {
            return Err(DataError::config(
                "data.max_bad_fraction",
                "must lie in [0, 1]",
            ));
        }
        let order = Order::new(cfg.seed, cfg.shards.len(), cfg.streams, cfg.shuffle_buffer)?;
        let mine: Vec<usize> = owned_streams(cfg.streams, rank.dp, rank.rank).collect();
        let per_stream = cfg.global_batch / cfg.streams;
        let prefetch = cfg.prefetch.max(1);
        let workers = cfg.workers;
        let wait = cfg.policy.timeout * (cfg.policy.retries + 2) + Duration::from_secs(60);
        let shared = Arc::new(Shared {
            cfg,
            order,
            normalizer: Normalizer::clip(),
            stop: AtomicBool::new(false),
        });
        let (job_tx, job_rx) = bounded::<Work>(workers * 4);
        let (res_tx, res_rx) = unbounded::<Outcome>();
        let (step_tx, step_rx) = bounded::<Result<HostStep>>(prefetch);
        let mut threads = Vec::new();
        let mut permit_txs = Vec::new();
        let mut start_pos = Vec::new();
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name)
                .spawn(f)
                .map_err(|e| DataError::Loader(format!("cannot start a thread: {e}")))
        };
        for (slot, &stream) in mine.iter().enumerate() {
            let pos = positions.get(&stream).copied().unwrap_or_default();
            start_pos.push((stream, pos));
            // Samples a stream may hold between its reader and the trainer.
            let permits = per_stream * (prefetch + 1) + 2;
            let (ptx, prx) = bounded::<()>(permits);
            for _ in 0..permits {
                let _ = ptx.send(());
            }
            permit_txs.push(ptx);
            let (sh, tx) = (shared.clone(), job_tx.clone());
            threads.push(spawn(
                format!("weaver-data-read-{stream}"),
                Box::new(move || read_stream(&sh, slot, stream, pos, &prx, &tx)),
            )?);
        }
        drop(job_tx);
        for w in 0..workers {
            let (sh, rx, tx) = (shared.clone(), job_rx.clone(), res_tx.clone());
            threads.push(spawn(
                format!("weaver-data-decode-{w}"),
                Box::new(move || decode_worker(&sh, &rx, &tx)),
            )?);
        }
        drop(res_tx);
        let sh = shared.clone();
        let sp = start_pos.clone();
        threads.push(spawn(
            "weaver-data-batch".into(),
            Box::new(move || build_steps(&sh, sp, per_stream, &permit_txs, &res_rx, &step_tx, pin)),
        )?);
        info!(
            dp_rank = rank.rank,
            streams = ?mine,
            shards = shared.cfg.shards.len(),
            workers,
            per_stream,
            "data loader started"
        );
        let stats = sum_stats(&shared.order, &start_pos);
        Ok(ShardLoader {
            steps: step_rx,
            shared,
            threads,
            wait,
            positions: start_pos,
            stats,
        })
    }

    /// The next step's samples for this rank.
    pub fn next_step(&mut self) -> Result<HostStep> {
        let step = match self.steps.recv_timeout(self.wait) {
            Ok(s) => s?,
            Err(RecvTimeoutError::Timeout) => {
                return Err(DataError::Loader(format!(
                    "no batch within {:?}: the shards' store is stalled",
                    self.wait
                )))
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(DataError::Loader(
                    "the batching thread stopped (see the log for its error)".into(),
                ))
            }
        };
        self.positions = step.positions.clone();
        self.stats = step.stats;
        Ok(step)
    }

    /// Positions of this rank's streams after the last step returned.
    pub fn positions(&self) -> &[(usize, StreamPosition)] {
        &self.positions
    }

    /// Counters after the last step returned.
    pub fn stats(&self) -> DataStats {
        self.stats
    }
}

impl Drop for ShardLoader {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Threads notice within one poll interval; they are not joined here so that a
        // reader blocked on a slow store cannot hold up the trainer's exit.
        self.threads.clear();
    }
}

fn sum_stats(order: &Order, positions: &[(usize, StreamPosition)]) -> DataStats {
    let mut s = DataStats {
        epoch: u64::MAX,
        ..DataStats::default()
    };
    for (stream, p) in positions {
        s.merge(&DataStats {
            samples: p.taken,
            bad_image: p.bad_image,
            bad_caption: p.bad_caption,
            bad_members: p.bad_members,
            shards_skipped: p.shards_skipped,
            epoch: order.epoch_of(order.global(*stream, p.shard)),
        });
    }
    if s.epoch == u64::MAX {
        s.epoch = 0;
    }
    s
}

const POLL: Duration = Duration::from_millis(100);

/// Sends with a periodic check of the stop flag; false when stopping or disconnected.
fn send_until_stopped<T>(tx: &Sender<T>, mut v: T, stop: &AtomicBool) -> bool {
    loop {
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        match tx.send_timeout(v, POLL) {
            Ok(()) => return true,
            Err(crossbeam_channel::SendTimeoutError::Timeout(back)) => v = back,
            Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => return false,
        }
    }
}

fn acquire(permits: &Receiver<()>, stop: &AtomicBool) -> bool {
    loop {
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        match permits.recv_timeout(POLL) {
            Ok(()) => return true,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return false,
        }
    }
}

/// One stream's reader: its shards in order from `start`, window by window.
fn read_stream(
    sh: &Shared,
    slot: usize,
    stream: usize,
    start: StreamPosition,
    permits: &Receiver<()>,
    jobs: &Sender<Work>,
) {
    let order = &sh.order;
    let w_len = order.window();
    let mut k = start.shard;
    let mut resume = Some((start.sample, start.offset));
    let mut perm: (u64, Vec<usize>) = (u64::MAX, Vec::new());
    let (mut lost, mut skipped) = (0u64, 0u64);
    let mut empty_in_row = 0u64;
    let mut seq = 0u64;
    let mut last_failure = String::new();
    loop {
        if sh.stop.load(Ordering::SeqCst) {
            return;
        }
        let g = order.global(stream, k);
        let epoch = order.epoch_of(g);
        if perm.0 != epoch {
            perm = (epoch, order.epoch_permutation(epoch));
        }
        let shard_idx = order.shard_at(g, &perm.1);
        let shard = &sh.cfg.shards[shard_idx];
        let (skip_to, offset) = resume.take().unwrap_or((0, 0));
        let w0 = skip_to / w_len;
        let mut emitted = 0u64;
        match ShardReader::open(shard, offset, sh.cfg.policy) {
            Err(e) => {
                warn!(shard = %shard.url, stream, error = %e, "skipping a shard that cannot be read");
                last_failure = e.to_string();
                skipped += 1;
            }
            Ok(reader) => {
                let mut grouper = Grouper::new(TarReader::new(reader, offset));
                let mut window_start = offset;
                if offset == 0 && w0 > 0 {
                    // No byte offset recorded: pass over the consumed windows.
                    for _ in 0..w0 * w_len {
                        match grouper.next() {
                            Some(s) => window_start = s.end,
                            None => break,
                        }
                    }
                }
                let mut w = w0;
                loop {
                    let mut win: Vec<Option<RawSample>> = Vec::with_capacity(w_len as usize);
                    while (win.len() as u64) < w_len {
                        match grouper.next() {
                            Some(s) => win.push(Some(s)),
                            None => break,
                        }
                    }
                    if win.is_empty() {
                        break;
                    }
                    let next_start = win
                        .last()
                        .and_then(|s| s.as_ref())
                        .map_or(window_start, |s| s.end);
                    let p = order.window_permutation(g, w, win.len());
                    let skip = if w == w0 {
                        (skip_to - w0 * w_len) as usize
                    } else {
                        0
                    };
                    let full = win.len() as u64 == w_len;
                    for (i, &src) in p.iter().enumerate() {
                        let Some(raw) = win[src].take() else { continue };
                        if i < skip {
                            continue;
                        }
                        if !acquire(permits, &sh.stop) {
                            return;
                        }
                        let job = Job {
                            slot,
                            seq,
                            shard: shard_idx,
                            coords: Coords {
                                g,
                                k,
                                sample: w * w_len + i as u64,
                                window_offset: window_start,
                                next_window_offset: next_start,
                            },
                            lost_members: std::mem::take(&mut lost) + u64::from(raw.lost_members),
                            shards_skipped: std::mem::take(&mut skipped),
                            raw,
                        };
                        seq += 1;
                        emitted += 1;
                        if !send_until_stopped(jobs, Work::Sample(Box::new(job)), &sh.stop) {
                            return;
                        }
                    }
                    window_start = next_start;
                    w += 1;
                    if !full {
                        break;
                    }
                }
                if let Some(e) = &grouper.failure {
                    warn!(shard = %shard.url, stream, error = %e, "shard ended early; the rest of it is skipped");
                    last_failure = e.to_string();
                }
                lost += u64::from(grouper.take_lost());
            }
        }
        if emitted > 0 || skip_to > 0 {
            empty_in_row = 0;
        } else {
            empty_in_row += 1;
            if empty_in_row > order.shards() as u64 {
                let _ = send_until_stopped(
                    jobs,
                    Work::Fatal(DataError::NoReadableShards {
                        stream,
                        tried: empty_in_row,
                        last: last_failure.clone(),
                    }),
                    &sh.stop,
                );
                return;
            }
        }
        k += 1;
    }
}

/// A decoding thread's buffers, kept from sample to sample.
struct Scratch {
    resampler: Resampler,
    rgb: Rgb,
}

fn decode_worker(sh: &Shared, jobs: &Receiver<Work>, out: &Sender<Outcome>) {
    let mut scratch = Scratch {
        resampler: Resampler::new(),
        rgb: Rgb {
            width: 0,
            height: 0,
            pixels: Vec::new(),
        },
    };
    loop {
        if sh.stop.load(Ordering::SeqCst) {
            return;
        }
        let work = match jobs.recv_timeout(POLL) {
            Ok(w) => w,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let outcome = match work {
            Work::Fatal(e) => Outcome::Fatal(e),
            Work::Sample(job) => {
                let job = *job;
                let outcome = decode_sample(sh, &mut scratch, &job);
                Outcome::Done(Box::new(Done {
                    slot: job.slot,
                    seq: job.seq,
                    shard: job.shard,
                    coords: job.coords,
                    key: job.raw.key,
                    lost_members: job.lost_members,
                    shards_skipped: job.shards_skipped,
                    outcome,
                }))
            }
        };
        if out.send(outcome).is_err() {
            return;
        }
    }
}

fn decode_sample(
    sh: &Shared,
    scratch: &mut Scratch,
    job: &Job,
) -> std::result::Result<Decoded, BadSample> {
    let cfg = &sh.cfg;
    let caption = cfg.fields.caption(&job.raw)?;
    let bytes = cfg.fields.image(&job.raw)?;
    let img = &mut scratch.rgb;
    decode_into(bytes, img).map_err(BadSample::Image)?;
    let crop = if cfg.train {
        random_resized_crop(
            img.width,
            img.height,
            &mut sh.order.crop_rng(job.coords.g, job.coords.sample),
        )
    } else {
        center_crop(img.width, img.height)
    };
    let s = cfg.image_size;
    let mut image = vec![0u8; 3 * s * s];
    scratch
        .resampler
        .crop_resize(img, crop, s, &mut image)
        .map_err(BadSample::Image)?;
    let tok = cfg.tokenizer.as_ref();
    let tokens = encode_padded(tok, &caption, cfg.text_len)
        .map_err(|e| BadSample::Caption(e.to_string()))?;
    let eos = tokens
        .iter()
        .position(|&t| t == tok.eos_id())
        .unwrap_or(cfg.text_len.saturating_sub(1)) as i64;
    let qa = match &cfg.qa {
        None => None,
        Some(fields) => {
            let (q, a) = fields.read(&job.raw)?;
            Some(
                encode_qa(tok, &q, &a, cfg.text_len)
                    .map_err(|e| BadSample::Question(e.to_string()))?,
            )
        }
    };
    Ok(Decoded {
        image,
        tokens,
        eos,
        qa,
    })
}

/// Per-stream state of the builder.
#[derive(Debug, Default)]
struct Slot {
    next_seq: u64,
    pending: BTreeMap<u64, Done>,
    ready: VecDeque<Ready>,
    /// Counts passed over since the last good sample (bad samples, and what they carried).
    bad_image: u64,
    bad_caption: u64,
    lost_members: u64,
    shards_skipped: u64,
}

fn build_steps(
    sh: &Shared,
    start: Vec<(usize, StreamPosition)>,
    per_stream: usize,
    permits: &[Sender<()>],
    results: &Receiver<Outcome>,
    steps: &Sender<Result<HostStep>>,
    pin: Option<tch::Device>,
) {
    let mut positions = start;
    let mut slots: Vec<Slot> = positions.iter().map(|_| Slot::default()).collect();
    let mut per_shard: HashMap<usize, (u64, u64)> = HashMap::new();
    let mut logged = 0u64;
    loop {
        if sh.stop.load(Ordering::SeqCst) {
            return;
        }
        if slots.iter().all(|s| s.ready.len() >= per_stream) {
            let step = assemble(sh, &mut slots, &mut positions, per_stream, permits, pin);
            let step = step.and_then(|s| {
                check_bad(sh, &s.stats, &per_shard)?;
                Ok(s)
            });
            let failed = step.is_err();
            if !send_until_stopped(steps, step, &sh.stop) || failed {
                return;
            }
            continue;
        }
        let done = match results.recv_timeout(POLL) {
            Ok(Outcome::Done(d)) => *d,
            Ok(Outcome::Fatal(e)) => {
                let _ = send_until_stopped(steps, Err(e), &sh.stop);
                return;
            }
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => {
                let _ = send_until_stopped(
                    steps,
                    Err(DataError::Loader("the decoding threads stopped".into())),
                    &sh.stop,
                );
                return;
            }
        };
        let slot = &mut slots[done.slot];
        slot.pending.insert(done.seq, done);
        while let Some(d) = slot.pending.remove(&slot.next_seq) {
            slot.next_seq += 1;
            let entry = per_shard.entry(d.shard).or_default();
            entry.1 += 1;
            match d.outcome {
                Ok(decoded) => {
                    slot.ready.push_back(Ready {
                        key: d.key,
                        coords: d.coords,
                        decoded,
                        bad_image: std::mem::take(&mut slot.bad_image),
                        bad_caption: std::mem::take(&mut slot.bad_caption),
                        lost_members: std::mem::take(&mut slot.lost_members) + d.lost_members,
                        shards_skipped: std::mem::take(&mut slot.shards_skipped) + d.shards_skipped,
                    });
                }
                Err(bad) => {
                    entry.0 += 1;
                    match bad {
                        BadSample::Image(_) => slot.bad_image += 1,
                        BadSample::Caption(_) | BadSample::Question(_) => slot.bad_caption += 1,
                    }
                    logged += 1;
                    if logged <= LOGGED_BAD || logged.is_multiple_of(1000) {
                        warn!(
                            shard = %sh.cfg.shards[d.shard].url,
                            key = %d.key,
                            bad_so_far = logged,
                            "skipping a bad sample: {bad}"
                        );
                    }
                    // Its counts (and the lost members, skipped shards it carries) move to
                    // the next good sample, which is where a resumed run would count them.
                    slot.lost_members += d.lost_members;
                    slot.shards_skipped += d.shards_skipped;
                    let _ = permits[d.slot].try_send(());
                }
            }
        }
    }
}

fn assemble(
    sh: &Shared,
    slots: &mut [Slot],
    positions: &mut [(usize, StreamPosition)],
    per_stream: usize,
    permits: &[Sender<()>],
    pin: Option<tch::Device>,
) -> Result<HostStep> {
    let cfg = &sh.cfg;
    let w_len = sh.order.window();
    let n = per_stream * slots.len();
    let (s, t) = (cfg.image_size, cfg.text_len);
    let per_image = 3 * s * s;
    let mut images = tch::Tensor::f_empty(
        [n as i64, 3, s as i64, s as i64],
        (tch::Kind::Float, tch::Device::Cpu),
    )?;
    let normalizer = &sh.normalizer;
    let mut next_image = 0;
    let mut tokens = Vec::with_capacity(n * t);
    let mut eos = Vec::with_capacity(n);
    let (mut qa_input, mut qa_targets) = (Vec::new(), Vec::new());
    let mut keys = Vec::with_capacity(n);
    for (i, slot) in slots.iter_mut().enumerate() {
        let pos = &mut positions[i].1;
        for _ in 0..per_stream {
            let Some(r) = slot.ready.pop_front() else {
                return Err(DataError::Loader("a stream ran short of samples".into()));
            };
            let c = r.coords;
            pos.shard = c.k;
            pos.sample = c.sample + 1;
            pos.offset = if pos.sample.is_multiple_of(w_len) {
                c.next_window_offset
            } else {
                c.window_offset
            };
            pos.taken += 1;
            pos.bad_image += r.bad_image;
            pos.bad_caption += r.bad_caption;
            pos.bad_members += r.lost_members;
            pos.shards_skipped += r.shards_skipped;
            let dst = &mut batch_values(&mut images)[next_image * per_image..][..per_image];
            normalizer.write_chw(&r.decoded.image, dst);
            next_image += 1;
            tokens.extend_from_slice(&r.decoded.tokens);
            eos.push(r.decoded.eos);
            match (&cfg.qa, r.decoded.qa) {
                (None, _) => {}
                (Some(_), Some((input, targets))) => {
                    qa_input.extend_from_slice(&input);
                    qa_targets.extend_from_slice(&targets);
                }
                (Some(_), None) => {
                    return Err(DataError::Loader(format!(
                        "sample {} was decoded without its question",
                        r.key
                    )))
                }
            }
            keys.push(r.key);
            let _ = permits[i].try_send(());
        }
    }
    if next_image != n {
        return Err(DataError::Loader(format!(
            "a batch of {n} images got {next_image}"
        )));
    }
    let (n, t) = (n as i64, t as i64);
    let mut tokens = tch::Tensor::f_from_slice(&tokens)?.f_reshape([n, t])?;
    let mut eos = tch::Tensor::f_from_slice(&eos)?;
    let mut vqa = match cfg.qa {
        None => None,
        Some(_) => Some(TextRows {
            input: tch::Tensor::f_from_slice(&qa_input)?.f_reshape([n, t])?,
            targets: tch::Tensor::f_from_slice(&qa_targets)?.f_reshape([n, t])?,
        }),
    };
    if let Some(dev) = pin {
        images = images.f_pin_memory(dev)?;
        tokens = tokens.f_pin_memory(dev)?;
        eos = eos.f_pin_memory(dev)?;
        vqa = vqa
            .map(|r| -> Result<TextRows> {
                Ok(TextRows {
                    input: r.input.f_pin_memory(dev)?,
                    targets: r.targets.f_pin_memory(dev)?,
                })
            })
            .transpose()?;
    }
    Ok(HostStep {
        images,
        tokens,
        eos,
        vqa,
        keys,
        stats: sum_stats(&sh.order, positions),
        positions: positions.to_vec(),
    })
}

/// The values of `t`, a step's image batch made by `Tensor::empty` (a contiguous CPU `f32`
/// tensor nothing else refers to), to be written in place: the batch is filled once, with no
/// zeroing and no copy from a staging vector.
fn batch_values(t: &mut tch::Tensor) -> &mut [std::mem::MaybeUninit<f32>] {
    assert!(
        t.kind() == tch::Kind::Float && t.device() == tch::Device::Cpu && t.is_contiguous(),
        "batch_values: not a contiguous CPU f32 tensor"
    );
    let n = t.numel();
    // SAFETY: `t` is contiguous with `n` f32 elements starting at `data_ptr` (checked above),
    // the storage lives as long as `t`, which the returned slice borrows mutably, and no
    // other tensor shares it (it was just made by `empty` and has not been handed out).
    // `MaybeUninit` because `empty` leaves the memory uninitialised.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr().cast::<std::mem::MaybeUninit<f32>>(), n) }
}

fn check_bad(sh: &Shared, stats: &DataStats, per_shard: &HashMap<usize, (u64, u64)>) -> Result<()> {
    let bad = stats.bad_image + stats.bad_caption;
    let seen = stats.samples + bad;
    if seen < MIN_SAMPLES_FOR_BAD_CHECK || (bad as f64) <= sh.cfg.max_bad_fraction * seen as f64 {
        return Ok(());
    }
    let mut worst: Vec<(String, u64, u64)> = per_shard
        .iter()
        .filter(|(_, (b, _))| *b > 0)
        .map(|(&i, &(b, n))| (sh.cfg.shards[i].url.clone(), b, n))
        .collect();
    worst.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    worst.truncate(5);
    Err(DataError::TooManyBad {
        bad,
        seen,
        limit: sh.cfg.max_bad_fraction,
        worst,
    })
}
