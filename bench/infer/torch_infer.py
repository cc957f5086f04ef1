"""bench/infer's PyTorch side: python/weaver_ref.py's model (the same functions the parity
tests hold weaver to) on the same weights and batch, eager, f32, CPU, no autograd. Three
tasks, each the same work as weaver's (worker/examples/infer_bench.rs):

- `embed`: image embeddings (image encoder) and text embeddings (unimodal text layers) of
  the batch.
- `caption`: greedy captions of exactly NEW tokens with a key/value cache: the image
  encoder once, every multimodal layer's cross-attention keys and values of the memory
  once, then one position per step through every text layer, its keys and values written
  into caches of NEW + 1 positions allocated per call.
- `caption_nocache`: the same captions without a cache: every step reruns the text layers
  (cross-attention keys and values of the memory included) over the whole prefix, the image
  encoder still once.

Both decoders take the log-softmax of the last position's logits, its argmax, and the
chosen token's log-probability, as weaver's greedy search does.

    python torch_infer.py CFG.json WEIGHTS.safetensors BATCH.safetensors NEW THREADS

After one warm-up call of each task it writes the outputs next to BATCH
(torch_out.safetensors: image_emb, text_emb, captions, captions_nocache, log_prob) and prints
{"ready": ..., "torch": VERSION, "out": PATH}; then it waits on stdin: "run TASK N" times N
calls of TASK and answers {"round": TASK, "wall_s": [...], "cpu_s": [...]} (CPU time of this
process, every thread: time.process_time()); "done" ends. The caller interleaves its own
calls with these rounds.
"""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "python"))
import weaver_ref as R  # noqa: E402


def encode(p, cfg, images):
    eps = cfg["norm_eps"]
    x = R.linear(p, "vision.patch_embed", R.patchify(images, cfg["patch_size"])) + p["vision.pos"]
    for i in range(cfg["vision_layers"]):
        x = R.block(p, f"vision.blocks.{i}", x, cfg["vision_heads"], eps)
    img = R.layer_norm(p, "vision.ln_post", x, eps)
    return img, R.normalize(img.mean(dim=1) @ p["vision.proj"].t())


def text_emb(p, cfg, tokens, eos):
    eps = cfg["norm_eps"]
    t = F.embedding(tokens, p["text.tok_embed.weight"]) + p["text.pos"]
    for i in range(cfg["unimodal_layers"]):
        t = R.block(p, f"text.unimodal.{i}", t, cfg["text_heads"], eps, causal=True)
    pooled = R.layer_norm(p, "text.ln_pool", R.gather_rows(t, eos), eps)
    return R.normalize(pooled @ p["text.proj"].t())


def embed(p, cfg, images, tokens, eos):
    return encode(p, cfg, images)[1], text_emb(p, cfg, tokens, eos)


def text_layers(cfg):
    """(name, has cross-attention) of every text layer, unimodal first."""
    return [(f"text.unimodal.{i}", False) for i in range(cfg["unimodal_layers"])] + [
        (f"text.multimodal.{i}", True) for i in range(cfg["multimodal_layers"])
    ]


def next_token(p, cfg, x, tokens, log_prob):
    """Greedy choice from the last position's states `x` [B, D]: appends it to `tokens`,
    adds its log-probability to `log_prob`."""
    h = R.layer_norm(p, "head.ln", x, cfg["norm_eps"])
    lp = F.linear(h, p["head.lm.weight"]).float().log_softmax(-1)
    nxt = lp.argmax(-1)
    log_prob += lp.gather(1, nxt[:, None])[:, 0].double()
    tokens.append(nxt)
    return nxt


def caption_nocache(p, cfg, images, new, bos):
    """Greedy captions of exactly `new` tokens, every step rerunning the text layers over
    the prefix (R.block: the same layer functions as training)."""
    img, _ = encode(p, cfg, images)
    eps, heads = cfg["norm_eps"], cfg["text_heads"]
    gated = cfg["fusion"] == "gated_cross_attention"
    b = images.shape[0]
    hist = torch.full((b, 1), bos, dtype=torch.long)
    tokens, log_prob = [], torch.zeros(b, dtype=torch.float64)
    for _ in range(new):
        t = hist.shape[1]
        x = F.embedding(hist, p["text.tok_embed.weight"]) + p["text.pos"][:t]
        for name, cross in text_layers(cfg):
            x = R.block(p, name, x, heads, eps, causal=True, memory=img if cross else None, gated=gated)
        nxt = next_token(p, cfg, x[:, -1], tokens, log_prob)
        hist = torch.cat([hist, nxt[:, None]], 1)
    return torch.stack(tokens, 1), log_prob


def caption_cache(p, cfg, images, new, bos):
    """Greedy captions of exactly `new` tokens with a key/value cache per text layer."""
    img, _ = encode(p, cfg, images)
    eps, heads = cfg["norm_eps"], cfg["text_heads"]
    gated = cfg["fusion"] == "gated_cross_attention"
    b, cap = images.shape[0], new + 1

    def split(x):
        return x.view(b, x.shape[1], heads, -1).transpose(1, 2)

    def merge(a):
        return a.transpose(1, 2).reshape(b, a.shape[2], -1)

    layers = []
    for name, cross in text_layers(cfg):
        hd = p[f"{name}.attn.q.weight"].shape[0] // heads
        c = {"k": torch.zeros(b, heads, cap, hd), "v": torch.zeros(b, heads, cap, hd), "cross": None}
        if cross:
            c["cross"] = (split(R.linear(p, f"{name}.xattn.k", img)), split(R.linear(p, f"{name}.xattn.v", img)))
        layers.append((name, c))
    tokens, log_prob = [], torch.zeros(b, dtype=torch.float64)
    last = torch.full((b,), bos, dtype=torch.long)
    for at in range(new):
        x = F.embedding(last[:, None], p["text.tok_embed.weight"]) + p["text.pos"][at : at + 1]
        for name, c in layers:
            h = R.layer_norm(p, f"{name}.ln1", x, eps)
            c["k"][:, :, at : at + 1] = split(R.linear(p, f"{name}.attn.k", h))
            c["v"][:, :, at : at + 1] = split(R.linear(p, f"{name}.attn.v", h))
            q = split(R.linear(p, f"{name}.attn.q", h))
            a = F.scaled_dot_product_attention(q, c["k"][:, :, : at + 1], c["v"][:, :, : at + 1])
            x = x + R.linear(p, f"{name}.attn.o", merge(a))
            if c["cross"] is not None:
                h = R.layer_norm(p, f"{name}.ln_x", x, eps)
                a = F.scaled_dot_product_attention(split(R.linear(p, f"{name}.xattn.q", h)), *c["cross"])
                y = R.linear(p, f"{name}.xattn.o", merge(a))
                if gated:
                    y = y * torch.tanh(p[f"{name}.gate"])
                x = x + y
            h = F.gelu(R.linear(p, f"{name}.mlp.fc1", R.layer_norm(p, f"{name}.ln2", x, eps)))
            x = x + R.linear(p, f"{name}.mlp.fc2", h)
        last = next_token(p, cfg, x[:, -1], tokens, log_prob)
    return torch.stack(tokens, 1), log_prob


def check_supported(cfg):
    """The decoders above are python/weaver_ref.py's model: refuse what it does not hold."""
    wrong = {
        "fusion": cfg["fusion"] in ("cross_attention", "gated_cross_attention"),
        "multimodal_block": cfg.get("multimodal_block", "compact") == "compact",
        "text_pad_mask": cfg.get("text_pad_mask", "none") == "none",
        "activation": cfg.get("activation", "gelu") == "gelu",
        "vision_class_token": not cfg.get("vision_class_token", False),
        "vision_pool": cfg.get("vision_pool", "mean") == "mean",
        "vision_ln_pre": not cfg.get("vision_ln_pre", False),
        "text_pool": cfg.get("text_pool", "eos") == "eos",
        "text_proj_bias": not cfg.get("text_proj_bias", False),
    }
    bad = [f"model.{k} = {cfg.get(k)!r}" for k, ok in wrong.items() if not ok]
    if bad:
        raise SystemExit(f"torch_infer.py: python/weaver_ref.py's model does not support {', '.join(bad)}")


def main():
    cfg_path, w_path, b_path, new, threads = sys.argv[1:6]
    new, threads = int(new), int(threads)
    torch.set_num_threads(threads)
    with open(cfg_path) as f:
        meta = json.load(f)
    cfg = meta["model"]
    check_supported(cfg)
    p = load_file(w_path)
    b = load_file(b_path)
    images, tokens, eos = b["images"], b["tokens"], b["eos"]
    bos = meta["bos"]
    tasks = {
        "embed": lambda: embed(p, cfg, images, tokens, eos),
        "caption": lambda: caption_cache(p, cfg, images, new, bos),
        "caption_nocache": lambda: caption_nocache(p, cfg, images, new, bos),
    }
    with torch.no_grad():  # as weaver (tch::no_grad)
        # One warm-up call of each task, whose outputs the caller compares with weaver's.
        warm = {name: fn() for name, fn in tasks.items()}
        out = os.path.join(os.path.dirname(b_path), "torch_out.safetensors")
        save_file({"image_emb": warm["embed"][0].contiguous(), "text_emb": warm["embed"][1].contiguous(),
                   "captions": warm["caption"][0].contiguous(),
                   "captions_nocache": warm["caption_nocache"][0].contiguous(),
                   "log_prob": warm["caption"][1].contiguous()}, out)
        print(json.dumps({"ready": "pytorch eager", "torch": torch.__version__, "out": out}), flush=True)
        for line in sys.stdin:
            cmd = line.split()
            if cmd == ["done"]:
                break
            if len(cmd) != 3 or cmd[0] != "run" or cmd[1] not in tasks:
                raise SystemExit(f"torch_infer.py: unknown command {line!r}: use 'run TASK N' ({', '.join(tasks)}) or 'done'")
            fn, wall, cpu = tasks[cmd[1]], [], []
            for _ in range(int(cmd[2])):
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            print(json.dumps({"round": cmd[1], "wall_s": wall, "cpu_s": cpu}), flush=True)


if __name__ == "__main__":
    main()
