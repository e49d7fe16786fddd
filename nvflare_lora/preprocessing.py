"""CLIP image preprocessing with numpy and PIL only, so that serving (exporters/onnx/predict.py) needs no torch.

Training, verification and serving all call this one implementation: open an image as RGB (open_image:
EXIF orientation applied; grayscale, palette, RGBA, CMYK and 16-bit images converted), resize the short
side to `size` and centre-crop to `crop_size` (CLIP's processor), or with resize = "squash" resize the whole image
to crop_size x crop_size (SigLIP's processor), bicubic (or bilinear, where the checkpoint's processor says so), scale to [0, 1], normalise by mean/std, channels first.
Also the image settings a job checks without torch (the schema imports them): the bad-image share and the
training augmentation (Augmentation: a random resized crop and flip, drawn from (seed, item) only), and the check
of a site's data-split record (check_split_record: the server keeps it, the exporter reads it).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
from PIL import Image, ImageOps

from .errors import NVFlareLoRAError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


RESIZES = ("shortest_edge", "squash")
RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


@dataclass
class Preprocessing:
    size: int = 224
    crop_size: int = 224
    mean: Tuple[float, float, float] = CLIP_MEAN
    std: Tuple[float, float, float] = CLIP_STD
    resize: str = "shortest_edge"  # or "squash": the whole image to crop_size x crop_size, no crop (SigLIP)
    resample: str = "bicubic"  # or "bilinear"

    def __post_init__(self):
        if self.resize not in RESIZES:
            raise DataError(f"preprocessing resize must be one of {', '.join(map(repr, RESIZES))}; got {self.resize!r}")
        if self.resample not in RESAMPLE:
            raise DataError(f"preprocessing resample must be one of {', '.join(map(repr, RESAMPLE))}; got "
                            f"{self.resample!r}")

    def to_dict(self) -> Dict:
        out = {"size": self.size, "crop_size": self.crop_size, "mean": list(self.mean), "std": list(self.std),
               "resample": self.resample, "layout": "NCHW", "input": "RGB"}
        if self.resize != "shortest_edge":  # (CLIP's records stay as they were before squashing existed)
            out["resize"] = self.resize
        return out

    @classmethod
    def from_dict(cls, d: Dict) -> "Preprocessing":
        """The inverse of to_dict (what an export's preprocessing.json holds)."""
        return cls(size=int(d["size"]), crop_size=int(d["crop_size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                   resize=str(d.get("resize", "shortest_edge")), resample=str(d.get("resample", "bicubic")))

    def array(self, image) -> np.ndarray:
        """PIL image, HxW / HxWx3 uint8 array or image file -> float32 array (3, crop, crop)."""
        image = to_rgb(image)
        if self.resize == "squash":
            return self.normalize(image.resize((self.crop_size, self.crop_size), RESAMPLE[self.resample]))
        w, h = image.size
        scale = self.size / min(w, h)
        nw, nh = max(self.crop_size, round(w * scale)), max(self.crop_size, round(h * scale))
        image = image.resize((nw, nh), RESAMPLE[self.resample])
        left, top = (nw - self.crop_size) // 2, (nh - self.crop_size) // 2
        return self.normalize(image.crop((left, top, left + self.crop_size, top + self.crop_size)))

    def normalize(self, image) -> np.ndarray:
        """An RGB PIL image of the final size -> float32 array (3, H, W), scaled to [0, 1] and normalised."""
        arr = np.asarray(image, dtype=np.float32) / 255.0
        arr = (arr - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def __call__(self, image):
        """As array(), as a torch tensor (what training and PyTorch inference take)."""
        import torch  # torch stays out of serving: exporters/onnx/predict.py imports this module

        return torch.from_numpy(self.array(image))


def to_rgb(image):
    """A PIL RGB image from a PIL image, a uint8 array (HxW or HxWx3) or a path: EXIF orientation applied;
    16-bit and 32-bit grayscale scaled to 8 bits (PIL's own convert would clip them to white); palette,
    RGBA, LA, CMYK and 1-bit converted (alpha dropped, as torchvision's loader does)."""
    if isinstance(image, np.ndarray):
        return Image.fromarray(image).convert("RGB")
    if not isinstance(image, Image.Image):
        return open_image(image)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8))
    return image.convert("RGB")


def open_image(path):
    """Decode an image file completely (a truncated or corrupt file raises here, not later) as RGB."""
    with Image.open(path) as im:
        im.load()
        return to_rgb(im)


def image_files(root: str | Path) -> List[Path]:
    """The image files under root at any depth, sorted, extensions in any case (IMAGE_SUFFIXES); folders and files
    whose names start with "." are skipped. The one rule for which files are images: a site's class folders
    (nvflare_lora.data) and the folders predict.py classifies."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames)
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return files


# ---- the data settings a job checks without torch: bad-image share, training augmentation -------------------
class DataError(NVFlareLoRAError):
    """A site's data, or a data setting, that cannot be used: the message names the folder, file or setting, and
    the fix."""


def check_share(max_share: float) -> float:
    if isinstance(max_share, bool) or not isinstance(max_share, (int, float)) or not 0 <= max_share < 1:
        raise DataError(f"max_bad_images must be a share in [0, 1) (0.01 = 1% of a site's images may be "
                        f"unreadable), got {max_share!r}")
    return float(max_share)


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation as CLIP fine-tuning does it: a random resized crop (area share in [min_scale, 1],
    aspect ratio in [3/4, 4/3]) to the model's crop size, and a horizontal flip with probability 1/2.
    Deterministic: the draws of an item come from (seed, item index) only, whatever the worker count."""

    min_scale: float = 0.5
    hflip: bool = True

    def __post_init__(self):
        if not 0 < self.min_scale <= 1:
            raise DataError(f"augmentation min_scale must be in (0, 1], got {self.min_scale!r}")

    def __call__(self, image, preprocess, rng: np.random.Generator) -> np.ndarray:
        w, h = image.size
        box = None
        for _ in range(10):  # torchvision's RandomResizedCrop: draw until the crop fits, else the centre
            area = w * h * rng.uniform(self.min_scale, 1.0)
            ratio = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
            cw, ch = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                box = (left, top, left + cw, top + ch)
                break
        if box is None:
            side = min(w, h)
            box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
        size = preprocess.crop_size
        image = image.resize((size, size), RESAMPLE[preprocess.resample], box=box)
        if self.hflip and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return preprocess.normalize(image)


def augmentation(spec) -> Optional[Augmentation]:
    """The job's `augment` setting (false, true, or {"min_scale", "hflip"}) as an Augmentation or None."""
    if spec is False or spec is None:
        return None
    if spec is True:
        return Augmentation()
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - {"min_scale", "hflip"})
        if unknown:
            raise DataError(f"augment has unknown key(s) {unknown}; valid: min_scale, hflip")
        return Augmentation(**spec)
    raise DataError(f"augment must be false, true or {{\"min_scale\": 0.5, \"hflip\": true}}, got {spec!r}")


PARTITIONS = ("dirichlet", "iid")  # how the simulated digits are split across sites (settings' partition)
SPLIT_FIELDS = {"site": str, "data": str, "simulated": bool, "data_seed": int, "val_fraction": float}
SIMULATED_FIELDS = {"num_sites": int, "partition": str, "alpha": float}


def check_split_record(record, site: Optional[str] = None) -> Dict:
    """A data-split record (nvflare_lora.data.split_record) as another party sent it (a site's, with its update), checked before anyone keeps or
    reads it: exactly split_record's fields with their types and ranges, and the sender's own name. DataError names
    what is wrong."""
    if not isinstance(record, Mapping):
        raise DataError(f"a data-split record must be a mapping, got {type(record).__name__}")
    fields = dict(SPLIT_FIELDS, **(SIMULATED_FIELDS if record.get("simulated") is True else {}))
    if set(record) - {"labels"} != set(fields):  # labels: the site's own classes, under the text head
        raise DataError(f"a data-split record has the fields {sorted(fields)} (and labels); got "
                        f"{sorted(map(str, record))}")
    labels = record.get("labels")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) and x for x in labels)):
        raise DataError(f"data-split record field 'labels' must be a list of class names, got {labels!r}")
    for key, kind in fields.items():
        value = record[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok:
            raise DataError(f"data-split record field {key!r} must be {kind.__name__}, got {value!r}")
    if site is not None and record["site"] != site:
        raise DataError(f"a data-split record for {record['site']!r} came from {site!r}")
    if not 0 < record["val_fraction"] < 1 or not record["data"] or len(record["data"]) > 4096 or "\0" in record["data"]:
        raise DataError(f"data-split record of {record['site']!r} is out of range: val_fraction "
                        f"{record['val_fraction']!r}, data {record['data'][:80]!r}")
    if record["simulated"] and (record["num_sites"] < 1 or record["alpha"] <= 0
                                or record["partition"] not in PARTITIONS):
        raise DataError(f"data-split record of {record['site']!r}: num_sites {record['num_sites']!r}, partition "
                        f"{record['partition']!r}, alpha {record['alpha']!r} are not a split")
    return dict(record)
