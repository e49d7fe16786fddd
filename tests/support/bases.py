"""Small random bases of the other model families (nvflare_lora.families), saved as their checkpoints are:
save_pretrained's config.json and model.safetensors, a tokenizer.json and the family's preprocessor_config.json (a
few hundred kB each; nvflare_lora.sample_data.write_random_base writes them)."""

from pathlib import Path

from nvflare_lora.sample_data import write_random_base

# tiny-clip's tower sizes, with room for a prompt in the text tower
SMALL = dict(
    text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=600,
                     max_position_embeddings=32),
    vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       image_size=32, patch_size=8),
)


def small_base(directory: Path, family: str, seed: int = 0) -> str:
    """A small random base of `family` ("siglip" or "metaclip_2") in `directory`. SigLIP compares image and text
    embeddings of one width (its towers' own heads pool to it); MetaCLIP 2, as CLIP, projects both to projection_dim."""
    config = {k: dict(v) for k, v in SMALL.items()}
    if family == "siglip":
        config["text_config"]["projection_size"] = SMALL["vision_config"]["hidden_size"]
    else:
        config["projection_dim"] = 32
    return str(write_random_base(directory, seed, family, **config))
