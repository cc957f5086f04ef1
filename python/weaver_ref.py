"""PyTorch reference implementation of weaver's multimodal model.

The same model as models/src/model.rs, written functionally over a dict of tensors whose
names are weaver's parameter names, so it loads weaver's safetensors files as they are.
Used by the parity tests (same losses and gradients on the same batch) and as the PyTorch
eager baseline of the benchmarks.

    python weaver_ref.py losses --config cfg.json --weights w.safetensors \
        --batch batch.safetensors [--grads-out grads.safetensors]

prints one JSON object with the losses (total, itc, caption, itm).

    python weaver_ref.py bench --config cfg.json --weights w.safetensors \
        --batch batch.safetensors [--device cuda:0] [--dtype bf16] [--modes eager,compile] [--count]

prints one JSON line per mode (as each is measured): median step time (wall and this
process's CPU time), loss, peak CUDA memory and, with --count, the ATen ops / CUDA kernels of
one step; a failed mode prints its error (worker/examples/model_bench runs it). With --serve
the eager mode, after its warmup, prints {"ready": "eager"} and times steps when asked on
stdin ("run N" answers {"round": "eager", "wall_s": [...], "cpu_s": [...]}; "done" ends), so
that the caller can interleave its own steps with PyTorch's.
"""

import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


def layer_norm(p, name, x, eps):
    return F.layer_norm(x, (x.shape[-1],), p[f"{name}.weight"], p[f"{name}.bias"], eps)


def linear(p, name, x, bias=True):
    b = p.get(f"{name}.bias") if bias else None
    return F.linear(x, p[f"{name}.weight"], b)


def attention(p, name, xq, xkv, heads, causal=False, mask=None):
    b, tq, _ = xq.shape
    tk = xkv.shape[1]
    # q projects to heads × head_dim, which need not be the stream's width (model.*_head_dim).
    a_width = p[f"{name}.q.weight"].shape[0]
    hd = a_width // heads

    def split(x, t):
        return x.view(b, t, heads, hd).transpose(1, 2)

    q = split(linear(p, f"{name}.q", xq), tq)
    k = split(linear(p, f"{name}.k", xkv), tk)
    v = split(linear(p, f"{name}.v", xkv), tk)
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    a = a.transpose(1, 2).reshape(b, tq, a_width)
    return linear(p, f"{name}.o", a)


def block(p, name, x, heads, eps, causal=False, mask=None, memory=None, gated=False):
    h = layer_norm(p, f"{name}.ln1", x, eps)
    x = x + attention(p, f"{name}.attn", h, h, heads, causal=causal, mask=mask)
    if memory is not None:
        h = layer_norm(p, f"{name}.ln_x", x, eps)
        y = attention(p, f"{name}.xattn", h, memory, heads)
        if gated:
            y = y * torch.tanh(p[f"{name}.gate"])
        x = x + y
    h = layer_norm(p, f"{name}.ln2", x, eps)
    h = F.gelu(linear(p, f"{name}.mlp.fc1", h))
    return x + linear(p, f"{name}.mlp.fc2", h)


def patchify(images, patch):
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def normalize(x):
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def gather_rows(x, idx):
    return x[torch.arange(x.shape[0], device=x.device), idx]


def prefix_mask(n, total, device):
    idx = torch.arange(total, device=device)
    causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()
    image_col = (idx < n)[None, :]
    text_row = (idx >= n)[:, None]
    return (image_col & ~text_row) | (text_row & (image_col | causal))


def forward_losses(p, cfg, images, tokens, eos, weights, pad_id):
    """The losses of one micro-batch: dict of scalar tensors."""
    eps = cfg["norm_eps"]
    fusion = cfg["fusion"]
    n = (cfg["image_size"] // cfg["patch_size"]) ** 2
    bsz = images.shape[0]
    kind = p["vision.pos"].dtype

    # Image encoder.
    x = linear(p, "vision.patch_embed", patchify(images.to(kind), cfg["patch_size"])) + p["vision.pos"]
    for i in range(cfg["vision_layers"]):
        x = block(p, f"vision.blocks.{i}", x, cfg["vision_heads"], eps)
    img = layer_norm(p, "vision.ln_post", x, eps)
    image_emb = normalize(img.mean(dim=1) @ p["vision.proj"].t())

    # Unimodal text layers.
    t = F.embedding(tokens, p["text.tok_embed.weight"]) + p["text.pos"]
    for i in range(cfg["unimodal_layers"]):
        t = block(p, f"text.unimodal.{i}", t, cfg["text_heads"], eps, causal=True)
    pooled = layer_norm(p, "text.ln_pool", gather_rows(t, eos), eps)
    text_emb = normalize(pooled @ p["text.proj"].t())

    # Multimodal text layers, with matching negatives (caption i with image i + 1).
    itm = weights["itm"] > 0
    if itm:
        img = torch.cat([img, img.roll(-1, 0)], 0)
        t = torch.cat([t, t], 0)
    if fusion == "prefix":
        t = torch.cat([linear(p, "fusion.image_proj", img), t], 1)
        mask = prefix_mask(n, t.shape[1], t.device)
        for i in range(cfg["multimodal_layers"]):
            t = block(p, f"text.multimodal.{i}", t, cfg["text_heads"], eps, mask=mask)
        t = t[:, n:]
    else:
        gated = fusion == "gated_cross_attention"
        for i in range(cfg["multimodal_layers"]):
            t = block(p, f"text.multimodal.{i}", t, cfg["text_heads"], eps, causal=True,
                      memory=img, gated=gated)

    h = layer_norm(p, "head.ln", t, eps)
    tl = h.shape[1]
    logits = F.linear(h[:bsz, : tl - 1], p["head.lm.weight"]).float()
    caption = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                              ignore_index=pad_id)

    scale = p["head.logit_scale"].float().exp().clamp(max=100.0)
    sim = image_emb @ text_emb.t() * scale
    labels = torch.arange(bsz, device=sim.device)
    itc = (F.cross_entropy(sim, labels) + F.cross_entropy(sim.t(), labels)) * 0.5

    if itm:
        at_eos = gather_rows(h, torch.cat([eos, eos], 0))
        logits = linear(p, "head.itm", at_eos).float()
        y = torch.cat([torch.ones(bsz, dtype=torch.long), torch.zeros(bsz, dtype=torch.long)]).to(logits.device)
        itm_loss = F.cross_entropy(logits, y)
    else:
        itm_loss = torch.zeros((), device=h.device)
    total = itc * weights["itc"] + caption * weights["caption"] + itm_loss * weights["itm"]
    return {"total": total, "itc": itc, "caption": caption, "itm": itm_loss}


def train_flops_per_sample(cfg, itm):
    """Training FLOPs per sample, the same formula as ModelConfig::train_flops_per_sample."""
    dv, dt, r = cfg["vision_width"], cfg["text_width"], cfg["mlp_ratio"]
    n = (cfg["image_size"] // cfg["patch_size"]) ** 2
    t = cfg["max_text_len"]
    patch_dim = cfg["patch_size"] ** 2 * 3

    def blk(d, tokens, keys):
        return tokens * (2 * 4 * d * d + 2 * 2 * r * d * d) + 2 * 2 * tokens * keys * d

    vision = 2 * n * patch_dim * dv + cfg["vision_layers"] * blk(dv, n, n) + 2 * dv * cfg["embed_dim"]
    uni = cfg["unimodal_layers"] * blk(dt, t, t) + 2 * dt * cfg["embed_dim"]
    copies = 2 if itm else 1
    if cfg["fusion"] == "prefix":
        mm = blk(dt, t + n, t + n)
        pre = 2 * n * dv * dt
    else:
        mm = blk(dt, t, t) + 4 * t * dt * dt + 4 * n * dv * dt + 4 * t * n * dt
        pre = 0
    fwd = vision + uni + copies * (pre + cfg["multimodal_layers"] * mm) + 2 * t * dt * cfg["vocab_size"]
    fwd += 8 * dt if itm else 0
    return 3.0 * fwd


def profile_counts(device, run_step, ops=0):
    """Runs one step under torch.profiler and counts what it did, with the same definitions
    as weaver's own count (prof/src/shim.cpp): ATen operator calls (nested included), and
    on CUDA the kernels, copies and memsets that ran on the GPU and the host calls that
    blocked on it."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, acc_events=True) as prof:
        run_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    counts = {"aten_ops": 0, "gpu_kernels": 0, "gpu_memcpys": 0, "gpu_memsets": 0, "sync_calls": 0}
    for e in prof.profiler.kineto_results.events():
        name = e.name()
        if e.device_type() == torch.autograd.DeviceType.CUDA:
            if name.startswith("Memcpy"):
                counts["gpu_memcpys"] += 1
            elif name.startswith("Memset"):
                counts["gpu_memsets"] += 1
            else:
                counts["gpu_kernels"] += 1
        elif name.startswith("aten::") and e.scope() == 0:  # RecordScope::FUNCTION
            counts["aten_ops"] += 1
        elif "Synchronize" in name or name in ("cudaMemcpy", "cudaMemcpy2D"):
            counts["sync_calls"] += 1
    if device.type != "cuda":
        for k in ("gpu_kernels", "gpu_memcpys", "gpu_memsets", "sync_calls"):
            counts[k] = None
    if ops > 0:
        # Every CPU operator's calls and self time (the shim's table in weaver's profile), so
        # the caller can pick the largest of either side.
        counts["ops"] = sorted(
            ({"name": a.key, "calls": a.count, "self_ns": int(a.self_cpu_time_total * 1000)}
             for a in prof.key_averages()),
            key=lambda o: -o["self_ns"])
    return counts


def bench_mode(args, meta, init, batch, device, mode, steps=None):
    """Times full training steps (forward, backward, clipping, AdamW) of one mode on a fixed
    batch, from the initial weights `init`: `eager`, or `compile` (torch.compile of the
    forward and losses; AOTAutograd compiles the backward; the optimizer runs eagerly, as
    in the eager mode). `steps` timed steps (default `--steps`): after a served eager mode,
    as many as it ran, so that every mode's final loss follows the same number of updates."""
    import statistics
    import time

    # A copy: each mode starts from the same initial weights (`.float()` of an f32 CPU
    # tensor would alias them, and the optimizer would train them in place).
    p = {k: v.to(device=device, dtype=torch.float32, copy=True).requires_grad_(True) for k, v in init.items()}
    tr = meta["train"]
    opt = torch.optim.AdamW(p.values(), lr=tr["lr"], betas=(tr["beta1"], tr["beta2"]), eps=tr["eps"],
                            weight_decay=tr["weight_decay"])
    bf16 = args.dtype == "bf16"
    k = args.microbatches
    n = batch["images"].shape[0]
    mbs = n // k
    fwd = forward_losses
    if mode == "compile":
        fwd = torch.compile(forward_losses, backend=args.compile_backend)
    elif mode != "eager":
        raise ValueError(f"unknown mode {mode!r}: use eager or compile")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    last = {}

    def step():
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for m in range(k):
            sl = slice(m * mbs, (m + 1) * mbs)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = fwd(p, meta["model"], batch["images"][sl], batch["tokens"][sl], batch["eos"][sl],
                          meta["weights"], meta["pad_id"])
            (out["total"] / k).backward()
            # The step's loss is the mean over its micro-batches, as weaver reports it.
            loss = loss + out["total"].detach() / k
        last["loss"] = loss
        torch.nn.utils.clip_grad_norm_(p.values(), tr["grad_clip"])
        opt.step()

    # The first steps compile (compile mode) and allocate the optimizer state; they are
    # warmup, outside the timer and before the peak is reset.
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, cpu = [], []

    def timed(n):
        wall, used = [], []
        for _ in range(n):
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            sync()
            wall.append(time.perf_counter() - t0)
            used.append(time.process_time() - c0)
        times.extend(wall)
        cpu.extend(used)
        return wall, used

    if args.serve and mode == "eager":
        # Interleaved with the caller's own steps: "run N" times N steps and answers with
        # their wall and CPU seconds (this process's CPU time, every thread), "done" ends.
        print(json.dumps({"ready": mode}), flush=True)
        for line in sys.stdin:
            cmd = line.split()
            if cmd[:1] == ["run"] and len(cmd) == 2:
                wall, used = timed(int(cmd[1]))
                print(json.dumps({"round": mode, "wall_s": wall, "cpu_s": used}), flush=True)
            elif cmd == ["done"]:
                break
            else:
                raise ValueError(f"unknown command {line!r}: use 'run N' or 'done'")
    else:
        timed(args.steps if steps is None else steps)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    loss = float(last["loss"])  # the last timed step's, as weaver reports
    flops = train_flops_per_sample(meta["model"], meta["weights"]["itm"] > 0) * n
    med = statistics.median(times)
    res = {"mode": mode, "step_s": med, "cpu_step_s": statistics.median(cpu), "steps": len(times),
           "flops_per_s": flops / med, "loss": loss,
           "warmup_s": warmup_s, "peak_mem_bytes": peak,
           "peak_mem_gib": peak / 2**30 if peak is not None else None}
    if mode == "compile":
        res["compile_backend"] = args.compile_backend
    if args.count or args.ops > 0:
        res["counts"] = profile_counts(device, step, args.ops)
    del opt, p
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def bench(args, meta):
    """Times full training steps of PyTorch on a fixed batch, in each requested mode from the
    same initial weights: the baseline weaver is compared against. Prints one JSON line per
    mode as soon as it is measured (a mode that fails prints its error; the others still
    run), so that a caller that must stop waiting keeps what was measured."""
    import traceback

    device = torch.device(args.device)
    init = load_file(args.weights)
    batch = {k: v.to(device) for k, v in load_file(args.batch).items()}
    failed = False
    # Served (interleaved) eager steps come in rounds the caller chooses; the modes after it
    # time as many steps, so that every final loss follows the same number of updates.
    steps = None
    for mode in args.modes.split(","):
        try:
            res = bench_mode(args, meta, init, batch, device, mode, steps)
            if args.serve and mode == "eager":
                steps = res["steps"] or None
        except Exception as e:  # noqa: BLE001 - reported to the caller, the next mode runs
            traceback.print_exc()
            res = {"mode": mode, "error": f"{type(e).__name__}: {e}"[:2000]}
            failed = True
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(json.dumps(res), flush=True)
    return 1 if failed else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    lo = sub.add_parser("losses", help="losses (and gradients) of one batch")
    lo.add_argument("--config", required=True, help="JSON: model config, loss weights, pad_id")
    lo.add_argument("--weights", required=True)
    lo.add_argument("--batch", required=True, help="safetensors with images, tokens, eos")
    lo.add_argument("--grads-out", help="write the gradients here (safetensors)")
    be = sub.add_parser("bench", help="time PyTorch eager training steps on a fixed batch")
    be.add_argument("--config", required=True, help="JSON: model config, loss weights, pad_id, train")
    be.add_argument("--weights", required=True)
    be.add_argument("--batch", required=True)
    be.add_argument("--device", default="cpu")
    be.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    be.add_argument("--steps", type=int, default=10)
    be.add_argument("--warmup", type=int, default=3)
    be.add_argument("--microbatches", type=int, default=1)
    be.add_argument("--threads", type=int, default=0)
    be.add_argument("--modes", default="eager", help="comma-separated: eager, compile")
    be.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend of the compile mode (inductor; aot_eager for smoke runs)")
    be.add_argument("--serve", action="store_true",
                    help="eager mode: after the warmup, time steps on request from stdin ('run N', 'done')")
    be.add_argument("--count", action="store_true",
                    help="count ATen ops (and on CUDA kernels, copies, syncs) in one extra step")
    be.add_argument("--ops", type=int, default=0,
                    help="with the counts, every CPU operator's calls and self time (ns)")
    args = ap.parse_args(argv)

    with open(args.config) as f:
        meta = json.load(f)
    if args.cmd == "bench":
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        sys.exit(bench(args, meta))
    torch.use_deterministic_algorithms(True)
    p = {k: v.requires_grad_(True) for k, v in load_file(args.weights).items()}
    batch = load_file(args.batch)
    out = forward_losses(p, meta["model"], batch["images"], batch["tokens"], batch["eos"],
                         meta["weights"], meta["pad_id"])
    if args.grads_out:
        out["total"].backward()
        grads = {k: (v.grad if v.grad is not None else torch.zeros_like(v)).contiguous()
                 for k, v in p.items()}
        save_file(grads, args.grads_out)
    json.dump({k: float(v) for k, v in out.items()}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
