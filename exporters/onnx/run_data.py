"""Which images verify the export: the run's own validation images when the run directory says how the
sites split their data, else the bundled digits.

A simulator workspace holds each site's copy of the client config (config_fed_client.conf|json); from the
CLIPLoRAExecutor's arguments (data, num_sites, partition, alpha, data_seed, val_fraction) the sites'
validation shares are rebuilt with the same functions the executor uses. A site's private data
(NVFLARE_LORA_DATA or its local config) is not visible from here: then the digits are used, and said so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

from nvflare_lora.data import ImageDataset, load_dataset, site_split, train_val_split

EXECUTOR_CLASS = "CLIPLoRAExecutor"
_DEFAULTS = {"data": "digits", "num_sites": 4, "partition": "dirichlet", "alpha": 0.5, "data_seed": 0,
             "val_fraction": 0.2}


def executor_args(run_dir: Path) -> Optional[Dict]:
    """The CLIPLoRAExecutor arguments of the first client config found under run_dir, or None."""
    from pyhocon import ConfigFactory  # NVFlare's own config reader (it reads .json too)

    for path in sorted(run_dir.rglob("config_fed_client.*")):
        if path.suffix not in (".conf", ".json"):
            continue
        try:
            conf = ConfigFactory.parse_file(str(path))
        except Exception:
            continue
        for entry in conf.get("executors", []):
            executor = entry.get("executor", {})
            if str(executor.get("path", "")).endswith(EXECUTOR_CLASS):
                return {**_DEFAULTS, **{k: v for k, v in dict(executor.get("args", {})).items() if v is not None}}
    return None


def run_validation_set(run_dir: Path, preprocess, classes=None) -> Tuple[Optional[ImageDataset], str]:
    """(dataset or None, a sentence saying what it is or why it could not be rebuilt). classes: the model's
    labels, in its order (an image folder's class folders are matched to them by name)."""
    if run_dir.is_file() or not run_dir.exists():
        return None, "no run directory"
    args = executor_args(run_dir)
    if args is None:
        return None, f"no client config naming {EXECUTOR_CLASS} under {run_dir}"
    data = str(args["data"])
    if data == "digits":
        full = load_dataset("digits", preprocess)
        shares = [site_split(full, f"site-{i}", int(args["num_sites"]), args["partition"], float(args["alpha"]),
                             int(args["data_seed"]), float(args["val_fraction"]))[1]
                  for i in range(1, int(args["num_sites"]) + 1)]
        items = [item for share in shares for item in share.items]
        return ImageDataset(items, full.classes, preprocess), (
            f"the run's validation images: digits, {args['num_sites']} sites, {args['partition']} split, "
            f"val_fraction {args['val_fraction']}")
    # one folder per site ("{site}" in the path): the sites whose apps (app_<site>) are in the run directory
    sites = sorted({p.name[4:] for p in run_dir.rglob("app_*") if p.is_dir()} - {"server"}) if "{site}" in data else [""]
    if not sites:
        return None, f"no site app (app_<site>) under {run_dir} to resolve {data!r}"
    items, ds = [], None
    for site in sites:
        path = data.replace("{site}", site)
        if not Path(path).expanduser().exists():
            return None, f"the run's data {path!r} is not on this machine"
        ds = load_dataset(path, preprocess, classes)
        _, val = train_val_split(len(ds), float(args["val_fraction"]), int(args["data_seed"]))
        items += ds.subset(val).items
    return ImageDataset(items, ds.classes, preprocess), f"the run's validation images from {data}"
