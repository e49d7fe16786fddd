"""Image data for a site: bundled digits, an image folder, or a CSV of path,label; batches; splits across sites.

A dataset is a list of (file, label): images are decoded and preprocessed per item, in DataLoader worker
processes (SiteLoader), so a site's memory does not grow with its number of images. No torchvision: PIL
and numpy decode (nvflare_lora.preprocessing.open_image), Preprocessing does CLIP's resize, crop and
normalisation, Augmentation the training crops and flips.

Bad files: a file that cannot be opened is left out when the folder is listed; one that fails to decode
later (a truncated PNG opens but does not decode) is left out of the batch it was in and of every later
pass. Both are recorded in the dataset's BadImages, which names them and stops the site with
TooManyBadImages once more than `max_bad_images` (a share, default 1%) of the listed images are bad.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .preprocessing import IMAGE_SUFFIXES, Augmentation, DataError, check_share, image_files, to_rgb
from .sample_data import digits_uint8

MAX_BAD_IMAGES = 0.01
_log = logging.getLogger(__name__)


class TooManyBadImages(DataError):
    """More than max_bad_images of a site's images cannot be read."""


class BadImages:
    """The unreadable files of one site's data (shared by its train and validation subsets).

    total: how many images were listed; max_share: the share of them that may be bad before the site stops."""

    def __init__(self, where: str, total: int = 0, max_share: float = MAX_BAD_IMAGES):
        self.where, self.total = where, total
        self.max_share = check_share(max_share)
        self.files: Dict[str, str] = {}  # path -> reason, in the order found

    def __len__(self) -> int:
        return len(self.files)

    def __contains__(self, source) -> bool:
        return isinstance(source, (str, Path)) and str(source) in self.files

    def record(self, source, reason: str) -> None:
        self.files.setdefault(str(source), reason)
        self.check()

    def named(self, first: int = 3) -> str:
        """The first few bad files with their reasons, and how many more."""
        shown = "; ".join(f"{p} ({r})" for p, r in list(self.files.items())[:first])
        return shown + (f"; and {len(self) - first} more" if len(self) > first else "")

    def summary(self) -> str:
        return f"{len(self)} of {self.total} images in {self.where} unreadable, skipped: {self.named()}"

    def check(self) -> None:
        if self.total and len(self) > self.max_share * self.total:
            raise TooManyBadImages(
                f"{len(self)} of {self.total} images ({len(self) / self.total:.1%}) in {self.where} cannot be read, "
                f"more than max_bad_images={self.max_share:.1%}: {self.named()}. Repair or remove those files, or "
                f"raise max_bad_images in the job (or in the site's local/nvflare_lora_site.json)")


class ImageDataset(Dataset):
    """Images with integer labels: only the list of (source, label) is held; each item is decoded and
    preprocessed when it is read.

    items: (source, label) where source is a path or a uint8 array; `preprocess` is the model's
    Preprocessing. An item is read as dataset[i] (evaluation) or dataset[(i, seed)] (training: with
    `augment` set, the item's random crop and flip are drawn from (seed, i)). It comes back as
    (pixels or None, label, i, reason or None): a file that does not decode gives None and the reason.
    """

    def __init__(self, items: Sequence[Tuple[object, int]], classes: Sequence[str], preprocess: Callable,
                 bad: Optional[BadImages] = None, notes: Sequence[str] = (), augment: Optional[Augmentation] = None):
        self.items = list(items)
        self.classes = list(classes)
        self.preprocess = preprocess
        self.bad = bad if bad is not None else BadImages("memory", len(self.items))
        self.notes = list(notes)  # set-up warnings (empty class folders) for the site's log
        self.augment = augment

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([lab for _, lab in self.items], dtype=np.int64)

    def __getitem__(self, key):
        i, seed = key if isinstance(key, tuple) else (key, None)
        src, label = self.items[i]
        try:
            if self.augment is not None and seed is not None:
                arr = self.augment(to_rgb(src), self.preprocess, np.random.default_rng([int(seed), int(i)]))
                pixels = torch.from_numpy(arr)
            else:
                pixels = self.preprocess(src)
        except (OSError, ValueError, SyntaxError) as e:  # what PIL raises for corrupt, truncated, unknown files
            return None, label, i, f"{type(e).__name__}: {e}"
        return pixels, label, i, None

    def usable(self) -> List[int]:
        """Indices of the items not known to be bad."""
        if not len(self.bad):
            return list(range(len(self.items)))
        return [i for i, (src, _) in enumerate(self.items) if src not in self.bad]

    def batch(self, indices) -> Tuple[torch.Tensor, torch.Tensor]:
        """These items as one batch, in this process (a bounded sample: the exporter's verification)."""
        x, y, bad = collate([self[int(i)] for i in indices])
        self._record(bad)
        return x, y

    def _record(self, bad: Sequence[Tuple[int, str]]) -> None:
        for i, reason in bad:
            self.bad.record(self.items[i][0], reason)

    def subset(self, indices) -> "ImageDataset":
        return ImageDataset([self.items[int(i)] for i in indices], self.classes, self.preprocess, self.bad,
                            self.notes, self.augment)


def collate(samples) -> Tuple[Optional[torch.Tensor], torch.Tensor, List[Tuple[int, str]]]:
    """DataLoader collate_fn: (pixels, labels, [(index, reason) of items that did not decode])."""
    good = [s for s in samples if s[0] is not None]
    bad = [(s[2], s[3]) for s in samples if s[0] is None]
    x = torch.stack([s[0] for s in good]) if good else None
    return x, torch.as_tensor([s[1] for s in good], dtype=torch.long), bad


def dataset_fingerprint(*datasets: ImageDataset) -> str:
    """What identifies a site's data across jobs (its privacy ledger's key): sha256 over every item, in a stable
    order: a file by its name and size, an image in memory by its bytes; and its label."""
    parts = []
    for ds in datasets:
        for src, label in ds.items:
            if isinstance(src, (str, Path)):
                path = Path(src)
                parts.append(f"{path.parent.name}/{path.name}:{path.stat().st_size if path.exists() else -1}:{label}")
            else:
                parts.append(hashlib.sha256(np.ascontiguousarray(src).tobytes()).hexdigest() + f":{label}")
    return hashlib.sha256("\n".join(sorted(parts)).encode()).hexdigest()[:16]


def default_workers() -> int:
    """DataLoader workers when the job says "auto": one core is left to training, at most 4 decode."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


class _SeededBatches:
    """The batch sampler: batches of (index, seed) keys over the usable items; with shuffle, the order of
    pass `epoch` is the (epoch+1)-th torch.randperm of a generator seeded with `seed` (runs in the main
    process, so persistent workers follow it). With sample_rate q (DP-SGD's Poisson sampling) a pass is
    round(1 / q) batches, each holding every usable item independently with probability q (possibly none), drawn
    from sha256(secret, seed, epoch): with the site's secret no one else can tell which images were in a step (what
    DP-SGD's amplification by subsampling assumes); without one (secret None) from the seed alone, which anyone
    with the job's settings can recompute."""

    def __init__(self, dataset: ImageDataset, batch_size: int, shuffle: bool, sample_rate: Optional[float] = None,
                 secret: Optional[bytes] = None):
        self.dataset, self.batch_size, self.shuffle, self.sample_rate = dataset, batch_size, shuffle, sample_rate
        self.secret = secret
        self.seed, self.epoch = 0, 0

    def _poisson_seed(self) -> int:
        if self.secret is None:
            return int(self.seed) * 7919 + int(self.epoch)
        digest = hashlib.sha256(self.secret + f":{int(self.seed)}:{int(self.epoch)}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)

    def _order(self) -> List[int]:
        usable = self.dataset.usable()
        if not self.shuffle:
            return usable
        g = torch.Generator().manual_seed(int(self.seed))
        for _ in range(self.epoch + 1):
            perm = torch.randperm(len(usable), generator=g)
        return [usable[int(j)] for j in perm]

    def __iter__(self) -> Iterator[List]:
        key_seed = int(self.seed) * 100003 + int(self.epoch) if self.shuffle else None
        if self.sample_rate is not None:
            usable = self.dataset.usable()
            g = torch.Generator().manual_seed(self._poisson_seed())
            for _ in range(len(self)):
                picked = torch.nonzero(torch.rand(len(usable), generator=g) < self.sample_rate).flatten()
                yield [(usable[int(j)], key_seed) for j in picked]
            return
        order = self._order()
        for i in range(0, len(order), self.batch_size):
            yield [(j, key_seed) for j in order[i:i + self.batch_size]]

    def __len__(self) -> int:
        if self.sample_rate is not None:
            return max(1, int(round(1.0 / self.sample_rate)))
        return -(-len(self.dataset.usable()) // self.batch_size)


class SiteLoader:
    """Batches of one split through torch.utils.data.DataLoader: decoding in `num_workers` worker processes
    (0: in this process; "auto": default_workers()), kept alive between passes; pinned memory on CUDA.
    `batches(seed, epoch)` is one pass: shuffled (training) or in order (evaluation); items that fail to
    decode are recorded in the dataset's BadImages and left out. Same seed and epoch (and secret), same batches.
    sampling_secret: with sample_rate, the site's secret the Poisson samples are drawn from (_SeededBatches)."""

    def __init__(self, dataset: ImageDataset, batch_size: int = 32, shuffle: bool = False, num_workers=0,
                 device: str | torch.device = "cpu", sample_rate: Optional[float] = None,
                 sampling_secret: Optional[bytes] = None):
        if not len(dataset):
            raise DataError(f"no images to load from {dataset.bad.where}")
        workers = default_workers() if num_workers == "auto" else int(num_workers)
        if workers < 0:
            raise DataError(f"num_workers must be >= 0 or \"auto\", got {num_workers!r}")
        self.dataset, self.num_workers = dataset, workers
        if sample_rate is not None and not 0 < sample_rate <= 1:
            raise DataError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        self.sampler = _SeededBatches(dataset, int(batch_size), shuffle, sample_rate, sampling_secret)
        self.loader = DataLoader(dataset, batch_sampler=self.sampler, num_workers=workers, collate_fn=collate,
                                 pin_memory=torch.device(device).type == "cuda", persistent_workers=workers > 0)

    def __len__(self) -> int:
        return len(self.sampler)

    def batches(self, seed: int = 0, epoch: int = 0) -> Iterator[Tuple[Optional[torch.Tensor], torch.Tensor]]:
        """One pass. Under Poisson sampling an empty sample is yielded as (None, empty labels): DP-SGD still
        takes its (pure noise) step; otherwise batches without a readable image are skipped."""
        self.sampler.seed, self.sampler.epoch = int(seed), int(epoch)
        for x, y, bad in self.loader:
            self.dataset._record(bad)
            if x is not None or self.sampler.sample_rate is not None:
                yield x, y

    def __iter__(self):
        return self.batches()


def load_digits_dataset(preprocess: Callable) -> ImageDataset:
    """scikit-learn's bundled 8x8 digits (1,797 real images, no download) as RGB images (192 bytes each)."""
    imgs, labels = digits_uint8()
    items = [(np.stack([im] * 3, axis=-1), int(lab)) for im, lab in zip(imgs, labels)]
    return ImageDataset(items, [str(i) for i in range(10)], preprocess, BadImages("the bundled digits", len(items)))


def _opens(path: Path) -> Optional[str]:
    """None if PIL recognises the file as an image (header only: cheap), else the reason."""
    try:
        with Image.open(path) as im:
            im.size
    except (OSError, ValueError, SyntaxError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _listed(entries: List[Tuple[Path, int]], classes: Sequence[str], preprocess: Callable, where: str,
            max_bad_images: float, notes: Sequence[str] = ()) -> ImageDataset:
    """The dataset of the files that open; the others recorded as bad (and the share checked)."""
    bad = BadImages(where, len(entries), max_bad_images)
    items = []
    for path, label in entries:
        reason = _opens(path)
        if reason is None:
            items.append((path, label))
        else:
            bad.files[str(path)] = reason
    bad.check()
    return ImageDataset(items, classes, preprocess, bad, notes)


def load_image_folder(root: str | Path, preprocess: Callable, classes: Optional[Sequence[str]] = None,
                      max_bad_images: float = MAX_BAD_IMAGES) -> ImageDataset:
    """root/<class_name>/.../<image>: one first-level folder per class (sorted names give the label order
    unless `classes` is given), images found at any depth under it, extensions in any case. Folders and
    files whose names start with "." are ignored. A class folder without images stays in the label list."""
    check_share(max_bad_images)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; expected {root}/<class_name>/<image files>")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = list(classes) if classes is not None else found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"image folder {root} has class folders {unknown} that are not in the job's labels "
                        f"{classes}: rename or remove them, or add them to the job's labels")
    entries, notes = [], []
    for label, name in enumerate(classes):
        files = image_files(root / name)
        if not files:
            notes.append(f"class {name!r} has no images in {root / name}: it stays in the label list")
            _log.warning(notes[-1])
        entries += [(f, label) for f in files]
    if not entries:
        raise DataError(f"image folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under class "
                        f"sub-folders; expected {root}/<class_name>/<image files>")
    return _listed(entries, classes, preprocess, str(root), max_bad_images, notes)


def load_csv(path: str | Path, preprocess: Callable, classes: Optional[Sequence[str]] = None,
             max_bad_images: float = MAX_BAD_IMAGES) -> ImageDataset:
    """A CSV with columns path,label (a header row is allowed); relative paths are read from the CSV's folder.
    Files that do not exist are refused (the CSV is wrong); files that exist but do not open are bad images."""
    check_share(max_bad_images)
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"CSV {path} does not exist; expected a file of path,label rows")
    rows = []
    with open(path, newline="") as fh:
        for i, row in enumerate(csv.reader(fh)):
            if not row or (i == 0 and [c.strip().lower() for c in row[:2]] == ["path", "label"]):
                continue
            if len(row) < 2:
                raise DataError(f"{path}:{i + 1}: expected 'path,label', got {row}")
            rows.append((row[0].strip(), row[1].strip()))
    if not rows:
        raise DataError(f"{path} lists no images")
    classes = list(classes) if classes is not None else sorted({lab for _, lab in rows})
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({lab for _, lab in rows} - set(index))
    if unknown:
        raise DataError(f"{path}: labels {unknown} are not in the job's labels {classes}")
    entries = [(Path(p) if Path(p).is_absolute() else path.parent / p, index[lab]) for p, lab in rows]
    missing = [str(f) for f, _ in entries if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{path} names {len(missing)} file(s) that do not exist, e.g. {missing[:3]}; "
                                f"relative paths are read from {path.parent}: fix the paths or remove those rows")
    notes = [f"class {c!r} has no rows in {path}: it stays in the label list" for c in classes
             if c not in {lab for _, lab in rows}]
    return _listed(entries, classes, preprocess, str(path), max_bad_images, notes)


def load_dataset(source: str, preprocess: Callable, classes: Optional[Sequence[str]] = None,
                 max_bad_images: float = MAX_BAD_IMAGES) -> ImageDataset:
    """"digits", a folder of class sub-folders, or a .csv file."""
    if source == "digits":
        return load_digits_dataset(preprocess)
    p = Path(source).expanduser()
    if p.suffix.lower() == ".csv":
        return load_csv(p, preprocess, classes, max_bad_images)
    return load_image_folder(p, preprocess, classes, max_bad_images)


# ---- splitting one dataset across sites ----------------------------------------------------------
def partition(labels: np.ndarray, num_sites: int, scheme: str = "iid", alpha: float = 0.5,
              seed: int = 0, min_size: int = 10) -> List[np.ndarray]:
    """Indices of each site's share. "iid": a seeded shuffle cut in equal parts. "dirichlet": per class,
    proportions drawn from Dirichlet(alpha) (smaller alpha, stronger label skew), redrawn until every
    site has at least `min_size` samples. Deterministic in (labels, num_sites, scheme, alpha, seed)."""
    labels = np.asarray(labels)
    if num_sites < 1:
        raise DataError(f"num_sites must be >= 1, got {num_sites}")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), num_sites)]
    if scheme != "dirichlet":
        raise DataError(f"unknown partition scheme {scheme!r}; use 'iid' or 'dirichlet'")
    if alpha <= 0:
        raise DataError(f"dirichlet alpha must be > 0, got {alpha}")
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
    raise DataError(f"could not draw a Dirichlet({alpha}) split giving each of {num_sites} sites {min_size} samples")


def site_index(site_name: str, num_sites: int) -> int:
    """'site-3' -> 2. Other names have no partition: they must bring their own data."""
    m = re.fullmatch(r"site-(\d+)", site_name)
    if not m or not 1 <= int(m.group(1)) <= num_sites:
        raise DataError(
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


def split_record(site_name: str, data: str, simulated: bool, num_sites: int, partition: str, alpha: float,
                 data_seed: int, val_fraction: float) -> Dict:
    """How a site's data is split, as plain JSON: the site sends it with its updates and the server keeps it
    in the checkpoint metadata, so the exporter verifies on the images the sites really held (site_datasets)."""
    rec = {"site": site_name, "data": str(data), "simulated": bool(simulated), "data_seed": int(data_seed),
           "val_fraction": float(val_fraction)}
    if simulated:
        rec.update(num_sites=int(num_sites), partition=str(partition), alpha=float(alpha))
    return rec


def site_datasets(record: Mapping, preprocess: Callable, classes: Optional[Sequence[str]] = None,
                  max_bad_images: float = MAX_BAD_IMAGES) -> Tuple[ImageDataset, ImageDataset, ImageDataset]:
    """(train, validation, whole dataset) of the site a split_record describes: the digits' simulated share of
    site-N, or all of the site's own data cut by train_val_split. The one place a site's split is made."""
    data = record["data"]
    dataset = load_dataset(data, preprocess, classes=classes if data != "digits" else None,
                           max_bad_images=max_bad_images)
    if record["simulated"]:
        train, val = site_split(dataset, record["site"], record["num_sites"], record["partition"], record["alpha"],
                                record["data_seed"], record["val_fraction"])
    else:
        tr, va = train_val_split(len(dataset), record["val_fraction"], record["data_seed"])
        train, val = dataset.subset(tr), dataset.subset(va)
    return train, val, dataset
