"""Local training throughput of a site, two ways, on the same images (benchmarks/site.py (a) on the CPU,
benchmarks/gpu_check.py on a GPU): the executor's path (FederatedCLIPModel + CLIPLoRAWrapper, SiteLoader,
train_local: what CLIPLoRAExecutor runs each round) against a plain PyTorch + PEFT + DataLoader loop written the
way a PyTorch user would. Nothing of NVFlare or onnxruntime (gpu_check.py runs where they are absent)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch import nn

LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0)


def executor_path(base: str, folder: str, batch: int, workers: int, device: str):
    """A function running `steps` steps the way CLIPLoRAExecutor trains (its classes, its loader)."""
    from nvflare_lora import CLIPLoRAWrapper, FederatedCLIPModel, LoRAConfig
    from nvflare_lora.data import SiteLoader, load_dataset
    from nvflare_lora.training import train_local

    fed = FederatedCLIPModel(base, 2, labels=["functional", "defective"], device=device)
    CLIPLoRAWrapper(fed, LoRAConfig(**LORA)).apply_lora_to_federated_model()
    data = load_dataset(folder, fed.preprocess, classes=["functional", "defective"])
    loader = SiteLoader(data, batch, shuffle=True, num_workers=workers, device=fed.device)
    rounds = iter(range(10**6))

    def run(steps: int) -> int:
        return train_local(fed, loader, max_steps=steps, lr=1e-3, seed=next(rounds))["samples"]

    return run


class _Files(torch.utils.data.Dataset):
    def __init__(self, items, preprocess):
        self.items, self.preprocess = items, preprocess

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.items[i]
        with Image.open(path) as im:
            return self.preprocess(im.convert("RGB")), label


class _Classifier(nn.Module):
    """The family's image tower, its projection (SigLIP has none: its attention-pooling head gives the embedding)
    and a Linear head."""

    def __init__(self, clip, num_classes: int):
        super().__init__()
        self.vision_model = clip.vision_model
        self.visual_projection = getattr(clip, "visual_projection", nn.Identity())
        width = clip.config.projection_dim if hasattr(clip, "visual_projection") else \
            clip.config.vision_config.hidden_size
        self.head = nn.Linear(width, num_classes)

    def forward(self, pixel_values):
        return self.head(self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output))


def plain_loop(base: str, folder: str, batch: int, workers: int, device: str, autocast_dtype=None):
    """The baseline: plain PyTorch + PEFT + DataLoader, written without this package's training code."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from nvflare_lora.base_model import preprocessing_for

    dev = torch.device(device)
    model = _Classifier(AutoModel.from_pretrained(base), 2)
    model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["head"], **LORA)).to(dev)
    items = [(p, int(p.parent.name == "defective")) for p in sorted(Path(folder).rglob("*.png"))]
    loader = torch.utils.data.DataLoader(_Files(items, preprocessing_for(base)), batch_size=batch, shuffle=True,
                                         num_workers=workers, persistent_workers=workers > 0,
                                         pin_memory=dev.type == "cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)

    def run(steps: int) -> int:
        model.train()
        n = 0
        for i, (x, y) in enumerate(loader):
            if i >= steps:
                break
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(x)
            loss = nn.functional.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            n += int(y.shape[0])
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return n

    return run


def throughput(base: str, folder: str, batch: int, steps: int, reps: int, workers: int, device: str = "cpu",
               plain_autocast=None, log=print) -> dict:
    """Images/s of both loops, alternating, after one warm-up of 2 steps each."""
    runs = {"executor": executor_path(base, folder, batch, workers, device),
            "plain": plain_loop(base, folder, batch, workers, device, plain_autocast)}
    for run in runs.values():
        run(2)
    rates = {name: [] for name in runs}
    for rep in range(reps):
        for name, run in runs.items():
            t0 = time.perf_counter()
            n = run(steps)
            if device != "cpu":
                torch.cuda.synchronize()
            rates[name].append(n / (time.perf_counter() - t0))
            log(f"  rep {rep + 1} {name:8s} {rates[name][-1]:7.2f} images/s")
    med = {name: statistics.median(v) for name, v in rates.items()}
    return {"images_per_s": rates, "median": med, "ratio": med["executor"] / med["plain"]}
