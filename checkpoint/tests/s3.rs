//! The same checkpoint life cycle against a real S3-protocol server (s3s-fs) on loopback:
//! multipart shard uploads with several parts, create-only commit refused the second time,
//! resharded ranged reads, fallback and retention. Needs `WEAVER_S3_SERVER` (see
//! `scripts/install-s3-server.sh`); fails, does not skip, without it.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use tch::{Device, Kind, Tensor};
use weaver_checkpoint::{
    block_on, commit, list, retain, Checkpoint, CheckpointError, Layout, SavedTensor, Selector,
    ShardWriter, StepState, WriterOptions,
};

#[test]
fn s3_save_commit_reshard_retain() {
    let server = S3Server::start();
    let base = server.store("runs/exp1");
    let counting = CountingStore::new(base.object_store().clone());
    let c2 = counting.clone();
    let store = base.wrap(move |_| c2);

    let specs = model();
    let globals = globals(&specs);
    let opts = WriterOptions {
        part_bytes: 5 << 20,
        max_concurrent_parts: 2,
        crc_block: 4,
    };
    save_layout(&store, 100, (2, 2, 2), &specs, &globals, opts.clone());

    // A 12 MiB shard goes up in three parts (s3s-fs enforces S3's 5 MiB minimum part).
    let big = Tensor::randn([3, 1024, 1024], (Kind::Float, Device::Cpu));
    let pending = ShardWriter::new(&store)
        .start(
            200,
            0,
            vec![
                SavedTensor::whole("big", big.copy()),
                SavedTensor::from_i64s("train.step", &[200]),
            ],
        )
        .unwrap();
    assert!(pending.total_bytes() > 12 << 20);
    let report = pending.wait().unwrap();
    block_on(commit(
        &store,
        200,
        Layout::new(1, 1, 1),
        vec![report.clone()],
    ))
    .unwrap();
    // A second create-only put of the manifest is refused by the server.
    match block_on(commit(&store, 200, Layout::new(1, 1, 1), vec![report])) {
        Err(CheckpointError::AlreadyCommitted { object, step: 200 }) => {
            assert_eq!(object, "s3://weaver/runs/exp1/step-00000200/MANIFEST.json")
        }
        other => panic!("expected AlreadyCommitted, got {other:?}"),
    }
    let ck = block_on(Checkpoint::open(&store, Selector::Step(200))).unwrap();
    counting.reset();
    let mid = block_on(ck.read_slice("big", &[1..2, 0..1024, 0..1024])).unwrap();
    assert!(mid.equal(&big.narrow(0, 1, 1)));
    assert_eq!(
        counting.bytes(),
        4 << 20,
        "one 4 MiB slice = four 1 MiB blocks"
    );
    assert!(block_on(async { Ok(ck.verify().await) }).unwrap().is_ok());

    // Resharded loads of step 100 fetch exactly the needed bytes.
    let ck = block_on(Checkpoint::open(&store, Selector::Step(100))).unwrap();
    let mut ck = ck;
    ck.set_options(weaver_checkpoint::ReadOptions {
        coalesce_gap: 0,
        ..weaver_checkpoint::ReadOptions::remote()
    });
    for dst in [(1, 1, 1), (2, 1, 2), (1, 2, 1)] {
        for c in coords(dst) {
            let (reqs, want) = load_requests(dst, c, &specs, &globals);
            counting.reset();
            let got = block_on(ck.read_slices(&reqs)).unwrap();
            let mut needed = 0;
            for ((r, g), w) in reqs.iter().zip(&got).zip(&want) {
                assert!(g.equal(w), "{dst:?} {c:?} {}", r.name);
                needed += (w.numel() * w.kind().elt_size_in_bytes()) as u64;
            }
            assert_eq!(counting.bytes(), needed, "{dst:?} {c:?}");
        }
    }
    // With the remote default (1 MiB coalescing) the same load takes few requests.
    let ck = block_on(Checkpoint::open(&store, Selector::Step(100))).unwrap();
    let (reqs, _) = load_requests((1, 1, 1), (0, 0, 0), &specs, &globals);
    counting.reset();
    block_on(ck.read_slices(&reqs)).unwrap();
    assert!(counting.gets.load(Ordering::SeqCst) <= ck.manifest().shards.len() as u64);

    // latest is 200; with 200's shard gone, latest falls back to 100.
    assert_eq!(
        block_on(Checkpoint::open(&store, Selector::Latest))
            .unwrap()
            .step(),
        200
    );
    let shard = base
        .root()
        .clone()
        .join("step-00000200")
        .join("shard-00000.safetensors");
    block_on(async {
        use object_store::ObjectStoreExt;
        base.object_store().delete(&shard).await.unwrap();
        Ok(())
    })
    .unwrap();
    assert!(matches!(
        block_on(Checkpoint::open(&store, Selector::Step(200))),
        Err(CheckpointError::MissingObject { object }) if object.ends_with("step-00000200/shard-00000.safetensors")
    ));
    let ck = block_on(Checkpoint::open(&store, Selector::Latest)).unwrap();
    assert_eq!(ck.step(), 100);
    assert!(block_on(async { Ok(ck.verify().await) }).unwrap().is_ok());

    // Retention on S3.
    let small = Tensor::ones([4], (Kind::Float, Device::Cpu));
    for step in [300, 400] {
        let r = ShardWriter::new(&store)
            .start(step, 0, vec![SavedTensor::whole("x", small.copy())])
            .unwrap()
            .wait()
            .unwrap();
        block_on(commit(&store, step, Layout::new(1, 1, 1), vec![r])).unwrap();
    }
    assert_eq!(block_on(retain(&store, 2)).unwrap(), vec![100, 200]);
    let left: Vec<u64> = block_on(list(&store))
        .unwrap()
        .iter()
        .filter(|l| matches!(l.state, StepState::Committed { .. }))
        .map(|l| l.step)
        .collect();
    assert_eq!(left, vec![300, 400]);
}
