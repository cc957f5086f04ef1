"""bench/infer's PyTorch side: python/weaver_ref.py's model (the same functions the parity
tests hold weaver to) on the same weights and batch, eager, f32, CPU: embeddings (image
encoder + unimodal text layers) and greedy captions of exactly NEW tokens, each step
rerunning the text layers over the fixed-length sequence (no key/value cache; the image
encoder once). Prints one JSON line: images/s, captions/s, and the outputs' checksums for
the caller to compare with weaver's.

    python torch_infer.py CFG.json WEIGHTS.safetensors BATCH.safetensors NEW REPS THREADS
"""
import json
import os
import statistics
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
    return t, R.normalize(pooled @ p["text.proj"].t())


def logits_at(p, cfg, img, tokens, pos):
    eps = cfg["norm_eps"]
    t = F.embedding(tokens, p["text.tok_embed.weight"]) + p["text.pos"]
    for i in range(cfg["unimodal_layers"]):
        t = R.block(p, f"text.unimodal.{i}", t, cfg["text_heads"], eps, causal=True)
    for i in range(cfg["multimodal_layers"]):
        t = R.block(p, f"text.multimodal.{i}", t, cfg["text_heads"], eps, causal=True, memory=img)
    h = R.layer_norm(p, "head.ln", t[:, pos], eps)
    return F.linear(h, p["head.lm.weight"])


def greedy(p, cfg, images, new, bos, pad):
    img, _ = encode(p, cfg, images)
    b, tl = images.shape[0], cfg["max_text_len"]
    tokens = torch.full((b, tl), pad, dtype=torch.long)
    tokens[:, 0] = bos
    for pos in range(new):
        tokens[:, pos + 1] = logits_at(p, cfg, img, tokens, pos).argmax(-1)
    return tokens[:, 1 : new + 1]


def timed(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main():
    cfg_path, w_path, b_path, new, reps, threads = sys.argv[1:7]
    new, reps, threads = int(new), int(reps), int(threads)
    torch.set_num_threads(threads)
    meta = json.load(open(cfg_path))
    cfg = meta["model"]
    p = load_file(w_path)
    b = load_file(b_path)
    images, tokens, eos = b["images"], b["tokens"], b["eos"]
    n = images.shape[0]
    with torch.no_grad():
        t_emb, (ie, te) = timed(lambda: (encode(p, cfg, images)[1], text_emb(p, cfg, tokens, eos)[1]), reps)
        t_cap, caps = timed(lambda: greedy(p, cfg, images, new, meta["bos"], meta["pad"]), max(1, reps // 2))
    out = os.path.join(os.path.dirname(b_path), "torch_out.safetensors")
    save_file({"image_emb": ie.contiguous(), "text_emb": te.contiguous(), "captions": caps.contiguous()}, out)
    print(json.dumps({"impl": "pytorch eager", "images_per_s": n / t_emb, "captions_per_s": n / t_cap,
                      "embed_s": t_emb, "caption_s": t_cap, "torch": torch.__version__, "out": out}))


if __name__ == "__main__":
    main()
