"""One rank of the gloo side of bench/collectives: torch.distributed's gloo all-reduce timed
exactly like weaver's (same sizes, iterations, repeats, float32 SUM, barrier before each
repeat). Driven by collectives_bench over stdin: `run BYTES ITERS REPS` or `quit`; rank 0
answers `RES BYTES CPU t1 t2 ...` (CPU seconds per all-reduce of this process, then
seconds per all-reduce for each repeat)."""

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{a.port}", rank=a.rank, world_size=a.world
    )
    dist.barrier()
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        nbytes, iters, reps = (int(x) for x in cmd[1:4])
        t = torch.zeros(nbytes // 4, dtype=torch.float32)
        for _ in range(iters):
            dist.all_reduce(t)
        times = []
        cpu0 = time.process_time()
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                dist.all_reduce(t)
            times.append((time.perf_counter() - t0) / iters)
        cpu = (time.process_time() - cpu0) / (iters * reps)
        if a.rank == 0:
            print("RES", nbytes, cpu, *times, flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
