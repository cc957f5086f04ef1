"""bench/distill's table: every arm on every seed, each arm's mean ± standard deviation over
the seeds, and its paired difference against the student alone (same seed: same
initialisation and the same batches in both runs), then one RESULT {json} line per run and
one per arm.

    python3 bench/distill/summarize.py OUT_DIR --arms alone,defaults,... --seeds 0,1,2,3
        [--teacher-eval FILE] [--steps N] [--teacher-steps N]

OUT_DIR holds one run directory per arm and seed, `ARM_sSEED/metrics.jsonl` (the final eval
line of each is read). The score of a run is `r1` = the mean of its i→t and t→i recall@1
(and `r5` likewise), over the held-out pool.
"""

import argparse
import json
import math
import os


def last_eval(path):
    with open(path) as f:
        ev = [json.loads(l) for l in f if '"eval"' in l]
    if not ev:
        raise SystemExit(f"{path}: no eval line (did the run finish?)")
    return ev[-1]


def stats(xs):
    """mean, sample standard deviation, standard error of the mean."""
    n = len(xs)
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")
    return m, sd, sd / math.sqrt(n) if n > 1 else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--arms", required=True)
    ap.add_argument("--seeds", required=True)
    ap.add_argument("--teacher-eval")
    ap.add_argument("--steps", type=int, default=-1)
    ap.add_argument("--teacher-steps", type=int, default=-1)
    a = ap.parse_args()
    arms = a.arms.split(",")
    seeds = [int(s) for s in a.seeds.split(",")]
    runs = {}
    for arm in arms:
        for s in seeds:
            e = last_eval(os.path.join(a.out, f"{arm}_s{s}", "metrics.jsonl"))
            e["r1"] = (e["i2t_r1"] + e["t2i_r1"]) / 2
            e["r5"] = (e["i2t_r5"] + e["t2i_r5"]) / 2
            runs[(arm, s)] = e
    results = []
    pool = runs[(arms[0], seeds[0])]["pool"]
    if a.teacher_eval:
        t = last_eval(a.teacher_eval)
        tr1 = (t["i2t_r1"] + t["t2i_r1"]) / 2
        tr5 = (t["i2t_r5"] + t["t2i_r5"]) / 2
        print(f"teacher (small, {a.teacher_steps if a.teacher_steps >= 0 else '-'} steps): "
              f"i2t_r1 {t['i2t_r1']:.3f}  t2i_r1 {t['t2i_r1']:.3f}  i2t_r5 {t['i2t_r5']:.3f}  "
              f"t2i_r5 {t['t2i_r5']:.3f}  (pool {t['pool']})")
        results.append({"bench": "distill", "run": "teacher", "steps": a.teacher_steps,
                        "r1": tr1, "r5": tr5, **{k: t[k] for k in (
                            "i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5", "pool")}})
    print(f"\nstudents (debug, {a.steps} steps), held-out pool {pool}; r1 = mean of i2t/t2i R@1")
    print(f"{'arm':12} {'seed':>4} {'i2t_r1':>7} {'t2i_r1':>7} {'i2t_r5':>7} {'t2i_r5':>7} "
          f"{'r1':>6} {'r5':>6} {'Δr1':>7} {'Δr5':>7}")
    for arm in arms:
        for s in seeds:
            e, base = runs[(arm, s)], runs.get(("alone", s))
            d1 = e["r1"] - base["r1"] if base else float("nan")
            d5 = e["r5"] - base["r5"] if base else float("nan")
            print(f"{arm:12} {s:4d} {e['i2t_r1']:7.3f} {e['t2i_r1']:7.3f} {e['i2t_r5']:7.3f} "
                  f"{e['t2i_r5']:7.3f} {e['r1']:6.3f} {e['r5']:6.3f} {d1:+7.3f} {d5:+7.3f}")
            results.append({"bench": "distill", "run": arm, "seed": s, "steps": a.steps,
                            **{k: e[k] for k in ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5",
                                                 "i2t_r10", "t2i_r10", "r1", "r5",
                                                 "caption_exact", "pool")}})
    print(f"\n{'arm':12} {'r1 mean ± sd':>15} {'r5 mean ± sd':>15} "
          f"{'Δr1 mean ± se':>16} {'Δr1>0':>6} {'Δr5 mean ± se':>16} {'Δr5>0':>6}")
    for arm in arms:
        r1 = stats([runs[(arm, s)]["r1"] for s in seeds])
        r5 = stats([runs[(arm, s)]["r5"] for s in seeds])
        row = {"bench": "distill", "summary": arm, "seeds": len(seeds), "steps": a.steps,
               "pool": pool, "r1_mean": r1[0], "r1_sd": r1[1], "r5_mean": r5[0],
               "r5_sd": r5[1]}
        line = f"{arm:12} {r1[0]:7.3f} ± {r1[1]:5.3f} {r5[0]:7.3f} ± {r5[1]:5.3f}"
        if arm != "alone" and "alone" in arms:
            d1 = [runs[(arm, s)]["r1"] - runs[("alone", s)]["r1"] for s in seeds]
            d5 = [runs[(arm, s)]["r5"] - runs[("alone", s)]["r5"] for s in seeds]
            s1, s5 = stats(d1), stats(d5)
            pos1, pos5 = sum(d > 0 for d in d1), sum(d > 0 for d in d5)
            line += (f" {s1[0]:+8.3f} ± {s1[2]:5.3f} {pos1:3d}/{len(seeds)}"
                     f" {s5[0]:+8.3f} ± {s5[2]:5.3f} {pos5:3d}/{len(seeds)}")
            row.update({"d_r1_mean": s1[0], "d_r1_se": s1[2], "d_r1_positive": pos1,
                        "d_r5_mean": s5[0], "d_r5_se": s5[2], "d_r5_positive": pos5,
                        # Above the seed noise: positive on every seed, or a mean paired
                        # difference above twice its standard error.
                        "above_noise": pos1 == len(seeds) or s1[0] > 2 * s1[2]})
        print(line)
        results.append(row)
    print()
    for r in results:
        print("RESULT " + json.dumps(r))


if __name__ == "__main__":
    main()
