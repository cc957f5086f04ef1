"""bench/checkpoint, PyTorch DCP's side: the same state as weaver's bench (N f32 tensors of
[rows, 4096], about 1 GiB, seeded) saved and loaded with torch.distributed.checkpoint on local
disk (FileSystemWriter defaults: fsync on). Measures dcp.save, dcp.async_save (blocking part
and total), dcp.load, and a resharded load (saved by two gloo ranks as DTensors, even tensors
Shard(0), odd Shard(1), loaded whole into one process). Prints a table, then RESULT lines
(median over repeats). With --weaver FILE (the weaver bench's output) it prints the two
side by side, with the goals.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

warnings.filterwarnings("ignore")
COLS = 4096


def make_state(mib, tensors):
    rows = (mib << 20) // (tensors * COLS * 4)
    torch.manual_seed(0)
    return {f"layers.{i}.w": torch.randn(rows, COLS) for i in range(tensors)}


def save_sharded(rank, world, path, mib, tensors, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    state = make_state(mib, tensors)
    sharded = {
        k: distribute_tensor(v, mesh, [Shard(i % 2)])
        for i, (k, v) in enumerate(state.items())
    }
    del state
    dcp.save(sharded, checkpoint_id=path)
    dist.barrier()
    dist.destroy_process_group()


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "weaver-ckpt-bench"))
    p.add_argument("--mib", type=int, default=1024)
    p.add_argument("--tensors", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--summarize", nargs="+", metavar="FILE",
                   help="instead of measuring: read RESULT lines of interleaved weaver and DCP runs "
                        "and print the side-by-side table of medians, with the goals")
    a = p.parse_args()
    if a.summarize:
        return summarize(a.summarize)
    torch.set_num_threads(2)
    os.makedirs(a.dir, exist_ok=True)
    state = make_state(a.mib, a.tensors)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())

    res = {k: [] for k in ["save", "async_blocking", "async_total", "load", "reshard"]}
    for rep in range(a.repeats):
        root = os.path.join(a.dir, f"dcp-{rep}")
        shutil.rmtree(root, ignore_errors=True)

        t0 = time.perf_counter()
        dcp.save(state, checkpoint_id=os.path.join(root, "sync"))
        res["save"].append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        fut = dcp.async_save(state, checkpoint_id=os.path.join(root, "async"))
        res["async_blocking"].append(time.perf_counter() - t0)
        (fut.upload_completion if hasattr(fut, "upload_completion") else fut).result()
        res["async_total"].append(time.perf_counter() - t0)

        dest = {k: torch.empty_like(v) for k, v in state.items()}
        t0 = time.perf_counter()
        dcp.load(dest, checkpoint_id=os.path.join(root, "sync"))
        res["load"].append(time.perf_counter() - t0)
        if rep == 0:
            assert all(torch.equal(dest[k], v) for k, v in state.items()), "dcp load differs"
        del dest

        path = os.path.join(root, "tp2")
        mp.spawn(save_sharded, args=(2, path, a.mib, a.tensors, free_port()), nprocs=2)
        dest = {k: torch.empty_like(v) for k, v in state.items()}
        t0 = time.perf_counter()
        dcp.load(dest, checkpoint_id=path)
        res["reshard"].append(time.perf_counter() - t0)
        if rep == 0:
            assert all(torch.equal(dest[k], v) for k, v in state.items()), "dcp resharded load differs"
        del dest
        shutil.rmtree(root, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in res.items()}
    gib = nbytes / 2**30
    results = [
        dict(op="save", api="dcp.save", stall_s=med["save"], total_s=med["save"], all_total_s=res["save"]),
        dict(op="async_save", api="dcp.async_save", stall_s=med["async_blocking"], total_s=med["async_total"],
             all_stall_s=res["async_blocking"], all_total_s=res["async_total"]),
        dict(op="load", api="dcp.load", stall_s=med["load"], total_s=med["load"], all_total_s=res["load"]),
        dict(op="resharded_load", api="dcp.load (saved by 2 gloo ranks as DTensor)", stall_s=med["reshard"],
             total_s=med["reshard"], all_total_s=res["reshard"]),
    ]
    print(f"torch {torch.__version__} DCP, {gib:.2f} GiB in {a.tensors} f32 tensors, {a.repeats} repeats (median), local disk, fsync")
    print(f"{'op':<16} {'stall s':>10} {'total s':>10} {'GiB/s':>10}")
    for r in results:
        print(f"{r['op']:<16} {r['stall_s']:>10.3f} {r['total_s']:>10.3f} {gib / r['total_s']:>10.2f}")

    for r in results:
        r.update(bench="checkpoint", impl="dcp", bytes=nbytes, repeats=a.repeats)
        print("RESULT " + json.dumps(r))


def summarize(files):
    runs = {}
    nbytes = None
    for path in files:
        with open(path) as f:
            for line in f:
                if not line.startswith("RESULT "):
                    continue
                r = json.loads(line[7:])
                if r.get("bench") != "checkpoint" or "total_s" not in r:
                    continue
                nbytes = r["bytes"]
                runs.setdefault((r["impl"], r["op"]), []).append(r)
    med = lambda xs: statistics.median(xs) if xs else float("nan")
    table = {}
    for (impl, op), rs in runs.items():
        stalls = [r["stall_s"] for r in rs if r.get("stall_s") is not None]
        table[(impl, op)] = dict(stall_s=med(stalls) if stalls else None, total_s=med([r["total_s"] for r in rs]),
                                 runs=len(rs), all_stall_s=stalls, all_total_s=[r["total_s"] for r in rs])
    gib = nbytes / 2**30
    n = max(v["runs"] for v in table.values())
    print(f"bench/checkpoint: {gib:.2f} GiB of f32 state, one process, local disk, fsync on, median of {n} "
          f"interleaved runs (weaver: CRC-32C on every block written and read)")
    print(f"{'impl':<7} {'op':<15} {'stall s':>8} {'total s':>8} {'GiB/s':>6}   runs (total s)")
    for (impl, op), v in sorted(table.items(), key=lambda kv: (kv[0][0] != "weaver", kv[0][1])):
        st = "-" if v["stall_s"] is None else f"{v['stall_s']:.3f}"
        print(f"{impl:<7} {op:<15} {st:>8} {v['total_s']:>8.3f} {gib / v['total_s']:>6.2f}   "
              + " ".join(f"{x:.2f}" for x in v["all_total_s"]))
    w = lambda op: table[("weaver", op)]
    d = lambda op: table[("dcp", op)]
    rows = [
        ("stall: weaver save / dcp.async_save blocking", w("save")["stall_s"], d("async_save")["stall_s"], 0.5),
        ("total: weaver save / dcp.save", w("save")["total_s"], d("save")["total_s"], 1.0),
        ("total: weaver save / dcp.async_save", w("save")["total_s"], d("async_save")["total_s"], 1.0),
        ("load: weaver / dcp.load", w("load")["total_s"], d("load")["total_s"], 1.0),
        ("resharded load: weaver / dcp.load", w("resharded_load")["total_s"], d("resharded_load")["total_s"], 1.0),
        ("(stall, unpooled snapshot / async_save blocking)", w("save_unpooled")["stall_s"],
         d("async_save")["stall_s"], None),
    ]
    print()
    print(f"{'comparison':<50} {'weaver':>7} {'DCP':>7} {'ratio':>6}  goal")
    out = []
    for name, x, y, goal in rows:
        ratio = x / y
        verdict = "" if goal is None else f"<= {goal}: {'met' if ratio <= goal else 'MISSED'}"
        print(f"{name:<50} {x:>7.3f} {y:>7.3f} {ratio:>6.2f}  {verdict}")
        out.append(dict(bench="checkpoint", impl="weaver/dcp", op="compare", measurement=name, weaver_s=x, dcp_s=y,
                        ratio=ratio, goal=goal, met=None if goal is None else ratio <= goal, runs=n))
    for (impl, op), v in sorted(table.items()):
        print("RESULT " + json.dumps(dict(bench="checkpoint", impl=impl, op=op, median_of=v["runs"], bytes=nbytes,
                                          stall_s=v["stall_s"], total_s=v["total_s"],
                                          all_stall_s=v["all_stall_s"], all_total_s=v["all_total_s"])))
    for r in out:
        print("RESULT " + json.dumps(r))


if __name__ == "__main__":
    main()
