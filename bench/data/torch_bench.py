"""The data-loading bench's PyTorch side: webdataset + torchvision + torch DataLoader over the
same shards with open_clip's training transform (RandomResizedCrop(224, scale=(0.9, 1.0),
bicubic), RGB, ToTensor, CLIP Normalize), captions tokenised to 32 ids with the same
word-level vocabulary, batches of BATCH. Prints one JSON line: samples/s after the first
batch, and the CPU seconds of this process and its worker processes over the same span
(read from /proc while the workers run, as weaver's side reads its own process's).

    python torch_bench.py DIR WORKERS BATCH SAMPLES
    python torch_bench.py --stages DIR SAMPLES      # one thread, each step timed apart
"""
import glob
import io
import json
import os
import sys
import time

import torch
import webdataset as wds
from PIL import Image
from torchvision import transforms as T

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


class Tokenize:
    def __init__(self, vocab, length=32):
        self.vocab, self.length = vocab, length

    def __call__(self, text):
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        ids = [1] + [self.vocab.get(w, 3) for w in text.split()][: self.length - 2] + [2]
        ids += [0] * (self.length - len(ids))
        return torch.tensor(ids, dtype=torch.long)


def decode_rgb(data):
    with io.BytesIO(data) as f:
        img = Image.open(f)
        img.load()
        return img.convert("RGB")


TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu(root=None):
    """CPU seconds (user + system, all threads) of process `root` and of every living
    descendant, from /proc: the DataLoader's workers are counted while they run (rusage's
    CHILDREN counts a worker only once it has been reaped)."""
    total, todo = 0, [root or os.getpid()]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except FileNotFoundError:  # a process that ended meanwhile
            pass
    return total / TICK


def main():
    d, workers, batch, samples = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    vocab = json.load(open(os.path.join(d, "vocab.json")))
    urls = sorted(glob.glob(os.path.join(d, "*.tar")))
    transform = T.Compose([
        T.RandomResizedCrop(224, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])
    tok = Tokenize(vocab)
    ds = (
        wds.WebDataset(urls, shardshuffle=False, empty_check=False)
        .repeat()
        .to_tuple("jpg", "txt")
        .map_tuple(lambda b: transform(decode_rgb(b)), tok)
    )
    start = time.perf_counter()
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers)
    it = iter(loader)
    next(it)
    first = time.perf_counter() - start
    t0, c0 = time.perf_counter(), tree_cpu()
    n, checksum = 0, 0.0
    while n < samples:
        images, tokens = next(it)
        n += images.shape[0]
        checksum += float(images[0, 0, 0, 0])
    wall, cpu = time.perf_counter() - t0, tree_cpu() - c0
    del it, loader
    print(json.dumps({
        "loader": "pytorch", "workers": workers, "batch": batch, "samples": n, "wall_s": wall,
        "cpu_s": cpu, "samples_per_s": n / wall, "first_batch_s": first, "checksum": checksum,
    }))


def stages(d, samples):
    """Each step of the PyTorch side on one thread, timed apart (CPU seconds of this thread
    per sample: a busy machine's other work does not count)."""
    torch.set_num_threads(1)
    vocab = json.load(open(os.path.join(d, "vocab.json")))
    urls = sorted(glob.glob(os.path.join(d, "*.tar")))
    rrc = T.RandomResizedCrop(224, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC)
    to_tensor, norm, tok = T.ToTensor(), T.Normalize(MEAN, STD), Tokenize(vocab)
    t = dict.fromkeys(["read", "decode", "crop_resize", "to_tensor", "normalize", "tokenize", "collate"], 0.0)
    it = iter(wds.WebDataset(urls, shardshuffle=False, empty_check=False).repeat().to_tuple("jpg", "txt"))
    batch, n = [], 0
    while n < samples:
        a = time.thread_time()
        jpg, txt = next(it)
        b = time.thread_time()
        img = decode_rgb(jpg)
        c = time.thread_time()
        img = rrc(img)
        d_ = time.thread_time()
        x = to_tensor(img)
        e = time.thread_time()
        x = norm(x)
        f = time.thread_time()
        ids = tok(txt)
        g = time.thread_time()
        batch.append((x, ids))
        n += 1
        if len(batch) == 256 or n == samples:
            torch.utils.data.default_collate(batch)
            batch = []
        h = time.thread_time()
        for k, dt in zip(t, [b - a, c - b, d_ - c, e - d_, f - e, g - f, h - g]):
            t[k] += dt
    print(json.dumps({"loader": "pytorch", "samples": n, **{k: v / n for k, v in t.items()}}))


if __name__ == "__main__":
    if sys.argv[1] == "--stages":
        stages(sys.argv[2], int(sys.argv[3]))
    else:
        main()
