//! Behaviour on local disk: round trips, resharding with exact byte accounting, integrity
//! failures and fallbacks, commit and retention, export read by Python, the CLI functions.

mod common;

use common::*;
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};
use weaver_checkpoint::manifest::{shard_file, step_dir, MANIFEST_FILE};
use weaver_checkpoint::{
    block_on, cli, commit, ensure_unused, export, list, newest_committed, retain, Checkpoint,
    CheckpointError, CkptStore, Dtype, Layout, ReadOptions, SavedTensor, Selector, ShardWriter,
    Snapshotter, StepState, WriterOptions,
};

fn tmp() -> (tempfile::TempDir, CkptStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = CkptStore::open(dir.path().join("ckpt").to_str().unwrap()).unwrap();
    (dir, store)
}

fn small_blocks(crc_block: u64) -> WriterOptions {
    WriterOptions {
        crc_block,
        ..WriterOptions::default()
    }
}

fn save_one(
    store: &CkptStore,
    step: u64,
    tensors: Vec<SavedTensor>,
) -> weaver_checkpoint::Manifest {
    let report = ShardWriter::new(store)
        .start(step, 0, tensors)
        .unwrap()
        .wait()
        .unwrap();
    block_on(commit(store, step, Layout::new(1, 1, 1), vec![report])).unwrap()
}

fn simple(step: u64) -> Vec<SavedTensor> {
    vec![
        SavedTensor::whole(
            "w",
            Tensor::arange(64, (Kind::Float, Device::Cpu)).reshape([8, 8]) + step as f64,
        ),
        SavedTensor::from_i64s("train.step", &[step as i64]),
    ]
}

fn obj(store: &CkptStore, rel: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("{}/{rel}", store.url()))
}

#[test]
fn every_dtype_round_trips_and_shards_are_plain_safetensors() {
    let (_d, store) = tmp();
    tch::manual_seed(1);
    let base = Tensor::randn([3, 5, 7], (Kind::Float, Device::Cpu)) * 10.0;
    let mut tensors = Vec::new();
    let mut want = BTreeMap::new();
    for d in Dtype::ALL {
        let t = match d {
            Dtype::Bool => base.gt(0.0),
            _ => base.to_kind(d.kind()),
        };
        want.insert(d.as_str().to_string(), t.copy());
        tensors.push(SavedTensor::whole(d.as_str(), t));
    }
    // Scalars, empty tensors, non-contiguous input, raw bytes.
    tensors.push(SavedTensor::whole("scalar", Tensor::from(2.5f64)));
    tensors.push(SavedTensor::whole(
        "empty",
        Tensor::zeros([0, 4], (Kind::Float, Device::Cpu)),
    ));
    let nc = Tensor::arange(12, (Kind::Int64, Device::Cpu))
        .reshape([3, 4])
        .transpose(0, 1);
    tensors.push(SavedTensor::whole("noncontig", nc.copy()));
    tensors.push(SavedTensor::from_bytes("blob", b"rng state \x00\xff"));
    let meta = BTreeMap::from([("config".to_string(), "[train]\nsteps = 3\n".to_string())]);
    let report = ShardWriter::new(&store)
        .start_with_metadata(5, 0, tensors, meta.clone())
        .unwrap()
        .wait()
        .unwrap();
    let m = block_on(commit(&store, 5, Layout::new(1, 1, 1), vec![report])).unwrap();
    assert_eq!(m.shards[0].metadata["config"], meta["config"]);

    let ck = block_on(Checkpoint::open(&store, Selector::Latest)).unwrap();
    assert_eq!(ck.step(), 5);
    for (name, t) in &want {
        let got = block_on(ck.read_tensor(name)).unwrap();
        assert_eq!(got.kind(), t.kind(), "{name}");
        assert_eq!(got.size(), t.size(), "{name}");
        // Compare bit patterns (float8 has no equality kernel on every build).
        let a = got.view_dtype(Kind::Uint8);
        let b = t.view_dtype(Kind::Uint8);
        assert!(a.equal(&b), "{name}");
    }
    assert_eq!(
        f64::try_from(block_on(ck.read_tensor("scalar")).unwrap()).unwrap(),
        2.5
    );
    assert_eq!(
        block_on(ck.read_tensor("empty")).unwrap().size(),
        vec![0, 4]
    );
    assert!(block_on(ck.read_tensor("noncontig")).unwrap().equal(&nc));
    assert_eq!(
        block_on(ck.read_bytes("blob")).unwrap(),
        b"rng state \x00\xff"
    );
    // A slice of a middle dimension.
    let s = block_on(ck.read_slice("F32", &[1..3, 2..4, 0..7])).unwrap();
    assert!(s.equal(&want["F32"].narrow(0, 1, 2).narrow(1, 2, 2)));
    assert!(matches!(
        block_on(ck.read_slice("F32", &[0..4, 0..5, 0..7])),
        Err(CheckpointError::BadSlice { .. })
    ));
    assert!(matches!(
        block_on(ck.read_tensor("nope")),
        Err(CheckpointError::UnknownTensor { .. })
    ));

    // No staging files are left behind.
    let dir = obj(&store, &step_dir(5));
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}"); // MANIFEST.json and the shard
                                             // tch's own safetensors reader (safetensors 0.3, which predates float8) opens a shard.
    let plain: Vec<SavedTensor> = want
        .iter()
        .filter(|(n, _)| !n.starts_with("F8"))
        .map(|(n, t)| SavedTensor::whole(n.clone(), t.copy()))
        .collect();
    save_one(&store, 6, plain);
    let file = obj(&store, &format!("{}/{}", step_dir(6), shard_file(0)));
    let read = Tensor::read_safetensors(&file).unwrap();
    assert_eq!(read.len(), want.len() - 2);
    for (n, t) in read {
        assert!(t.equal(&want[&n]), "{n}");
    }
}

#[test]
fn snapshotter_reuses_buffers_and_isolates_from_later_updates() {
    let (_d, store) = tmp();
    let snap = Snapshotter::new();
    let mut w = Tensor::arange(1 << 16, (Kind::Float, Device::Cpu)).reshape([256, 256]);
    let b = Tensor::ones([7], (Kind::BFloat16, Device::Cpu));
    snap.reserve(&[&w, &b]).unwrap();
    assert_eq!(snap.free_buffers(), 2);
    let before = w.copy();
    let tensors = vec![snap.whole("w", &w).unwrap(), snap.whole("b", &b).unwrap()];
    assert_eq!(snap.free_buffers(), 0);
    let pending = ShardWriter::new(&store).start(1, 0, tensors).unwrap();
    // The training step goes on and updates the parameter in place.
    let _ = w.f_add_scalar_(1.0).unwrap();
    let report = pending.wait().unwrap();
    block_on(commit(&store, 1, Layout::new(1, 1, 1), vec![report])).unwrap();
    // Once durable, the buffers are back.
    assert_eq!(snap.free_buffers(), 2);
    let ck = block_on(Checkpoint::open(&store, Selector::Latest)).unwrap();
    assert!(block_on(ck.read_tensor("w")).unwrap().equal(&before));
    // A second save reuses them (no new buffers appear).
    let tensors = vec![snap.whole("w", &w).unwrap()];
    assert_eq!(snap.free_buffers(), 1);
    let report = ShardWriter::new(&store)
        .start(2, 0, tensors)
        .unwrap()
        .wait()
        .unwrap();
    block_on(commit(&store, 2, Layout::new(1, 1, 1), vec![report])).unwrap();
    assert_eq!(snap.free_buffers(), 2);
    let ck = block_on(Checkpoint::open(&store, Selector::Latest)).unwrap();
    assert!(block_on(ck.read_tensor("w")).unwrap().equal(&w));
}

#[test]
fn writer_refuses_what_it_cannot_save() {
    let (_d, store) = tmp();
    let w = ShardWriter::new(&store);
    let t = || Tensor::zeros([2, 2], (Kind::Float, Device::Cpu));
    let dup = w.start(
        1,
        0,
        vec![SavedTensor::whole("a", t()), SavedTensor::whole("a", t())],
    );
    assert!(matches!(dup, Err(CheckpointError::BadTensor { ref tensor, .. }) if tensor == "a"));
    let outside = w.start(
        1,
        0,
        vec![SavedTensor::piece("a", t(), vec![3, 2], vec![2, 0])],
    );
    assert!(matches!(outside, Err(CheckpointError::BadTensor { .. })));
    let complex = w.start(
        1,
        0,
        vec![SavedTensor::whole("c", t().to_kind(Kind::ComplexFloat))],
    );
    assert!(matches!(complex, Err(CheckpointError::BadTensor { .. })));
}

#[test]
fn a_shard_may_hold_several_pieces_of_one_tensor() {
    // What a sharded optimizer writes: a contiguous range of a row-major tensor is several
    // boxes (a partial row, whole rows, a partial row), all in one rank's shard.
    let (_d, store) = tmp();
    let w = Tensor::arange(24, (Kind::Float, Device::Cpu)).reshape([4, 6]);
    let piece = |r: std::ops::Range<i64>, c: std::ops::Range<i64>| {
        let t = w
            .narrow(0, r.start, r.end - r.start)
            .narrow(1, c.start, c.end - c.start)
            .copy();
        SavedTensor::piece("w", t, vec![4, 6], vec![r.start as u64, c.start as u64])
    };
    // Rank 0: elements 2..19 of the flat tensor; rank 1 the rest.
    let mine = vec![piece(0..1, 2..6), piece(1..3, 0..6), piece(3..4, 0..1)];
    let theirs = vec![piece(0..1, 0..2), piece(3..4, 1..6)];
    let writer = ShardWriter::new(&store);
    let r0 = writer.start(5, 0, mine).unwrap().wait().unwrap();
    let r1 = writer.start(5, 1, theirs).unwrap().wait().unwrap();
    let m = block_on(commit(&store, 5, Layout::new(2, 1, 1), vec![r0, r1])).unwrap();
    assert_eq!(m.tensors["w"].pieces.len(), 5);
    let ck = block_on(Checkpoint::open(&store, Selector::Step(5))).unwrap();
    let whole = block_on(ck.read_slice("w", &[0..4, 0..6])).unwrap();
    assert!(whole.equal(&w));
    let part = block_on(ck.read_slice("w", &[1..4, 1..3])).unwrap();
    assert!(part.equal(&w.narrow(0, 1, 3).narrow(1, 1, 2)));
    let report = block_on(async { Ok::<_, CheckpointError>(ck.verify().await) }).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    // Overlapping pieces of one name in one shard are refused.
    let dup = writer.start(6, 0, vec![piece(0..2, 0..6), piece(1..2, 3..4)]);
    assert!(matches!(dup, Err(CheckpointError::BadTensor { ref tensor, .. }) if tensor == "w"));
}

#[test]
fn reshards_across_layouts_reading_only_needed_bytes() {
    let specs = model();
    let globals = globals(&specs);
    let (_d, base) = tmp();
    let counting = CountingStore::new(base.object_store().clone());
    let c2 = counting.clone();
    let store = base.wrap(move |_| c2);
    // 4-byte checksum blocks: every element run here is block aligned, so the bytes fetched
    // must equal the bytes needed exactly.
    let saved = [(2, 2, 2), (1, 2, 2), (2, 1, 1)];
    let targets = [
        (1, 1, 1),
        (2, 1, 2),
        (1, 2, 1),
        (2, 2, 2),
        (1, 4, 2),
        (4, 1, 1),
        (1, 1, 4),
    ];
    for (i, &src) in saved.iter().enumerate() {
        let step = 100 * (i as u64 + 1);
        let m = save_layout(&store, step, src, &specs, &globals, small_blocks(4));
        assert_eq!((m.layout.dp, m.layout.pp, m.layout.tp), src);
        let total: u64 = m.total_bytes();
        for &dst in &targets {
            let ck = block_on(Checkpoint::open(&store, Selector::Step(step))).unwrap();
            for c in coords(dst) {
                let (reqs, want) = load_requests(dst, c, &specs, &globals);
                counting.reset();
                let got = block_on(ck.read_slices(&reqs)).unwrap();
                let mut needed = 0;
                for ((r, g), w) in reqs.iter().zip(&got).zip(&want) {
                    assert!(g.equal(w), "{src:?} -> {dst:?} rank {c:?}: {}", r.name);
                    needed += (w.numel() * w.kind().elt_size_in_bytes()) as u64;
                }
                // The run state: whatever the layout, train.step and an RNG row.
                let rank = rank_of(dst, c) as u64;
                let world = (src.0 * src.1 * src.2) as u64;
                let rng = block_on(ck.read_slice("rng", &[rank % world..rank % world + 1, 0..16]))
                    .unwrap();
                assert_eq!(rng.size(), vec![1, 16]);
                needed += 16;
                assert_eq!(
                    counting.bytes(),
                    needed,
                    "{src:?} -> {dst:?} rank {c:?} fetched {} bytes for {needed} needed (shards hold {total})",
                    counting.bytes()
                );
                // Never a header byte, never outside a piece: implied by the equality, and
                // every request is within the files.
                for (_, r) in counting.ranges.lock().unwrap().iter() {
                    assert!(r.start >= m.shards[0].header_bytes.min(64));
                }
            }
            assert_eq!(
                block_on(ck.read_i64s("train.step")).unwrap(),
                vec![step as i64, 3]
            );
            // The same through the direct local-file path (the store unwrapped).
            let direct = block_on(Checkpoint::open(&base, Selector::Step(step))).unwrap();
            for c in coords(dst) {
                let (reqs, want) = load_requests(dst, c, &specs, &globals);
                let got = block_on(direct.read_slices(&reqs)).unwrap();
                for ((r, g), w) in reqs.iter().zip(&got).zip(&want) {
                    assert!(
                        g.equal(w),
                        "direct {src:?} -> {dst:?} rank {c:?}: {}",
                        r.name
                    );
                }
            }
        }
    }
}

#[test]
fn ranged_reads_with_default_blocks_fetch_little_slack() {
    let (_d, base) = tmp();
    let counting = CountingStore::new(base.object_store().clone());
    let c2 = counting.clone();
    let store = base.wrap(move |_| c2);
    // 4 MiB global, saved as two tp pieces split on rows (1 MiB blocks, the default).
    let g = Tensor::randn([1024, 1024], (Kind::Float, Device::Cpu));
    let w = ShardWriter::new(&store);
    let reports = (0..2)
        .map(|r| {
            let piece = g.narrow(0, r * 512, 512).contiguous();
            w.start(
                9,
                r as usize,
                vec![SavedTensor::piece(
                    "g",
                    piece,
                    vec![1024, 1024],
                    vec![r as u64 * 512, 0],
                )],
            )
            .unwrap()
            .wait()
            .unwrap()
        })
        .collect();
    block_on(commit(&store, 9, Layout::new(1, 1, 2), reports)).unwrap();
    let ck = block_on(Checkpoint::open(&store, Selector::Latest)).unwrap();
    // A tp=4 shard: rows 256..512 = the second 1 MiB block of piece 0: exactly 1 MiB.
    counting.reset();
    let t = block_on(ck.read_slice("g", &[256..512, 0..1024])).unwrap();
    assert!(t.equal(&g.narrow(0, 256, 256)));
    assert_eq!(counting.bytes(), 1 << 20);
    // Rows 100..200 (400 KiB) lie in block 0 of piece 0: one block fetched and checked.
    counting.reset();
    let t = block_on(ck.read_slice("g", &[100..200, 0..1024])).unwrap();
    assert!(t.equal(&g.narrow(0, 100, 100)));
    assert_eq!(counting.bytes(), 1 << 20);
    // Rows 500..520 straddle the two pieces: the last block of one, the first of the other.
    counting.reset();
    let t = block_on(ck.read_slice("g", &[500..520, 0..1024])).unwrap();
    assert!(t.equal(&g.narrow(0, 500, 20)));
    assert_eq!(counting.bytes(), 2 << 20);
    assert_eq!(counting.gets.load(std::sync::atomic::Ordering::SeqCst), 2);
    // A column half (tp split on dim 1) needs every row: everything is fetched, in requests
    // no larger than max_fetch_bytes.
    let mut ck2 = ck.clone();
    ck2.set_options(ReadOptions {
        max_fetch_bytes: 2 << 20,
        ..ReadOptions::local()
    });
    counting.reset();
    let t = block_on(ck2.read_slice("g", &[0..1024, 512..1024])).unwrap();
    assert!(t.equal(&g.narrow(1, 512, 512)));
    assert_eq!(counting.bytes(), 4 << 20);
    assert_eq!(counting.gets.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[test]
fn corrupt_byte_is_reported_with_object_and_tensor_and_falls_back() {
    let (_d, store) = tmp();
    save_one(&store, 1, simple(1));
    save_one(&store, 2, simple(2));
    let file = obj(&store, &format!("{}/{}", step_dir(2), shard_file(0)));
    let m = block_on(Checkpoint::open(&store, Selector::Step(2)))
        .unwrap()
        .manifest()
        .clone();
    let at = m.tensors["w"].pieces[0].bytes[0] + 17;
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[at as usize] ^= 0x40;
    std::fs::write(&file, bytes).unwrap();

    // Opening checks structure only; the bad byte shows when read.
    let ck = block_on(Checkpoint::open(&store, Selector::Latest)).unwrap();
    assert_eq!(ck.step(), 2);
    match block_on(ck.read_tensor("w")) {
        Err(CheckpointError::Corrupt { object, tensor, .. }) => {
            assert_eq!(tensor, "w");
            assert!(
                object.ends_with("step-00000002/shard-00000.safetensors"),
                "{object}"
            );
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // Other tensors in the same shard are fine.
    assert_eq!(block_on(ck.read_i64s("train.step")).unwrap(), vec![2]);
    // verify lists it; the resume loop falls back to the previous step.
    let report = block_on(async { Ok(ck.verify().await) }).unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(report.problems[0]
        .to_string()
        .contains("tensor w is corrupt"));
    let older = block_on(Checkpoint::open(&store, Selector::Before(ck.step()))).unwrap();
    assert_eq!(older.step(), 1);
    assert!(block_on(older.read_tensor("w")).is_ok());
}

#[test]
fn truncated_shard_missing_manifest_and_missing_object() {
    let (_d, store) = tmp();
    for s in 1..=4 {
        save_one(&store, s, simple(s));
    }
    // 4: truncated shard. 3: manifest names an object that is gone. 2: no manifest.
    let f4 = obj(&store, &format!("{}/{}", step_dir(4), shard_file(0)));
    let len = std::fs::metadata(&f4).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f4)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    std::fs::remove_file(obj(&store, &format!("{}/{}", step_dir(3), shard_file(0)))).unwrap();
    std::fs::remove_file(obj(&store, &format!("{}/{MANIFEST_FILE}", step_dir(2)))).unwrap();

    match block_on(Checkpoint::open(&store, Selector::Step(4))) {
        Err(CheckpointError::Truncated {
            object,
            expected,
            actual,
        }) => {
            assert!(object.ends_with("step-00000004/shard-00000.safetensors"));
            assert_eq!(expected - actual, 10);
        }
        other => panic!("expected Truncated, got {other:?}"),
    }
    match block_on(Checkpoint::open(&store, Selector::Step(3))) {
        Err(CheckpointError::MissingObject { object }) => {
            assert!(
                object.ends_with("step-00000003/shard-00000.safetensors"),
                "{object}"
            )
        }
        other => panic!("expected MissingObject, got {other:?}"),
    }
    match block_on(Checkpoint::open(&store, Selector::Step(2))) {
        Err(e @ CheckpointError::NoManifest { .. }) => {
            assert!(e.to_string().contains("step-00000002"), "{e}")
        }
        other => panic!("expected NoManifest, got {other:?}"),
    }
    // latest passes over 4, 3 and 2 and lands on 1.
    let ck = block_on(Checkpoint::open(&store, Selector::Latest)).unwrap();
    assert_eq!(ck.step(), 1);
    // A read of a shard truncated after opening says so too.
    let ck4 = {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f4)
            .unwrap()
            .set_len(len)
            .unwrap();
        let ck = block_on(Checkpoint::open(&store, Selector::Step(4))).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f4)
            .unwrap()
            .set_len(len - 10)
            .unwrap();
        ck
    };
    assert!(matches!(
        block_on(ck4.read_tensor("train.step")),
        Err(CheckpointError::Truncated { .. })
    ));
    // Nothing complete at all.
    std::fs::remove_file(obj(&store, &format!("{}/{MANIFEST_FILE}", step_dir(1)))).unwrap();
    match block_on(Checkpoint::open(&store, Selector::Latest)) {
        Err(e @ CheckpointError::NoCheckpoint { .. }) => {
            let msg = e.to_string();
            for s in 1..=4 {
                assert!(msg.contains(&step_dir(s)), "{msg}");
            }
        }
        other => panic!("expected NoCheckpoint, got {other:?}"),
    }
    // A corrupt manifest is a BadManifest naming it.
    std::fs::write(
        obj(&store, &format!("{}/{MANIFEST_FILE}", step_dir(1))),
        b"{not json",
    )
    .unwrap();
    assert!(matches!(
        block_on(Checkpoint::open(&store, Selector::Step(1))),
        Err(CheckpointError::BadManifest { object, .. }) if object.ends_with("MANIFEST.json")
    ));
    // An empty or absent checkpoint root.
    let (_e, empty) = tmp();
    assert!(matches!(
        block_on(Checkpoint::open(&empty, Selector::Latest)),
        Err(CheckpointError::NoCheckpoint { .. })
    ));
}

#[test]
fn a_url_with_committed_checkpoints_is_taken() {
    let (_d, store) = tmp();
    // Nothing there yet (the folder does not even exist): free.
    assert_eq!(block_on(newest_committed(&store)).unwrap(), None);
    block_on(ensure_unused(&store)).unwrap();
    // A save that never committed does not make it taken.
    let w = ShardWriter::new(&store);
    let r = w.start(5, 0, simple(5)).unwrap().wait().unwrap();
    block_on(ensure_unused(&store)).unwrap();
    block_on(commit(&store, 5, Layout::new(1, 1, 1), vec![r])).unwrap();
    save_one(&store, 7, simple(7));
    // An uncommitted save above the newest commit is passed over.
    w.start(9, 0, simple(9)).unwrap().wait().unwrap();
    assert_eq!(block_on(newest_committed(&store)).unwrap(), Some(7));
    match block_on(ensure_unused(&store)) {
        Err(e @ CheckpointError::UrlTaken { step: 7, .. }) => {
            let m = e.to_string();
            assert!(m.contains(&store.url()), "{m}");
            assert!(m.contains("--resume latest"), "{m}");
            assert!(m.contains("checkpoint.url"), "{m}");
        }
        other => panic!("expected UrlTaken, got {other:?}"),
    }
}

#[test]
fn second_commit_is_refused_and_latest_moves_only_forward() {
    let (_d, store) = tmp();
    let w = ShardWriter::new(&store);
    let r = w.start(10, 0, simple(10)).unwrap().wait().unwrap();
    block_on(commit(&store, 10, Layout::new(1, 1, 1), vec![r.clone()])).unwrap();
    match block_on(commit(&store, 10, Layout::new(1, 1, 1), vec![r])) {
        Err(CheckpointError::AlreadyCommitted { object, step }) => {
            assert_eq!(step, 10);
            assert!(object.ends_with("step-00000010/MANIFEST.json"));
        }
        other => panic!("expected AlreadyCommitted, got {other:?}"),
    }
    // Saving into a committed step is refused instead of overwriting its shards.
    let again = w.start(10, 0, simple(10)).unwrap().wait();
    assert!(matches!(
        again,
        Err(CheckpointError::AlreadyCommitted { .. })
    ));
    // Reports that do not form a layout are refused before anything is written.
    let a = w.start(11, 0, simple(11)).unwrap().wait().unwrap();
    let b = w.start(11, 1, simple(11)).unwrap().wait().unwrap();
    assert!(matches!(
        block_on(commit(&store, 11, Layout::new(1, 1, 2), vec![a.clone(), b])),
        Err(CheckpointError::Layout(m)) if m.contains("overlap")
    ));
    assert!(matches!(
        block_on(commit(&store, 12, Layout::new(1, 1, 1), vec![a.clone()])),
        Err(CheckpointError::Layout(_))
    ));
    // A shard that lost bytes after its report is caught at commit.
    let f = obj(&store, &format!("{}/{}", step_dir(11), shard_file(0)));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(3)
        .unwrap();
    assert!(matches!(
        block_on(commit(&store, 11, Layout::new(1, 1, 1), vec![a])),
        Err(CheckpointError::Truncated { .. })
    ));
    // Committing an older step after a newer one leaves `latest` alone.
    save_one(&store, 30, simple(30));
    save_one(&store, 20, simple(20));
    let latest = std::fs::read_to_string(obj(&store, "latest")).unwrap();
    assert!(latest.contains("\"step\":30"), "{latest}");
    // The bytes of a committed checkpoint are durable files.
    assert!(obj(&store, &format!("{}/{MANIFEST_FILE}", step_dir(30))).is_file());
}

#[test]
fn async_api_futures_are_send() {
    // The coordinator awaits these on a multi-threaded runtime (tonic handlers).
    fn send<T: Send>(_: &T) {}
    let (_d, store) = tmp();
    let commit_fut = commit(&store, 1, Layout::new(1, 1, 1), vec![]);
    send(&commit_fut);
    assert!(matches!(
        block_on(commit_fut),
        Err(CheckpointError::Layout(_))
    ));
    send(&Checkpoint::open(&store, Selector::Latest));
    send(&retain(&store, 1));
    send(&list(&store));
    save_one(&store, 1, simple(1));
    let ck = block_on(Checkpoint::open(&store, Selector::Latest)).unwrap();
    send(&ck.read_slices(&[]));
    send(&ck.verify());
    send(&export(
        &ck,
        std::path::Path::new("/nonexistent/x"),
        &|_| true,
    ));
    send(
        &ShardWriter::new(&store)
            .start(2, 0, simple(2))
            .unwrap()
            .finish(),
    );
}

#[test]
fn retention_keeps_the_last_k_committed() {
    let (_d, store) = tmp();
    for s in [1, 2, 3, 4, 5] {
        save_one(&store, s, simple(s));
    }
    // An abandoned save between committed ones (2 loses its manifest), and one in progress
    // after the newest (6).
    let w = ShardWriter::new(&store);
    w.start(6, 0, simple(6)).unwrap().wait().unwrap();
    std::fs::remove_file(obj(&store, &format!("{}/{MANIFEST_FILE}", step_dir(2)))).unwrap();
    let deleted = block_on(retain(&store, 2)).unwrap();
    assert_eq!(deleted, vec![1, 2, 3]);
    let steps: Vec<(u64, bool)> = block_on(list(&store))
        .unwrap()
        .into_iter()
        .map(|l| (l.step, matches!(l.state, StepState::Committed { .. })))
        .collect();
    assert_eq!(steps, vec![(4, true), (5, true), (6, false)]);
    assert!(
        !obj(&store, &step_dir(1)).exists(),
        "emptied directories are removed"
    );
    assert_eq!(block_on(retain(&store, 0)).unwrap(), Vec::<u64>::new());
    assert_eq!(
        block_on(Checkpoint::open(&store, Selector::Latest))
            .unwrap()
            .step(),
        5
    );
}

#[test]
fn export_is_read_by_python_safetensors() {
    let python = std::env::var("WEAVER_PYTHON").expect(
        "WEAVER_PYTHON is not set: `source scripts/env.sh` first (it names the venv's python)",
    );
    let specs = model();
    let globals = globals(&specs);
    let (d, store) = tmp();
    save_layout(
        &store,
        42,
        (2, 2, 2),
        &specs,
        &globals,
        WriterOptions::default(),
    );
    let out = d.path().join("export.safetensors");
    let mut text = Vec::new();
    let report = cli::export(
        &format!("{}/step-00000042", store.url()),
        &out,
        &|_| true,
        &mut text,
    )
    .unwrap();
    assert_eq!(report.tensors, globals.len() + 2); // + train.step and rng
    assert!(String::from_utf8(text)
        .unwrap()
        .contains("exported step 42"));
    // The reference: the global tensors written by tch's own safetensors writer.
    let reference = d.path().join("reference.safetensors");
    let named: Vec<(&str, &Tensor)> = globals.iter().map(|(k, v)| (k.as_str(), v)).collect();
    Tensor::write_safetensors(&named, &reference).unwrap();
    let script = r#"
import sys, torch
from safetensors.torch import load_file
out, ref = load_file(sys.argv[1]), load_file(sys.argv[2])
assert set(ref) <= set(out), set(ref) - set(out)
for k, v in ref.items():
    assert out[k].dtype == v.dtype and out[k].shape == v.shape, k
    assert torch.equal(out[k], v), k
assert out["train.step"].tolist() == [42, 3], out["train.step"]
assert out["rng"].shape == (8, 16) and out["rng"][3].tolist() == [(3 * 31 + i) % 256 for i in range(16)]
print("OK", len(ref))
"#;
    let run = std::process::Command::new(&python)
        .args(["-c", script])
        .arg(&out)
        .arg(&reference)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success() && stdout.starts_with("OK"),
        "python: {stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    // The library entry point with a filter: parameters only.
    let ck = block_on(Checkpoint::open(&store, Selector::Latest)).unwrap();
    let params = d.path().join("params.safetensors");
    let r = block_on(export(&ck, &params, &|n: &str| {
        !n.starts_with("optim.") && n != "rng" && n != "train.step"
    }))
    .unwrap();
    assert_eq!(
        r.tensors,
        specs
            .iter()
            .filter(|s| !s.name.starts_with("optim."))
            .count()
    );
    let back = Tensor::read_safetensors(&params).unwrap();
    assert_eq!(back.len(), r.tensors);
}

#[test]
fn cli_functions_print_what_they_find() {
    let (_d, store) = tmp();
    save_one(&store, 1, simple(1));
    save_one(&store, 2, simple(2));
    ShardWriter::new(&store)
        .start(3, 0, simple(3))
        .unwrap()
        .wait()
        .unwrap();
    let url = store.url();

    let mut out = Vec::new();
    let steps = cli::ls(&url, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(steps.len(), 3);
    assert!(
        text.contains("committed") && text.contains("uncommitted") && text.contains("<- latest"),
        "{text}"
    );

    let mut out = Vec::new();
    let m = cli::inspect(&format!("{url}/step-00000001"), &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(m.step, 1);
    assert!(
        text.contains("layout     dp=1 pp=1 tp=1")
            && text.contains("train.step")
            && text.contains("F32"),
        "{text}"
    );

    let mut out = Vec::new();
    let r = cli::verify(&url, &mut out).unwrap();
    assert!(r.is_ok() && r.step == 2);
    assert!(String::from_utf8(out).unwrap().contains("OK"));

    // A corrupt byte: verify reports it, naming object and tensor.
    let file = obj(&store, &format!("{}/{}", step_dir(2), shard_file(0)));
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    let mut out = Vec::new();
    let r = cli::verify(&format!("{url}/step-00000002"), &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(!r.is_ok());
    assert!(
        text.contains("PROBLEM")
            && text.contains("shard-00000.safetensors")
            && text.contains("train.step"),
        "{text}"
    );

    assert!(matches!(
        cli::inspect(&format!("{url}/step-00000003"), &mut Vec::new()),
        Err(CheckpointError::NoManifest { .. })
    ));
}

/// Names of the objects the store lists under `rel` (recursively), relative to its root.
fn listed(store: &CkptStore, rel: &str) -> Vec<String> {
    use futures::TryStreamExt;
    let prefix = store.path(rel);
    let root = format!("{}/", store.root());
    let mut names: Vec<String> = block_on(async {
        store
            .object_store()
            .list(Some(&prefix))
            .try_collect::<Vec<_>>()
            .await
            .map_err(|e| store.err(&prefix, e))
    })
    .unwrap()
    .into_iter()
    .map(|m| m.location.to_string().replacen(&root, "", 1))
    .collect();
    names.sort();
    names
}

/// Writes `path` as a put killed mid-way leaves its staging file, last written `age` ago.
fn leftover(path: &std::path::Path, age: std::time::Duration) {
    std::fs::write(path, b"half a shard").unwrap();
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - age)
        .unwrap();
}

/// A put killed mid-way leaves its staging file (`NAME#N`) behind: listings never show it,
/// and opening the location deletes it once it is older than `STALE_STAGING_AGE`, unless a
/// live upload holds it (its lock); committed objects, and object names that only look
/// similar, stay. A live multipart upload's own staging file is locked until it completes.
#[test]
fn staging_files_of_killed_puts_are_unlisted_and_swept_on_open() {
    use object_store::ObjectStoreExt;
    use std::os::fd::AsRawFd;
    use std::time::Duration;
    use weaver_checkpoint::store::STALE_STAGING_AGE;

    let (_d, store) = tmp();
    save_one(&store, 1, simple(1));
    let root = std::path::PathBuf::from(store.url());
    let step = root.join(step_dir(1));
    let committed = listed(&store, "");
    assert_eq!(
        committed,
        [
            "latest".to_string(),
            format!("{}/{}", step_dir(1), MANIFEST_FILE),
            format!("{}/{}", step_dir(1), shard_file(0)),
        ]
    );
    // Files whose names only look like staging files (`#` not followed by a number only):
    // objects to the store, listed, never swept, however old.
    let old = STALE_STAGING_AGE + Duration::from_secs(600);
    let lookalikes = [
        root.join("notes#v2"),
        step.join("data#1#2"),
        root.join("x#"),
    ];
    for p in &lookalikes {
        leftover(p, old);
    }
    let objects = listed(&store, "");
    assert_eq!(
        objects.len(),
        committed.len() + lookalikes.len(),
        "{objects:?}"
    );

    let killed_shard = step.join(format!("{}#1", shard_file(0)));
    let killed_latest = root.join("latest#3");
    let killed_new_step = root.join(step_dir(2)).join(format!("{}#1", shard_file(0)));
    std::fs::create_dir_all(killed_new_step.parent().unwrap()).unwrap();
    leftover(&killed_shard, old);
    leftover(&killed_latest, old);
    leftover(&killed_new_step, old);
    // A put still running: written a moment ago.
    let fresh = step.join(format!("{}#2", shard_file(0)));
    leftover(&fresh, Duration::from_secs(1));
    // An upload whose process lives but has not written for hours: it holds the lock.
    let held = step.join(format!("{}#3", shard_file(0)));
    leftover(&held, old);
    let lock = std::fs::File::open(&held).unwrap();
    // SAFETY: flock(2) on a descriptor this test owns.
    assert_eq!(
        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );

    // No listing shows a staging file, before the sweep or after.
    assert_eq!(listed(&store, ""), objects);
    let steps: Vec<u64> = block_on(list(&store))
        .unwrap()
        .iter()
        .filter(|l| matches!(l.state, StepState::Committed { .. }))
        .map(|l| l.step)
        .collect();
    assert_eq!(steps, [1]);

    // Opening the location sweeps the stale, unheld ones.
    let reopened = CkptStore::open(root.to_str().unwrap()).unwrap();
    for gone in [&killed_shard, &killed_latest, &killed_new_step] {
        assert!(!gone.exists(), "{} was not swept", gone.display());
    }
    assert!(fresh.exists(), "a put still writing was swept");
    assert!(held.exists(), "a live upload's staging file was swept");
    for p in &lookalikes {
        assert!(
            p.exists(),
            "{} is an object, not a staging file",
            p.display()
        );
    }
    assert_eq!(listed(&reopened, ""), objects);
    let ckpt = block_on(Checkpoint::open(&reopened, Selector::Latest)).unwrap();
    assert_eq!(ckpt.step(), 1);
    assert!(block_on(async { Ok(ckpt.verify().await) }).unwrap().is_ok());

    // A sweep with no age limit takes the fresh one too, still not the held one.
    let swept = reopened.sweep_staging(Duration::ZERO).unwrap();
    assert_eq!(swept, [fresh.display().to_string()]);
    assert!(held.exists());
    drop(lock);
    let swept = reopened.sweep_staging(Duration::ZERO).unwrap();
    assert_eq!(swept, [held.display().to_string()]);
    assert_eq!(listed(&reopened, ""), objects);

    // The store's own multipart upload stages under `NAME#N` and holds it locked while it
    // lives: a sweep during the upload leaves it, completing renames it into place.
    let p = reopened.path("big.bin");
    let mut upload = block_on(async {
        reopened
            .object_store()
            .put_multipart(&p)
            .await
            .map_err(|e| reopened.err(&p, e))
    })
    .unwrap();
    block_on(async {
        upload
            .put_part(vec![7u8; 1000].into())
            .await
            .map_err(|e| reopened.err(&p, e))
    })
    .unwrap();
    let staging = root.join("big.bin#1");
    assert!(staging.exists(), "the upload stages as big.bin#1");
    assert!(!listed(&reopened, "").contains(&"big.bin".to_string()));
    assert!(reopened.sweep_staging(Duration::ZERO).unwrap().is_empty());
    block_on(async { upload.complete().await.map_err(|e| reopened.err(&p, e)) }).unwrap();
    assert!(!staging.exists());
    assert_eq!(
        std::fs::read(root.join("big.bin")).unwrap(),
        vec![7u8; 1000]
    );
    assert!(reopened.sweep_staging(Duration::ZERO).unwrap().is_empty());
}
