"""CLIP's zero-shot classifier as the starting head, and the initial adapter file that carries it.

    python -m nvflare_lora.zeroshot JOB_DIR            # writes JOB_DIR/app/config/initial_adapter/

The head becomes logit_scale x the normalised text embeddings of the class prompts (one prompt per
template, averaged and renormalised per class) with bias 0, and the model normalises its image
embeddings: round 0 then scores what CLIP scores zero-shot. The server never loads the base, so the text
tower runs once, here, on a machine that has the base: the command writes the job's initial adapter (this
head, LoRA at its seeded init) as a checkpoint directory with the base fingerprint, and the job's
persistor (head_init = "zeroshot", initial_adapter = "initial_adapter") starts from it after checking
that fingerprint, the LoRA settings, the labels and the templates.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from . import adapter as ad
from .base_model import ModelNotFoundError, base_fingerprint, preprocessing_for
from .checkpoint import CheckpointMeta, save_adapter_dir
from .head import DEFAULT_TEMPLATES, Head, HeadError, check_templates
from .jobfolder import read_job
from .models import build_classifier, load_tokenizer
from .skeleton import adapter_skeleton, init_adapter_state

HEAD_WEIGHT, HEAD_BIAS = "base_model.model.classifier.weight", "base_model.model.classifier.bias"
INITIAL_ADAPTER_DIR = "initial_adapter"
ZeroShotError = HeadError  # the name this module's API used


def zeroshot_head(model_name: str, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES):
    """(weight (classes, embedding width), bias (classes,)) of the base's zero-shot classifier, float32 numpy: the
    logits are its family's own (CLIP: bias 0; SigLIP: its logit_bias)."""
    templates = check_templates(templates)
    tokenizer = load_tokenizer(model_name)
    try:
        classifier, _ = build_classifier(model_name, len(labels), include_text=True)
    except ModelNotFoundError as e:  # e.g. a checkpoint without the text tower's weights
        raise ZeroShotError(f"base {model_name!r} cannot give a zero-shot head, its text tower does not load: {e}") from e
    weight = classifier.logit_scale.exp() * classifier.eval().embed_labels(tokenizer, labels, templates)
    bias = classifier.score_bias().expand(len(labels))
    return weight.float().numpy(), bias.float().numpy().astype(np.float32)


def write_initial_adapter(out: str | Path, model_name: str, labels: Sequence[str], lora,
                          templates: Sequence[str] = DEFAULT_TEMPLATES) -> Path:
    """The job's initial adapter with a zero-shot head, as a checkpoint directory (safetensors + JSON)."""
    if not lora.train_head:
        raise ZeroShotError("a zero-shot head must be trained and exchanged: add 'classifier' to target_components")
    labels = list(labels)
    shapes, peft_config = adapter_skeleton(model_name, len(labels), lora)
    state = init_adapter_state(shapes, lora.seed)
    state[HEAD_WEIGHT], state[HEAD_BIAS] = zeroshot_head(model_name, labels, templates)
    ad.check_adapter(state, shapes, "zero-shot adapter", float32=True)
    n = int(sum(v.size for v in state.values()))
    meta = CheckpointMeta(base_model=str(model_name), base_fingerprint=base_fingerprint(model_name), labels=labels,
                          preprocessing=preprocessing_for(model_name).to_dict(), lora_config=lora.to_dict(),
                          head=Head(init="zeroshot", templates=tuple(templates)).to_dict(), round=-1, checkpoint="initial",
                          parameters={"exchanged": n, "trainable": n})
    return save_adapter_dir(out, state, peft_config, meta)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nvflare_lora.zeroshot", description=__doc__.splitlines()[0])
    p.add_argument("job_dir", metavar="JOB_DIR", help="the job folder (its server config names the base, labels, LoRA)")
    p.add_argument("--out", help=f"where to write (default JOB_DIR/app/config/{INITIAL_ADAPTER_DIR})")
    p.add_argument("--model", help="this machine's copy of the base, if not at the job's path (same fingerprint)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    job = Path(args.job_dir)
    try:
        _, js = read_job(job)  # the job schema's one reader: the same settings the server runs with
        labels, templates = js.labels_or_default(), list(js.prompt_templates or DEFAULT_TEMPLATES)
        out = Path(args.out) if args.out else job / "app" / "config" / (js.initial_adapter or INITIAL_ADAPTER_DIR)
        path = write_initial_adapter(out, args.model or js.model, labels, js.lora_config(), templates)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote the zero-shot initial adapter ({len(labels)} classes, templates {templates}) to {path}")
    if js.head_init != "zeroshot" or not js.initial_adapter:
        print(f"note: the job starts from it only with head_init = \"zeroshot\" and initial_adapter = "
              f"\"{out.name if not args.out else out}\" in its persistor args")
    return 0


if __name__ == "__main__":
    sys.exit(main())
