//! bench/checkpoint, weaver's side: for about 1 GiB of f32 state in one process on local
//! disk, the training thread's stall and the total time of a save (snapshot, background
//! upload with fsync and checksums, commit), a load of everything, and a resharded load
//! (state saved as two tensor-parallel shards, half the tensors split by rows and half by
//! columns, loaded whole). Prints a table, then one `RESULT {json}` line per measurement
//! (median over the repeats). `bench/checkpoint/run.sh` runs it next to PyTorch DCP.
//!
//!     cargo bench -p weaver-checkpoint --bench checkpoint -- --dir DIR [--mib 1024]
//!         [--tensors 32] [--repeats 3]

use std::time::Instant;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};
use weaver_checkpoint::{
    block_on, commit, snapshot, Checkpoint, CkptStore, Layout, SavedTensor, Selector, ShardWriter,
    SliceRequest, Snapshotter,
};

struct Args {
    dir: std::path::PathBuf,
    mib: u64,
    tensors: u64,
    repeats: usize,
}

fn args() -> Result<Args> {
    let mut a = Args {
        dir: std::env::temp_dir().join("weaver-ckpt-bench"),
        mib: 1024,
        tensors: 32,
        repeats: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        match k.as_str() {
            "--bench" => {} // added by `cargo bench`
            "--dir" => a.dir = it.next().context("--dir DIR")?.into(),
            "--mib" => a.mib = it.next().context("--mib N")?.parse()?,
            "--tensors" => a.tensors = it.next().context("--tensors N")?.parse()?,
            "--repeats" => a.repeats = it.next().context("--repeats N")?.parse()?,
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

const COLS: i64 = 4096;

fn main() -> Result<()> {
    let a = args()?;
    tch::set_num_threads(2);
    let rows = (a.mib << 20) / (a.tensors * COLS as u64 * 4);
    if rows == 0 || rows % 2 == 1 {
        bail!("--mib / --tensors gives {rows} rows of {COLS} floats; need an even number");
    }
    tch::manual_seed(0);
    let state: Vec<(String, Tensor)> = (0..a.tensors)
        .map(|i| {
            let t = Tensor::randn([rows as i64, COLS], (Kind::Float, Device::Cpu));
            (format!("layers.{i}.w"), t)
        })
        .collect();
    let bytes: u64 = state.iter().map(|(_, t)| t.numel() as u64 * 4).sum();
    std::fs::create_dir_all(&a.dir)?;

    let (mut stall, mut copy, mut save, mut load, mut reshard, mut save2) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut stall_fresh, mut save_fresh, mut durable) = (vec![], vec![], vec![]);
    let snapper = Snapshotter::new();
    snapper.reserve(&state.iter().map(|(_, t)| t).collect::<Vec<_>>())?;
    for rep in 0..a.repeats {
        let root = a.dir.join(format!("weaver-{rep}"));
        let _ = std::fs::remove_dir_all(&root);
        let store = CkptStore::open(root.to_str().context("utf-8 dir")?)?;

        // Save: the training thread blocks for the snapshot (into the Snapshotter's warm
        // buffers, reserved once at startup as a trainer would) and the start of the upload.
        let t0 = Instant::now();
        let snaps: Vec<SavedTensor> = state
            .iter()
            .map(|(n, t)| Ok(snapper.whole(n.clone(), t)?))
            .collect::<Result<_>>()?;
        let copied = t0.elapsed().as_secs_f64();
        let pending = ShardWriter::new(&store).start(100, 0, snaps)?;
        stall.push(t0.elapsed().as_secs_f64());
        copy.push(copied);
        let report = pending.wait()?;
        durable.push(t0.elapsed().as_secs_f64());
        block_on(commit(&store, 100, Layout::new(1, 1, 1), vec![report]))?;
        save.push(t0.elapsed().as_secs_f64());

        // The same with fresh allocations (`snapshot`), for comparison: page faults included.
        let store1 = CkptStore::open(root.join("fresh").to_str().context("utf-8 dir")?)?;
        let t0 = Instant::now();
        let snaps: Vec<SavedTensor> = state
            .iter()
            .map(|(n, t)| Ok(SavedTensor::whole(n.clone(), snapshot(t)?)))
            .collect::<Result<_>>()?;
        let pending = ShardWriter::new(&store1).start(100, 0, snaps)?;
        stall_fresh.push(t0.elapsed().as_secs_f64());
        let report = pending.wait()?;
        block_on(commit(&store1, 100, Layout::new(1, 1, 1), vec![report]))?;
        save_fresh.push(t0.elapsed().as_secs_f64());

        // Load everything.
        let requests: Vec<SliceRequest> = state
            .iter()
            .map(|(n, t)| {
                let ranges = t.size().iter().map(|&d| 0..d as u64).collect();
                SliceRequest::new(n.clone(), ranges)
            })
            .collect();
        let t0 = Instant::now();
        let ck = block_on(Checkpoint::open(&store, Selector::Latest))?;
        let got = block_on(ck.read_slices(&requests))?;
        load.push(t0.elapsed().as_secs_f64());
        if rep == 0 {
            for ((n, t), g) in state.iter().zip(&got) {
                if !t.equal(g) {
                    bail!("load of {n} differs");
                }
            }
        }
        drop(got);

        // Resharded: saved as tp=2 (even tensors split by rows, odd by columns), loaded whole.
        let store2 = CkptStore::open(root.join("tp2").to_str().context("utf-8 dir")?)?;
        let t0 = Instant::now();
        let mut pending = Vec::new();
        for r in 0..2i64 {
            let mut pieces = Vec::new();
            for (i, (n, t)) in state.iter().enumerate() {
                let dim = (i % 2) as i64;
                let len = t.size()[dim as usize] / 2;
                let piece = snapshot(&t.narrow(dim, r * len, len))?;
                let mut offset = vec![0u64, 0];
                offset[dim as usize] = (r * len) as u64;
                pieces.push(SavedTensor::piece(
                    n.clone(),
                    piece,
                    vec![rows, COLS as u64],
                    offset,
                ));
            }
            pending.push(ShardWriter::new(&store2).start(100, r as usize, pieces)?);
        }
        let reports = pending
            .into_iter()
            .map(|p| p.wait())
            .collect::<Result<Vec<_>, _>>()?;
        block_on(commit(&store2, 100, Layout::new(1, 1, 2), reports))?;
        save2.push(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        let ck = block_on(Checkpoint::open(&store2, Selector::Latest))?;
        let got = block_on(ck.read_slices(&requests))?;
        reshard.push(t0.elapsed().as_secs_f64());
        if rep == 0 {
            for ((n, t), g) in state.iter().zip(&got) {
                if !t.equal(g) {
                    bail!("resharded load of {n} differs");
                }
            }
        }
        drop(got);
        let _ = std::fs::remove_dir_all(&root);
    }

    let gib = bytes as f64 / (1u64 << 30) as f64;
    let stall_v = stall.clone();
    let rows_out = [
        ("save", median(stall.clone()), median(save.clone())),
        ("load", median(load.clone()), median(load.clone())),
        (
            "resharded_load",
            median(reshard.clone()),
            median(reshard.clone()),
        ),
        ("save_tp2", f64::NAN, median(save2.clone())),
        (
            "save_unpooled",
            median(stall_fresh.clone()),
            median(save_fresh.clone()),
        ),
    ];
    println!(
        "weaver-checkpoint, {gib:.2} GiB in {} f32 tensors, {} repeats (median), local disk, fsync + CRC-32C",
        a.tensors, a.repeats
    );
    println!(
        "{:<16} {:>10} {:>10} {:>10}",
        "op", "stall s", "total s", "GiB/s"
    );
    for (op, s, t) in rows_out {
        println!("{op:<16} {s:>10.3} {t:>10.3} {:>10.2}", gib / t);
    }
    println!(
        "(save: stall = snapshot copy {:.3} s + start; shard durable at {:.3} s; then commit)",
        median(copy.clone()),
        median(durable.clone())
    );
    for (op, s, t) in rows_out {
        let stall = if s.is_nan() {
            serde_json::Value::Null
        } else {
            s.into()
        };
        let (all_total, all_stall): (&Vec<f64>, Vec<f64>) = match op {
            "save" => (&save, stall_v.clone()),
            "load" => (&load, vec![]),
            "resharded_load" => (&reshard, vec![]),
            "save_tp2" => (&save2, vec![]),
            _ => (&save_fresh, stall_fresh.clone()),
        };
        println!(
            "RESULT {}",
            serde_json::json!({
                "bench": "checkpoint", "impl": "weaver", "op": op,
                "stall_s": stall, "total_s": t, "bytes": bytes, "repeats": a.repeats,
                "all_total_s": all_total, "all_stall_s": all_stall,
            })
        );
    }
    println!(
        "RESULT {}",
        serde_json::json!({"bench": "checkpoint", "impl": "weaver", "op": "save_snapshot_copy",
            "stall_s": median(copy), "bytes": bytes})
    );
    Ok(())
}
