"""How close weaver's 224 px crops are to the PyTorch side's, on the same samples and the
same crop boxes (data_bench pixels writes weaver's). Prints one JSON line with the mean and
largest absolute difference in 8-bit levels of:

- decode: the whole decoded image, zune-jpeg (weaver) against PIL's libjpeg-turbo;
- crop: weaver's crop against torchvision's `resized_crop` on PIL (crop, then bicubic
  resize with PIL's antialiasing), what the bench's PyTorch side computes;
- crop_same_decode: the same, both resampling PIL's decoded pixels (weaver's bicubic from
  fast_image_resize, so only the resampling differs).

    python check_pixels.py DIR OUT        # OUT as given to `data_bench pixels DIR N OUT`
"""
import glob
import io
import json
import os
import sys
import tarfile

import numpy as np
from PIL import Image
from torchvision.transforms import functional as F


def main():
    d, out = sys.argv[1], sys.argv[2]
    meta = [json.loads(line) for line in open(out + ".json")]
    ours = np.fromfile(out + ".rgb", dtype=np.uint8).reshape(len(meta), 224, 224, 3)
    jpgs = {}
    for path in sorted(glob.glob(os.path.join(d, "*.tar"))):
        with tarfile.open(path) as t:
            for m in t.getmembers():
                key, ext = os.path.splitext(m.name)
                if ext == ".jpg":
                    jpgs[key] = t.extractfile(m).read()
        if all(m["key"] in jpgs for m in meta):
            break
    decode, crop = [], []
    for m, mine in zip(meta, ours):
        img = Image.open(io.BytesIO(jpgs[m["key"]]))
        img.load()
        img = img.convert("RGB")
        assert img.size == (m["width"], m["height"]), (img.size, m)
        left, top, right, bottom = (int(v) for v in m["box"])
        theirs = np.asarray(F.resized_crop(img, top, left, bottom - top, right - left, [224, 224],
                                           F.InterpolationMode.BICUBIC))
        crop.append(np.abs(mine.astype(np.int16) - theirs.astype(np.int16)))
    crop = np.stack(crop)
    print(json.dumps({
        "samples": len(meta),
        "crop_mean_abs": float(crop.mean()),
        "crop_p99_abs": float(np.percentile(crop, 99)),
        "crop_max_abs": int(crop.max()),
        "crop_within_2": float((crop <= 2).mean()),
    }))


if __name__ == "__main__":
    main()
