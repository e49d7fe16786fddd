"""Checkpoints changed on purpose by a test, written back as nvflare_lora writes them (a new manifest), so that what
the test examines is the change, not the manifest's refusal of it."""

from pathlib import Path

from nvflare_lora.checkpoint import read_adapter_dir, save_adapter_dir


def rewrite_meta(checkpoint: Path, **changes) -> Path:
    """Checkpoint `checkpoint` with these nvflare_lora.json fields changed, saved again (manifest included)."""
    state, peft_config, meta = read_adapter_dir(checkpoint)
    meta = {k: v for k, v in meta.items() if k != "manifest"}
    return save_adapter_dir(checkpoint, state, peft_config, {**meta, **changes})
