"""The checks and the report of bench/gpu/run.sh: reads run directories (metrics.jsonl),
logs and the model bench's RESULT line, decides PASS/FAIL, and prints the final table and
the RESULT lines. Standard library only (the GPU machine has no pip).

    check.py parity REF RUN [--tol T] [--steps N]       losses of RUN against REF, step by step
    check.py job RUN --steps N [--evals S,..]            a finished job: every step, evals, done
    check.py devices LOG --want cuda|cpu --ranks N       every rank built on the wanted device
    check.py nccl LOG --mode gpu|smoke                   the NCCL conformance run's verdict
    check.py stream LOG                                  the stream-order check's verdict
    check.py anchor LOG [--params LO,HI] [--tol T]       the model bench's RESULT line
    check.py train RUN --steps N [--skip K]              ms/step, samples/s, MFU of a weaver train run
    check.py same-eval RUN EVAL_JSON                     `weaver eval` of the checkpoint = the job's
    check.py report RESULTS_JSONL                        the final table, then RESULT lines

Each check prints one line (the detail) and exits 0 (pass) or 1 (fail); with --json FILE
it also writes the figures it measured there, for the report.
"""

import argparse
import json
import math
import statistics
import sys


def metrics(run):
    out = []
    try:
        with open(f"{run}/metrics.jsonl") as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
    except FileNotFoundError:
        pass
    return out


def losses(run):
    """Training loss by step (the first line of each step)."""
    seen = {}
    for m in metrics(run):
        if "loss" in m and "step" in m and m["step"] not in seen:
            seen[m["step"]] = m["loss"]
    return seen


def done(ok, detail, figures=None, json_out=None):
    print(detail)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(figures or {}, f)
    sys.exit(0 if ok else 1)


def cmd_parity(a):
    ref, run = losses(a.ref), losses(a.run)
    steps = range(1, a.steps + 1)
    missing = [s for s in steps if s not in ref or s not in run]
    if missing:
        done(False, f"steps {missing} missing (reference has {sorted(ref)}, run has {sorted(run)})")
    worst, at = 0.0, 1
    for s in steps:
        r, x = ref[s], run[s]
        if not (math.isfinite(r) and math.isfinite(x)):
            done(False, f"step {s}: loss {x} vs one process {r} (not finite)")
        rel = abs(x - r) / max(abs(r), 1e-12)
        if rel > worst:
            worst, at = rel, s
    ok = worst <= a.tol
    figures = {"max_rel_loss_diff": worst, "steps_compared": a.steps}
    done(ok, f"losses of steps 1..{a.steps} {'match' if ok else 'DIFFER FROM'} one process: "
             f"max relative difference {worst:.2e} at step {at} (tolerance {a.tol:.0e})",
         figures, a.json)


def cmd_job(a):
    m = metrics(a.run)
    steps = sorted(losses(a.run))
    want = list(range(1, a.steps + 1))
    if steps != want:
        done(False, f"trained steps {steps}, want {want}")
    evals = sorted({x["step"] for x in m if x.get("eval") is True})
    need = [int(s) for s in a.evals.split(",")] if a.evals else []
    lacking = [s for s in need if s not in evals]
    if lacking:
        done(False, f"no evaluation at step(s) {lacking} (evaluations at {evals})")
    last = m[-1] if m else {}
    if last.get("done") is not True or last.get("step") != a.steps:
        done(False, f"the last metrics line is not done at step {a.steps}: {last}")
    final_eval = [x for x in m if x.get("eval") is True and x["step"] == a.steps]
    fig = {"evals_at": evals, "final_eval": final_eval[-1] if final_eval else None}
    done(True, f"{a.steps} steps, evaluations at {evals}, done", fig, a.json)


def cmd_devices(a):
    want = {"cuda": "Cuda", "cpu": "Cpu"}[a.want]
    built = []
    with open(a.log, errors="replace") as f:
        for line in f:
            if "rank built" in line:
                i = line.find("device=")
                built.append(line[i + 7:].split()[0] if i >= 0 else "?")
    on = [d for d in built if d.startswith(want)]
    if len(built) < a.ranks:
        done(False, f"{len(built)} rank(s) reported being built, want {a.ranks}")
    if len(on) != len(built):
        done(False, f"ranks built on {sorted(set(built))}, want {want} for every rank")
    done(True, f"{len(built)} rank(s) built on {sorted(set(built))}")


def cmd_nccl(a):
    text = open(a.log, errors="replace").read()
    if "nccl backend available" in text:
        ok = "test result: ok" in text and "FAILED" not in text
        done(ok, "NCCL at world size 1: the conformance suite " + ("passed" if ok else "FAILED"))
    why = next((l.strip() for l in text.splitlines() if "unavailable here" in l or "panicked" in l), "")
    if a.mode == "gpu":
        done(False, "the NCCL backend was unavailable on the GPU machine: " + (why[:300] or "(no message)"))
    ok = "test result: ok" in text
    done(ok, f"the binary ran and reported NCCL unavailable ({why[:200]})")


def cmd_stream(a):
    text = open(a.log, errors="replace").read()
    n = text.count(": verified")
    ok = n >= 2 and "test result: ok" in text
    why = next((l.strip() for l in text.splitlines() if "SKIP" in l or "panicked" in l),
               (text.strip().splitlines() or ["no output"])[-1])
    done(ok, f"stream order: {n} of 2 variants verified (all_gather, all_gather_start + wait)"
             if n else "stream order: not verified: " + why[:300])


def result_line(path):
    for line in open(path, errors="replace"):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return None


def cmd_anchor(a):
    r = result_line(a.log)
    if r is None:
        done(False, "model_bench printed no RESULT line")
    fig = dict(r)
    problems = []
    if a.params:
        lo, hi = (float(x) for x in a.params.split(","))
        if not lo <= r["params"] <= hi:
            problems.append(f"params {r['params']:.4e} outside [{lo:.3e}, {hi:.3e}]")
    base = r.get("weaver_loss")
    diffs = {}
    for key in ("torch", "compile"):
        other = r.get(f"{key}_loss")
        if other is None:
            problems.append(f"no {key} figures ({r.get(f'{key}_error', 'the PyTorch side did not run')})")
            continue
        if not (math.isfinite(base) and math.isfinite(other)):
            problems.append(f"{key} loss {other} vs weaver {base}")
            continue
        diffs[key] = abs(other - base) / max(abs(base), 1e-12)
        if diffs[key] > a.tol:
            problems.append(f"{key} loss {other:.4f} vs weaver {base:.4f} "
                            f"(relative {diffs[key]:.1e} > {a.tol:.0e})")
    fig["loss_rel_diff"] = diffs
    ms = lambda k: f"{r[k] * 1e3:.1f}" if r.get(k) else "-"
    detail = (f"params {r['params']:.4e}; ms/step weaver {ms('weaver_step_s')}, eager "
              f"{ms('torch_step_s')}, compile {ms('compile_step_s')}; final losses within "
              + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    if problems:
        done(False, detail + "; " + "; ".join(problems), fig, a.json)
    done(True, detail, fig, a.json)


def cmd_train(a):
    m = metrics(a.run)
    rows = [x for x in m if "step_time_s" in x and "loss" in x]
    by_step = {}
    for x in rows:
        by_step.setdefault(x["step"], x)
    if sorted(by_step) != list(range(1, a.steps + 1)):
        done(False, f"trained steps {sorted(by_step)}, want 1..{a.steps}")
    steady = [by_step[s] for s in range(a.skip + 1, a.steps + 1)]
    step_s = statistics.median(x["step_time_s"] for x in steady)
    gb = None
    try:
        import tomllib

        with open(f"{a.run}/config.toml", "rb") as f:
            gb = tomllib.load(f)["train"]["global_batch"]
    except (OSError, KeyError, ValueError):
        pass
    fig = {"steps": a.steps, "median_step_s": step_s, "steps_timed": len(steady),
           "tokens_per_s": statistics.median(x["tokens_per_s"] for x in steady)}
    if gb:
        fig["samples_per_s"] = gb / step_s
    mfus = [x["mfu"] for x in steady if x.get("mfu") is not None]
    if mfus:
        fig["mfu"] = statistics.median(mfus)
    if steady and steady[0].get("flops_per_s") is not None:
        fig["tflops"] = statistics.median(x["flops_per_s"] for x in steady) / 1e12
    last = m[-1] if m else {}
    fig["wall_s"] = last.get("wall_s")
    fig["final_loss"] = last.get("final_loss")
    extra = f", MFU {100 * fig['mfu']:.1f}%" if "mfu" in fig else ""
    sps = f", {fig['samples_per_s']:.1f} samples/s" if "samples_per_s" in fig else ""
    timed = (f"{a.steps} steps, data included: median {step_s * 1e3:.1f} ms/step over steps "
             f"{a.skip + 1}..{a.steps}{sps}{extra}")
    if last.get("done") is not True:
        # Every step was timed, but the run did not end (its final checkpoint, export or
        # evaluation): the figures stand, the part fails.
        done(False, f"{timed}; but the run did not finish after its steps (no done line)", fig, a.json)
    done(True, f"{timed}, whole run {fig['wall_s']:.1f} s", fig, a.json)


def cmd_same_eval(a):
    m = metrics(a.run)
    final = [x for x in m if x.get("eval") is True]
    if not final:
        done(False, "the job has no evaluation line")
    job = final[-1]
    try:
        ev = json.load(open(a.eval_json))
    except (OSError, json.JSONDecodeError) as e:
        done(False, f"`weaver eval` printed no JSON: {e}")
    keys = ["step", "i2t_r1", "t2i_r1", "caption_exact"]
    diff = {k: (ev.get(k), job.get(k)) for k in keys if ev.get(k) != job.get(k)}
    done(not diff, "weaver eval of the checkpoint gives the job's final evaluation"
         if not diff else f"weaver eval of the checkpoint differs from the job's: {diff}")


def fmt_num(x, unit=""):
    if x is None:
        return "-"
    return f"{x:.3g}{unit}" if isinstance(x, float) else f"{x}{unit}"


def cmd_report(a):
    parts = [json.loads(l) for l in open(a.results) if l.strip()]
    print()
    print(f"{'part':<24} {'status':<6} {'seconds':>8}  detail")
    for p in parts:
        print(f"{p['part']:<24} {p['status']:<6} {p.get('seconds', 0):>8.1f}  {p.get('detail', '')[:150]}")
    anchor = next((p for p in parts if p["part"] == "anchor_step" and p.get("figures")), None)
    if anchor:
        r = anchor["figures"]
        gib = lambda k: f"{r[k] / 2**30:.1f}" if r.get(k) else "-"
        print()
        print(f"anchor step ({r.get('flavor')}, {r.get('params', 0):.3e} params, {r.get('dtype')}, "
              f"batch {r.get('global_batch')}, {r.get('device')}):")
        print(f"{'':<16} {'ms/step':>9} {'samples/s':>10} {'TFLOP/s':>9} {'MFU':>7} {'peak GiB':>9} "
              f"{'kernels':>8} {'ATen ops':>9}")
        for key, label in (("weaver", "weaver"), ("torch", "pytorch eager"), ("compile", "torch.compile")):
            s = r.get(f"{key}_step_s")
            if s is None:
                continue
            mfu = r.get(f"{key}_mfu")
            kern = r.get("kernel_launches_per_step") if key == "weaver" else r.get(f"{key}_kernel_launches_per_step")
            ops = r.get("aten_ops_per_step") if key == "weaver" else r.get(f"{key}_aten_ops_per_step")
            print(f"{label:<16} {s * 1e3:>9.1f} {r[f'{key}_samples_per_s']:>10.1f} {r[f'{key}_tflops']:>9.1f} "
                  f"{(f'{100 * mfu:.1f}%' if mfu is not None else '-'):>7} {gib(f'{key}_peak_mem_bytes'):>9} "
                  f"{fmt_num(kern):>8} {fmt_num(ops):>9}")
    fails = [p["part"] for p in parts if p["status"] == "FAIL"]
    skips = [p["part"] for p in parts if p["status"] == "SKIP"]
    print()
    print(f"{len(parts)} parts: {len(parts) - len(fails) - len(skips)} PASS, {len(fails)} FAIL"
          + (f" ({', '.join(fails)})" if fails else "") + f", {len(skips)} SKIP"
          + (f" ({', '.join(skips)})" if skips else ""))
    for p in parts:
        line = dict(p.get("figures") or {})
        if "bench" in line:
            line["measured_by"] = line.pop("bench")
        line.update({"bench": "gpu", "part": p["part"], "status": p["status"],
                     "seconds": p.get("seconds"), "mode": p.get("mode")})
        print("RESULT " + json.dumps(line, sort_keys=True))
    sys.exit(1 if fails else 0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("parity")
    p.add_argument("ref")
    p.add_argument("run")
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--json")
    p = sub.add_parser("job")
    p.add_argument("run")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--evals", default="")
    p.add_argument("--json")
    p = sub.add_parser("devices")
    p.add_argument("log")
    p.add_argument("--want", choices=["cuda", "cpu"], required=True)
    p.add_argument("--ranks", type=int, required=True)
    p = sub.add_parser("nccl")
    p.add_argument("log")
    p.add_argument("--mode", choices=["gpu", "smoke"], required=True)
    p = sub.add_parser("stream")
    p.add_argument("log")
    p = sub.add_parser("anchor")
    p.add_argument("log")
    p.add_argument("--params", help="LO,HI: the parameter count must lie in between")
    p.add_argument("--tol", type=float, default=0.05, help="relative loss difference allowed")
    p.add_argument("--json")
    p = sub.add_parser("train")
    p.add_argument("run")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--skip", type=int, default=5, help="first steps left out of the median")
    p.add_argument("--json")
    p = sub.add_parser("same-eval")
    p.add_argument("run")
    p.add_argument("eval_json")
    p = sub.add_parser("report")
    p.add_argument("results")
    a = ap.parse_args()
    {"parity": cmd_parity, "job": cmd_job, "devices": cmd_devices, "nccl": cmd_nccl,
     "stream": cmd_stream, "anchor": cmd_anchor, "train": cmd_train,
     "same-eval": cmd_same_eval, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    main()
