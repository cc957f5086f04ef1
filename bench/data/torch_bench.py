"""The data-loading bench's PyTorch side: webdataset + torchvision + torch DataLoader over the
same shards with open_clip's training transform (RandomResizedCrop(224, scale=(0.9, 1.0),
bicubic), RGB, ToTensor, CLIP Normalize), captions tokenised to 32 ids with the same
word-level vocabulary, batches of BATCH. Prints one JSON line: samples/s after the first
batch, CPU seconds of this process and its workers over the whole run.

    python torch_bench.py DIR WORKERS BATCH SAMPLES
"""
import glob
import io
import json
import os
import resource
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


def cpu():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


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
    start, c0 = time.perf_counter(), cpu()
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers)
    it = iter(loader)
    next(it)
    first = time.perf_counter() - start
    t0 = time.perf_counter()
    n, checksum = 0, 0.0
    while n < samples:
        images, tokens = next(it)
        n += images.shape[0]
        checksum += float(images[0, 0, 0, 0])
    wall = time.perf_counter() - t0
    del it, loader
    import gc

    gc.collect()
    time.sleep(0.5)  # workers exit and are reaped: their CPU time counts
    print(json.dumps({
        "loader": "pytorch", "workers": workers, "batch": batch, "samples": n, "wall_s": wall,
        "cpu_s": cpu() - c0, "samples_per_s": n / wall, "first_batch_s": first, "checksum": checksum,
    }))


if __name__ == "__main__":
    main()
