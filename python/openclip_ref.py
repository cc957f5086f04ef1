"""open_clip itself as the reference for weaver's open_clip flavors (the parity tests of
openclip/tests/parity.rs run it with the project venv's open-clip-torch 3.3.0).

    python openclip_ref.py make --arch coca_ViT-B-32 --seed 0 --out sd.safetensors [--pt sd.pt]
        a randomly initialised model (pretrained=None, nothing downloaded), every 1-D tensor
        (norms, biases, class tokens) moved off its constant start so that a wrong mapping
        shows; its state dict as safetensors (and torch.save'd, for the pickle reader)
    python openclip_ref.py run --arch A --weights W --batch B --out O [--grads] [--strict]
        image and text embeddings (normalised), caption logits (CoCa), and with --grads the
        loss open_clip trains the model with (CoCaLoss(caption 2, clip 1) / ClipLoss) and
        every parameter's gradient, all written to O (safetensors); W is loaded with
        load_state_dict(strict=True)
    python openclip_ref.py resize --pos P --grid G --out O
        open_clip's resize_pos_embed of the positions P to a G×G grid
"""

import argparse
import json
import sys

import torch
from safetensors.torch import load_file, save_file

import open_clip
from open_clip.loss import ClipLoss, CoCaLoss
from open_clip.model import resize_pos_embed


def build(arch):
    return open_clip.create_model(arch, pretrained=None)


def make(a):
    torch.manual_seed(a.seed)
    model = build(a.arch)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim <= 1:
                p.add_(torch.randn_like(p) * 0.05)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, a.out)
    if a.pt:
        torch.save(model.state_dict(), a.pt)


def run(a):
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = build(a.arch)
    model.load_state_dict(load_file(a.weights), strict=True)
    model.train(False)
    batch = load_file(a.batch)
    images, text = batch["images"], batch["tokens"]
    out = {}
    coca = a.arch.startswith("coca")
    if coca:
        res = model(images, text)
        out["image_emb"] = res["image_features"]
        out["text_emb"] = res["text_features"]
        out["logits"] = res["logits"]
    else:
        out["image_emb"] = model.encode_image(images, normalize=True)
        out["text_emb"] = model.encode_text(text, normalize=True)
    if a.grads:
        model.zero_grad()
        if coca:
            loss_fn = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=0)
            clip, caption = loss_fn(
                res["image_features"], res["text_features"], res["logits"], res["labels"],
                res["logit_scale"],
            )
            loss = clip + caption
            losses = {"itc": clip.item(), "caption": caption.item() / 2.0}
        else:
            ie = model.encode_image(images, normalize=True)
            te = model.encode_text(text, normalize=True)
            loss = ClipLoss()(ie, te, model.logit_scale.exp())
            losses = {"itc": loss.item(), "caption": 0.0}
        loss.backward()
        losses["total"] = loss.item()
        for n, p in model.named_parameters():
            out[f"grad.{n}"] = p.grad.contiguous()
        print(json.dumps(losses))
    save_file({k: v.detach().contiguous() for k, v in out.items()}, a.out)


def resize(a):
    pos = load_file(a.pos)["pos"]

    class Visual:
        grid_size = (a.grid, a.grid)

    class Model:
        visual = Visual()

    sd = {"visual.positional_embedding": pos}
    resize_pos_embed(sd, Model())
    save_file({"pos": sd["visual.positional_embedding"].contiguous()}, a.out)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--arch", required=True)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", required=True)
    m.add_argument("--pt")
    r = sub.add_parser("run")
    r.add_argument("--arch", required=True)
    r.add_argument("--weights", required=True)
    r.add_argument("--batch", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--grads", action="store_true")
    z = sub.add_parser("resize")
    z.add_argument("--pos", required=True)
    z.add_argument("--grid", type=int, required=True)
    z.add_argument("--out", required=True)
    a = ap.parse_args()
    {"make": make, "run": run, "resize": resize}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
