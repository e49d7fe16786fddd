"""The base model as data, without its network: where it comes from, its config, its fingerprint, its preprocessing.

A model name is one of three things, tried in this order:
1. a built-in preset ("tiny-clip"): a small CLIP config with seeded random init, nothing downloaded;
2. a local directory in HuggingFace format (config.json + *.safetensors), what production sites use;
3. a hub id such as "openai/clip-vit-base-patch32", resolved through the local HuggingFace cache or,
   for users with access, downloaded once.

The base is a CLIP, SigLIP (SigLIP 2 at a fixed resolution) or MetaCLIP 2 model (nvflare_lora.families says what
differs between them). This module imports transformers' configuration classes only, never the modelling code
(nvflare_lora.models): the NVFlare server process (the persistor) describes the base, its adapter's shapes
(nvflare_lora.skeleton.adapter_skeleton) and its preprocessing from here, and so starts without transformers' models
or peft (tests/test_architecture.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from huggingface_hub import snapshot_download
from transformers import CLIPConfig

from .config import TOWER_PREFIX
from .errors import ModelNotFoundError
from .families import family_of, read_family_config
from .files import atomic_write
from .preprocessing import Preprocessing

TINY_PRESET = "tiny-clip"

# Small enough to train on 2 CPU cores in seconds, big enough to learn digits: 32x32 images, 8x8 patches.
_TINY_CONFIG = dict(
    text_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        vocab_size=1000, max_position_embeddings=16, bos_token_id=998, eos_token_id=999, pad_token_id=1,
    ),
    vision_config=dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8,
    ),
    projection_dim=32,
)
PRESETS = {TINY_PRESET: (_TINY_CONFIG, 0)}


def _how_to_supply(name: str, tried: List[str]) -> str:
    return (
        f"cannot find CLIP model {name!r}. Tried: " + "; ".join(tried) + ". Supply a model in one of three ways: "
        f"(1) the built-in preset {TINY_PRESET!r} (no download); (2) a local directory in HuggingFace format "
        f"holding config.json and model.safetensors (e.g. written by CLIPModel.save_pretrained(DIR)); "
        f"(3) a hub id such as 'openai/clip-vit-base-patch32' on a machine that can reach the hub or has it in "
        f"its HuggingFace cache."
    )


@dataclass
class ModelSource:
    """Where a base model comes from: a preset, or a directory with config.json and safetensors files."""

    name: str
    kind: str  # "preset" | "dir" | "hub"
    path: Optional[Path] = None

    def weight_files(self) -> List[Path]:
        if self.kind == "preset":
            return []
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            pickled = sorted(p.name for p in self.path.glob("*.bin")) + sorted(p.name for p in self.path.glob("*.pt"))
            hint = (
                f" It has {pickled}: pickled weights are not loaded here; convert once with "
                f"CLIPModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)."
                if pickled else ""
            )
            raise ModelNotFoundError(f"model directory {self.path} has no *.safetensors weight file.{hint}")
        return files


def resolve_model(name: str) -> ModelSource:
    """Find the base model named `name`: a preset, a local directory, or a hub id (cache first)."""
    name = str(name)
    tried = []
    if name in PRESETS:
        return ModelSource(name, "preset")
    tried.append(f"presets {sorted(PRESETS)}")
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelNotFoundError(_how_to_supply(name, tried + [f"directory {p} (it has no config.json)"]))
        return ModelSource(name, "dir", p.resolve())
    tried.append(f"local directory {p.resolve()} (does not exist)")
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        try:
            local = snapshot_download(
                name, allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json",
                                      "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                                      "special_tokens_map.json", "vocab.json", "merges.txt", "spiece.model",
                                      "sentencepiece.bpe.model"],
            )
            return ModelSource(name, "hub", Path(local))
        except Exception as e:  # offline, unknown repo, no access: all mean the same to the user
            tried.append(f"hub id {name!r} ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
    else:
        tried.append("hub id (not of the form owner/name)")
    raise ModelNotFoundError(_how_to_supply(name, tried))


def load_clip_config(source: ModelSource):
    """The base's configuration: CLIPConfig, SiglipConfig or MetaClip2Config (families.read_family_config refuses
    any other model_type, naming the supported ones)."""
    if source.kind == "preset":
        cfg_dict, _ = PRESETS[source.name]
        return CLIPConfig(**cfg_dict)
    return read_family_config(source.path)


def config_sha256(clip_config) -> str:
    d = clip_config.to_diff_dict() if hasattr(clip_config, "to_diff_dict") else dict(clip_config)
    keep = {}
    for tower in ("vision_config", "text_config"):
        sub = d.get(tower, {}) or {}
        keep[tower] = {k: sub.get(k) for k in sorted(sub) if k in _SHAPE_KEYS}
    keep["projection_dim"] = d.get("projection_dim", getattr(clip_config, "projection_dim", None))
    if family_of(clip_config).name != "clip":  # (CLIP's hashes stay as they were before other families)
        keep["model_type"] = clip_config.model_type
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()


_SHAPE_KEYS = {
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size",
    "num_channels", "vocab_size", "max_position_embeddings", "hidden_act", "layer_norm_eps", "projection_dim",
    "projection_size", "vision_use_head",
}


def weights_sha256(source: ModelSource, cache_file: Optional[Path] = None) -> str:
    """Hash of a directory's weight files (names and bytes, file by file): what its weights are as stored. A
    preset has no files; base_fingerprint identifies it by preset_sha256.

    cache_file: a JSON file remembering the hash of a directory's weight files by (path, size, mtime), so a
    process that starts for every task (the simulator without -t) reads a 600 MB ViT-B/32 base once, not
    on every task. Any change of a file's size or modification time makes it hash the files again."""
    if cache_file is not None and source.kind != "preset":
        stamp = hashlib.sha256(json.dumps([(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns)
                                           for f in source.weight_files()]).encode()).hexdigest()
        cache = {}
        try:
            cache = json.loads(Path(cache_file).read_text())
        except (OSError, ValueError):
            pass
        if not isinstance(cache.get(stamp), str):
            cache[stamp] = weights_sha256(source)
            atomic_write(cache_file, json.dumps(cache, indent=1))
        return cache[stamp]
    if source.kind == "preset":
        raise ModelNotFoundError(f"{source.name!r} is a built-in preset: it has no weight files to hash "
                                 f"(base_fingerprint identifies it by preset_sha256)")
    h = hashlib.sha256()
    for f in source.weight_files():
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def base_fingerprint(model_name: str, with_weights: bool = True, cache_file: Optional[Path] = None) -> Dict[str, str]:
    """What identifies a base model across sites (paths may differ): its config hash, and the hash of its weight
    files (weights_sha256), or for a preset, whose weights are generated by code, the hash of what generates them
    (preset_sha256). cache_file: see weights_sha256."""
    source = resolve_model(model_name)
    fp = {"model": str(model_name), "kind": source.kind, "config_sha256": config_sha256(load_clip_config(source))}
    if with_weights and source.kind == "preset":
        fp["preset_sha256"] = preset_sha256(source.name)
    elif with_weights:
        fp["weights_sha256"] = weights_sha256(source, cache_file)
    return fp


def fingerprint_difference(expected: Dict[str, str], actual: Dict[str, str]) -> Optional[str]:
    """None when two fingerprints name the same base; otherwise a sentence saying what differs."""
    diffs = []
    for key in ("config_sha256", "weights_sha256", "preset_sha256"):
        if key in expected and key in actual and expected[key] != actual[key]:
            diffs.append(f"{key} {actual[key][:12]}... here vs {expected[key][:12]}... on the server")
    ids = [next((k for k in ("weights_sha256", "preset_sha256") if k in fp), None) for fp in (actual, expected)]
    if None not in ids and ids[0] != ids[1]:  # a preset (identified by what generates it) vs a directory's files
        diffs.append(f"{ids[0]} {actual[ids[0]][:12]}... here (a {actual.get('kind')}) vs {ids[1]} "
                     f"{expected[ids[1]][:12]}... on the server (a {expected.get('kind')})")
    if diffs:
        return (f"local base {actual.get('model')!r} differs from the server's {expected.get('model')!r}: "
                + "; ".join(diffs))
    return None


def preset_sha256(name: str) -> str:
    """A preset's identity: its config, its seed and the versions of torch and transformers that generate its weights
    (nvflare_lora.models builds them: torch.manual_seed(seed), then CLIPModel's init). Parties whose versions
    differ are told apart even where the bytes might agree; hashing the bytes would need the modelling code. The build
    tag (torch's "+cpu", "+cu126") is left out: the weights are generated on the CPU whatever the build."""
    cfg_dict, seed = PRESETS[name]
    recipe = {"config": cfg_dict, "seed": seed, "torch": version("torch").split("+")[0],
              "transformers": version("transformers").split("+")[0]}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def linear_layers(clip_config, include_text: bool = False) -> Dict[str, Tuple[int, int]]:
    """{module path: (in_features, out_features)} of every nn.Linear of nvflare_lora.models.CLIPImageClassifier
    that can take LoRA, in the order the model registers them (PEFT's key order): per tower, each encoder layer's
    k/v/q/out projections and MLP, then the tower's projection (CLIP, MetaCLIP 2: visual_projection /
    text_projection; SigLIP: the text tower's head; SigLIP's attention-pooling image head takes none:
    families.Family.not_targets). Tested equal to the built model's CLIPImageClassifier.lora_layers."""
    family = family_of(clip_config)
    out: Dict[str, Tuple[int, int]] = {}
    for tower in ("vision", "text") if include_text else ("vision",):
        prefix = TOWER_PREFIX[tower]
        c = getattr(clip_config, f"{tower}_config")
        h, m = int(c.hidden_size), int(c.intermediate_size)
        for i in range(int(c.num_hidden_layers)):
            layer = f"{prefix}.encoder.layers.{i}"
            for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
                out[f"{layer}.self_attn.{name}"] = (h, h)
            out[f"{layer}.mlp.fc1"], out[f"{layer}.mlp.fc2"] = (h, m), (m, h)
        if family.projection:
            out["visual_projection" if tower == "vision" else "text_projection"] = (h, int(clip_config.projection_dim))
        elif tower == "text":
            out[f"{prefix}.head"] = (h, int(c.projection_size))
    return out


def preprocessing_for(model_name: str) -> Preprocessing:
    """The image preprocessing of the model's own preprocessor_config.json when it has one (CLIP's processor: short
    side to `size`, centre crop; SigLIP's: the whole image to height x width, no crop; bicubic or bilinear), else its
    family's defaults. A processor this transform cannot reproduce (another resampling filter, a non-square size) is
    refused."""
    source = resolve_model(model_name)
    config = load_clip_config(source)
    image_size = config.vision_config.image_size
    mean, std, resize = family_of(config).image_defaults
    if source.path is None or not (source.path / "preprocessor_config.json").is_file():
        return Preprocessing(size=image_size, crop_size=image_size, mean=tuple(mean), std=tuple(std), resize=resize)
    path = source.path / "preprocessor_config.json"
    d = json.loads(path.read_text())
    size = d.get("size", image_size)
    exact = isinstance(size, dict) and "height" in size and "shortest_edge" not in size
    if exact and size.get("width", size["height"]) != size["height"]:
        raise ModelNotFoundError(f"{path}: image size {size['height']} x {size['width']} is not square; the "
                                 f"exported graph and the image pipeline take square images")
    size = size.get("shortest_edge", size.get("height", image_size)) if isinstance(size, dict) else size
    crop = d.get("crop_size", image_size)
    crop = crop.get("height", image_size) if isinstance(crop, dict) else crop
    squash = exact and not d.get("do_center_crop", False)  # resized to height x width as it is
    resample = _RESAMPLE_NAMES.get(d.get("resample", 3))  # PIL's numbers, as the processors store them
    if resample is None:
        raise ModelNotFoundError(f"{path}: resample {d.get('resample')!r} is not one this transform reproduces "
                                 f"(3 bicubic, 2 bilinear); training, export and serving would see other pixels")
    return Preprocessing(size=int(size), crop_size=int(size if squash else crop), mean=tuple(d.get("image_mean", mean)),
                         std=tuple(d.get("image_std", std)), resize="squash" if squash else "shortest_edge",
                         resample=resample)


_RESAMPLE_NAMES = {3: "bicubic", 2: "bilinear"}
