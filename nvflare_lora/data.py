"""Image data for a site: bundled digits, an image folder, or a CSV of path,label; and splits across sites.

No torchvision: PIL and numpy do the decoding, nvflare_lora.models.Preprocessing does CLIP's resize,
crop and normalisation.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class ImageDataset:
    """Images with integer labels, preprocessed on first use and kept in memory.

    items: list of (source, label) where source is a path or a uint8 array; `preprocess` turns one
    image into a (3, H, W) float tensor.
    """

    def __init__(self, items: Sequence[Tuple[object, int]], classes: Sequence[str], preprocess: Callable):
        self.items = list(items)
        self.classes = list(classes)
        self.preprocess = preprocess
        self._cache: Dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([lab for _, lab in self.items], dtype=np.int64)

    def image(self, i: int) -> torch.Tensor:
        if i not in self._cache:
            src = self.items[i][0]
            if isinstance(src, (str, Path)):
                from PIL import Image

                with Image.open(src) as im:
                    self._cache[i] = self.preprocess(im)
            else:
                self._cache[i] = self.preprocess(src)
        return self._cache[i]

    def batch(self, indices) -> Tuple[torch.Tensor, torch.Tensor]:
        idx = [int(i) for i in indices]
        x = torch.stack([self.image(i) for i in idx])
        y = torch.as_tensor([self.items[i][1] for i in idx], dtype=torch.long)
        return x, y

    def tensors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.batch(range(len(self)))

    def subset(self, indices) -> "ImageDataset":
        sub = ImageDataset([self.items[int(i)] for i in indices], self.classes, self.preprocess)
        sub._cache = {j: self._cache[int(i)] for j, i in enumerate(indices) if int(i) in self._cache}
        return sub


def digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) in 0..16, labels): scikit-learn's bundled digits, read from its data file with numpy.

    The same values as sklearn.datasets.load_digits() (tested), without importing scikit-learn: that import
    takes ~0.8 s, which a site pays on every task when the simulator runs without -t (one process a task)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the bundled digits come with scikit-learn: pip install scikit-learn")
    table = np.loadtxt(Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz", delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def load_digits_dataset(preprocess: Callable) -> ImageDataset:
    """scikit-learn's bundled 8x8 digits (1,797 real images, no download) as RGB images."""
    images, labels = digits_arrays()
    imgs = np.clip(images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    items = [(np.stack([im] * 3, axis=-1), int(lab)) for im, lab in zip(imgs, labels)]
    return ImageDataset(items, [str(i) for i in range(10)], preprocess)


def load_image_folder(root: str | Path, preprocess: Callable, classes: Optional[Sequence[str]] = None) -> ImageDataset:
    """root/<class_name>/<image>: one sub-folder per class, sorted names give the label order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; expected root/<class_name>/<image files>")
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    classes = list(classes) if classes is not None else found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"image folder {root} has class folders {unknown} that are not in the label list {classes}")
    items = []
    for label, name in enumerate(classes):
        folder = root / name
        if folder.is_dir():
            items += [(p, label) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise ValueError(f"image folder {root} holds no images ({sorted(IMAGE_SUFFIXES)}) under class sub-folders")
    return ImageDataset(items, classes, preprocess)


def load_csv(path: str | Path, preprocess: Callable, classes: Optional[Sequence[str]] = None) -> ImageDataset:
    """A CSV with columns path,label (a header row is allowed); relative paths are read from the CSV's folder."""
    path = Path(path)
    rows = []
    with open(path, newline="") as fh:
        for i, row in enumerate(csv.reader(fh)):
            if not row or (i == 0 and [c.strip().lower() for c in row[:2]] == ["path", "label"]):
                continue
            if len(row) < 2:
                raise ValueError(f"{path}:{i + 1}: expected 'path,label', got {row}")
            rows.append((row[0].strip(), row[1].strip()))
    if not rows:
        raise ValueError(f"{path} lists no images")
    classes = list(classes) if classes is not None else sorted({lab for _, lab in rows})
    index = {c: i for i, c in enumerate(classes)}
    items = []
    for p, lab in rows:
        if lab not in index:
            raise ValueError(f"{path}: label {lab!r} is not in the label list {classes}")
        f = Path(p) if Path(p).is_absolute() else path.parent / p
        if not f.is_file():
            raise FileNotFoundError(f"{path}: image {f} does not exist")
        items.append((f, index[lab]))
    return ImageDataset(items, classes, preprocess)


def load_dataset(source: str, preprocess: Callable, classes: Optional[Sequence[str]] = None) -> ImageDataset:
    """"digits", a folder of class sub-folders, or a .csv file."""
    if source == "digits":
        return load_digits_dataset(preprocess)
    p = Path(source).expanduser()
    if p.suffix.lower() == ".csv":
        return load_csv(p, preprocess, classes)
    return load_image_folder(p, preprocess, classes)


# ---- splitting one dataset across sites ----------------------------------------------------------
def partition(labels: np.ndarray, num_sites: int, scheme: str = "iid", alpha: float = 0.5,
              seed: int = 0, min_size: int = 10) -> List[np.ndarray]:
    """Indices of each site's share. "iid": a seeded shuffle cut in equal parts. "dirichlet": per class,
    proportions drawn from Dirichlet(alpha) (smaller alpha, stronger label skew), redrawn until every
    site has at least `min_size` samples. Deterministic in (labels, num_sites, scheme, alpha, seed)."""
    labels = np.asarray(labels)
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), num_sites)]
    if scheme != "dirichlet":
        raise ValueError(f"unknown partition scheme {scheme!r}; use 'iid' or 'dirichlet'")
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    min_size = min(min_size, len(labels) // num_sites)
    for _ in range(1000):
        parts: List[List[int]] = [[] for _ in range(num_sites)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet([alpha] * num_sites)
            cuts = (np.cumsum(props) * len(idx)).astype(int)[:-1]
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site] += chunk.tolist()
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"could not draw a Dirichlet({alpha}) split giving each of {num_sites} sites {min_size} samples")


def site_index(site_name: str, num_sites: int) -> int:
    """'site-3' -> 2. Other names have no partition: they must bring their own data."""
    m = re.fullmatch(r"site-(\d+)", site_name)
    if not m or not 1 <= int(m.group(1)) <= num_sites:
        raise ValueError(
            f"site {site_name!r} has no share of the simulated split (sites are site-1 ... site-{num_sites}); "
            f"set num_sites in the job, or give this site its own data with the NVFLARE_LORA_DATA environment "
            f"variable or the site's local config"
        )
    return int(m.group(1)) - 1


def train_val_split(n: int, val_fraction: float = 0.2, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction))) if n > 1 else 0
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def site_split(dataset: ImageDataset, site_name: str, num_sites: int, scheme: str = "dirichlet",
               alpha: float = 0.5, seed: int = 0, val_fraction: float = 0.2) -> Tuple[ImageDataset, ImageDataset]:
    """A site's (train, validation) share of one dataset, the same on every run with the same seed."""
    part = partition(dataset.labels, num_sites, scheme, alpha, seed)[site_index(site_name, num_sites)]
    tr, va = train_val_split(len(part), val_fraction, seed + 1)
    return dataset.subset(part[tr]), dataset.subset(part[va])
