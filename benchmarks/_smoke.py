"""What the benchmarks' --smoke sizes share: where a smoke run writes, and a tiny base in HuggingFace format.

A smoke run goes through a benchmark's code end to end at a tiny size (one round, a few images, one seed,
the smallest grids), so that CI notices when a benchmark breaks; its numbers mean nothing. It never writes
to benchmarks/results/ (the measured figures): its JSON and plots go to benchmarks/out/smoke/ (git-ignored)
unless a path is given on the command line.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out" / "smoke"

# The shapes of the built-in tiny-clip preset (nvflare_lora.models), with 77 text positions instead of 16:
# the byte-level tokenizer of sample_data.write_clip_tokenizer spends one token per character, and the
# zero-shot prompts ("a photo of a functional.") need more than 16.
TINY_CLIP_CONFIG = dict(
    text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     vocab_size=1000, max_position_embeddings=77, bos_token_id=998, eos_token_id=999,
                     pad_token_id=1),
    vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       image_size=32, patch_size=8),
    projection_dim=32,
)


def out_path(name: str) -> str:
    """benchmarks/out/smoke/<name>, its folder created."""
    OUT.mkdir(parents=True, exist_ok=True)
    return str(OUT / name)


def json_path(name: str, given: str | None, smoke: bool) -> str:
    """Where a benchmark writes its raw results: the --json given, else benchmarks/out/smoke/<name> for a smoke
    run, else benchmarks/results/<name> (the measured figures)."""
    if given:
        return str(given)
    return out_path(name) if smoke else str(ROOT / "benchmarks" / "results" / name)


def write_tiny_base(directory: str | Path) -> Path:
    """A HuggingFace CLIP directory (config, weights, tokenizer) at tiny-clip's shapes, seeded random weights:
    what a smoke run uses where the full run writes a ViT-B/32-shaped base (a second, against a minute)."""
    from nvflare_lora.sample_data import write_random_base

    return write_random_base(directory, **TINY_CLIP_CONFIG)


def write_tiny_siglip_base(directory: str | Path) -> Path:
    """A SigLIP directory at tiny-clip's tower shapes (no projection: the embedding is the image tower's 64 wide),
    seeded random weights: what a smoke run uses where the full run writes a ViT-B/16-sized SigLIP."""
    from nvflare_lora.sample_data import write_random_base

    config = {k: {kk: vv for kk, vv in v.items() if not kk.endswith("token_id")}
              for k, v in TINY_CLIP_CONFIG.items() if k != "projection_dim"}
    config["text_config"]["projection_size"] = config["vision_config"]["hidden_size"]
    return write_random_base(directory, 0, "siglip", **config)
