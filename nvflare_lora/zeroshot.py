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
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from .errors import NVFlareLoRAError

DEFAULT_TEMPLATES = ("a photo of a {}.",)
HEAD_INITS = ("seeded", "zeroshot")
HEAD_WEIGHT, HEAD_BIAS = "base_model.model.classifier.weight", "base_model.model.classifier.bias"
INITIAL_ADAPTER_DIR = "initial_adapter"


class ZeroShotError(NVFlareLoRAError):
    """The base cannot give a zero-shot head (no text tower, no tokenizer) or the settings are wrong."""


def check_templates(templates: Sequence[str]) -> List[str]:
    templates = list(templates or ())
    if not templates or any(not isinstance(t, str) or t.count("{}") != 1 for t in templates):
        raise ZeroShotError(f"prompt_templates must be a non-empty list of strings with one '{{}}' for the class "
                            f"name each, e.g. {list(DEFAULT_TEMPLATES)}; got {templates!r}")
    return templates


def head_spec(head_init: str, templates: Sequence[str], head: str = "linear") -> Dict:
    """What the job announces about its head: its type, how it starts, whether image embeddings are normalised
    (and the prompt templates where the text tower scores the classes)."""
    if head == "text":
        if head_init != "seeded":
            raise ZeroShotError(f"head_init {head_init!r} starts a linear head; the text head has no head to start: it "
                                f"is CLIP's zero-shot classifier from round 0 (leave head_init at \"seeded\")")
        return {"type": "text", "init": "text", "normalize_embeds": True, "templates": check_templates(templates)}
    if head != "linear":
        raise ZeroShotError(f"head must be \"linear\" or \"text\"; got {head!r}")
    if head_init not in HEAD_INITS:
        raise ZeroShotError(f"head_init must be one of {', '.join(map(repr, HEAD_INITS))}; got {head_init!r}")
    if head_init == "seeded":
        return {"init": "seeded", "normalize_embeds": False}
    return {"init": "zeroshot", "normalize_embeds": True, "templates": check_templates(templates)}


def check_head(head_init: str, templates: Optional[Sequence[str]], initial_adapter: str = "", resume_from: str = "",
               head: str = "linear") -> Dict:
    """head_spec, and refuses a zero-shot head without the adapter file that holds it."""
    spec = head_spec(head_init, templates or DEFAULT_TEMPLATES, head)
    if head_init == "zeroshot" and not (initial_adapter or resume_from):
        raise ZeroShotError("head_init 'zeroshot' needs initial_adapter (the server never loads the base, so it needs "
                            "the initial adapter that holds the zero-shot head): run `python -m nvflare_lora.zeroshot "
                            "JOB_DIR` and set initial_adapter = \"initial_adapter\"")
    return spec


def load_tokenizer(model_name: str):
    """The base's own CLIP tokenizer (tokenizer.json, or vocab.json + merges.txt, in its directory)."""
    from .models import resolve_model

    source = resolve_model(model_name)
    fix = ("save the tokenizer that came with the checkpoint into it (CLIPTokenizer.from_pretrained(...)"
           ".save_pretrained(DIR)), or use a linear head started from a seeded init (head = \"linear\", "
           "head_init = \"seeded\")")
    if source.path is None:
        raise ZeroShotError(f"base {model_name!r} is a built-in preset without a tokenizer: a zero-shot or text head "
                            f"needs a CLIP checkpoint directory with its tokenizer; {fix}")
    files = {p.name for p in source.path.iterdir()}
    if "tokenizer.json" not in files and not {"vocab.json", "merges.txt"} <= files:
        raise ZeroShotError(f"base {source.path} has no tokenizer (tokenizer.json, or vocab.json and merges.txt): "
                            f"a zero-shot or text head encodes the class names with it; {fix}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source.path), local_files_only=True)


def check_class_names(labels: Sequence[str], where: str = "the labels") -> List[str]:
    """Class names a text head can score: two or more, none empty or only whitespace, none twice."""
    labels = [str(x) for x in (labels or ())]
    if len(labels) < 2:
        raise ZeroShotError(f"{where} name {len(labels)} class(es) {labels}: a classifier needs two or more; give "
                            f"this site class folders for at least two classes (or a labels list of its own)")
    blank = [i for i, x in enumerate(labels) if not x.strip()]
    if blank:
        raise ZeroShotError(f"{where}: label(s) at position(s) {blank} are empty or only whitespace; name every class")
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise ZeroShotError(f"{where} name {twice} more than once; give each class once")
    return labels


def tokenize_labels(tokenizer, labels: Sequence[str], templates: Sequence[str], max_len: int, where: str = "the labels"):
    """(input_ids, attention_mask, templates per class) of every class's prompts, class by class: what
    CLIPImageClassifier.set_labels takes. Refuses labels whose prompts the tokenizer truncates to the same tokens
    (the model could not tell those classes apart)."""
    labels, templates = check_class_names(labels, where), check_templates(templates)
    prompts = [t.format(label) for label in labels for t in templates]
    tok = tokenizer(prompts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    seen: Dict[tuple, str] = {}
    ids = tok["input_ids"].view(len(labels), len(templates), -1)
    for label, rows in zip(labels, ids):
        key = tuple(map(tuple, rows.tolist()))
        if key in seen:
            raise ZeroShotError(f"{where}: {seen[key]!r} and {label!r} become the same tokens once their prompts are "
                                f"cut to the text tower's {max_len} positions; shorten the prompt templates or rename "
                                f"one class so they differ early")
        seen[key] = label
    return tok["input_ids"], tok["attention_mask"], len(templates)


@torch.no_grad()
def text_embeddings(classifier, tokenizer, labels: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(classes, projection_dim): per class, the unit-length mean of its prompts' unit-length text embeddings
    (CLIPImageClassifier.class_embeddings, the text head's own computation)."""
    max_len = classifier.clip_config.text_config.max_position_embeddings
    ids, mask, per_class = tokenize_labels(tokenizer, labels, templates, max_len)
    emb = classifier.encode_text(ids, mask).view(len(labels), per_class, -1).mean(1)
    return emb / emb.norm(dim=-1, keepdim=True)


def zeroshot_head(model_name: str, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES):
    """(weight (classes, projection_dim), bias (classes,)) of CLIP's zero-shot classifier, float32 numpy."""
    from .models import ModelNotFoundError, build_classifier

    templates = check_templates(templates)
    tokenizer = load_tokenizer(model_name)
    try:
        classifier, _ = build_classifier(model_name, len(labels), include_text=True)
    except ModelNotFoundError as e:  # e.g. a checkpoint without the text tower's weights
        raise ZeroShotError(f"base {model_name!r} cannot give a zero-shot head, its text tower does not load: {e}") from e
    weight = classifier.logit_scale.exp() * text_embeddings(classifier.eval(), tokenizer, labels, templates)
    return weight.float().numpy(), np.zeros(len(labels), np.float32)


def write_initial_adapter(out: str | Path, model_name: str, labels: Sequence[str], lora,
                          templates: Sequence[str] = DEFAULT_TEMPLATES) -> Path:
    """The job's initial adapter with a zero-shot head, as a checkpoint directory (safetensors + JSON)."""
    from . import adapter as ad
    from .checkpoint import CheckpointMeta, save_adapter_dir
    from .lora_model import adapter_skeleton
    from .models import base_fingerprint, preprocessing_for

    if not lora.train_head:
        raise ZeroShotError("a zero-shot head must be trained and exchanged: add 'classifier' to target_components")
    labels = list(labels)
    shapes, peft_config = adapter_skeleton(model_name, len(labels), lora)
    state = ad.init_adapter_state(shapes, lora.seed)
    state[HEAD_WEIGHT], state[HEAD_BIAS] = zeroshot_head(model_name, labels, templates)
    ad.check_adapter(state, shapes, "zero-shot adapter", float32=True)
    n = int(sum(v.size for v in state.values()))
    meta = CheckpointMeta(base_model=str(model_name), base_fingerprint=base_fingerprint(model_name), labels=labels,
                          preprocessing=preprocessing_for(model_name).to_dict(), lora_config=lora.to_dict(),
                          head=head_spec("zeroshot", templates), round=-1, checkpoint="initial",
                          parameters={"exchanged": n, "trainable": n})
    return save_adapter_dir(out, state, peft_config, meta)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nvflare_lora.zeroshot", description=__doc__.splitlines()[0])
    p.add_argument("job_dir", metavar="JOB_DIR", help="the job folder (its server config names the base, labels, LoRA)")
    p.add_argument("--out", help=f"where to write (default JOB_DIR/app/config/{INITIAL_ADAPTER_DIR})")
    p.add_argument("--model", help="this machine's copy of the base, if not at the job's path (same fingerprint)")
    args = p.parse_args(argv)
    from .settings import read_job

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
