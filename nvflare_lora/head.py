"""The classifier's head as one typed object, and the rules of the class names it scores.

    Head()                                          # a linear layer over the image embedding, seeded
    Head(init="zeroshot", templates=("a photo of a {}.",))  # a linear head started as CLIP's zero-shot one
    Head(kind="text", templates=("a photo of a {}.",))       # classes scored as words by the text tower
    Head.from_dict(meta["head"])                     # as the announcement and every checkpoint carry it

A linear head is a trained layer of num_classes outputs; `init` says how it starts ("seeded", or "zeroshot":
logit_scale x the class prompts' text embeddings, written by nvflare_lora.zeroshot). A text head has no layer:
the base family's own scoring, logit_scale x the unit image embedding . the unit class embeddings (+ SigLIP's
logit_bias), each class embedding the renormalised mean of its prompts' unit text embeddings
(CLIPImageClassifier.class_embeddings computes them, the one place in torch). Its labels may change at any time;
nothing exchanged depends on them.

Also here: the label-list rules (check_labels, check_class_names), the prompt templates, and tokenisation of a
label list's prompts by the text tower's rules (TextRules). This module imports neither torch nor transformers: serving (exporters/onnx/predict.py)
checks the labels it is given with the same rule as training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .errors import NVFlareLoRAError

KINDS = ("linear", "text")
INITS = ("seeded", "zeroshot")
DEFAULT_TEMPLATES = ("a photo of a {}.",)


class HeadError(NVFlareLoRAError):
    """A head, label list or prompt template that cannot work: what is wrong and what to do."""


def check_templates(templates: Optional[Sequence[str]]) -> Tuple[str, ...]:
    """Prompt templates: a non-empty list of strings with one '{}' each (where the class name goes)."""
    out = list(templates or ())
    if not out or any(not isinstance(t, str) or t.count("{}") != 1 for t in out):
        raise HeadError(f"prompt_templates must be a non-empty list of strings with one '{{}}' for the class name "
                        f"each, e.g. {list(DEFAULT_TEMPLATES)}; got {templates!r}")
    return tuple(out)


def check_labels(labels: Optional[Sequence[str]], num_classes: int) -> List[str]:
    """The class names of a linear head in label order ("0", "1", ... when None), one per output."""
    out = [str(x) for x in labels] if labels is not None else [str(i) for i in range(num_classes)]
    if len(out) != num_classes:
        raise HeadError(f"{len(out)} labels given for num_classes={num_classes}")
    return out


def check_class_names(labels: Optional[Sequence[str]], where: str = "the labels", strip: bool = False) -> List[str]:
    """Class names a classifier can tell apart: two or more, none empty or only whitespace, none twice.
    strip: names are stripped first (a list typed by a person: serving's --labels)."""
    labels = [str(x).strip() if strip else str(x) for x in (labels or ())]
    if len(labels) < 2:
        raise HeadError(f"{where} name {len(labels)} class(es) {labels}: a classifier needs two or more; give "
                        f"this site class folders for at least two classes (or a labels list of its own)")
    blank = [i for i, x in enumerate(labels) if not x.strip()]
    if blank:
        raise HeadError(f"{where}: label(s) at position(s) {blank} are empty or only whitespace; name every class")
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise HeadError(f"{where} name {twice} more than once; give each class once")
    return labels


def prompts(labels: Sequence[str], templates: Sequence[str]) -> List[str]:
    """Every class's prompts, class by class (len(labels) x len(templates))."""
    return [t.format(label) for label in labels for t in templates]


@dataclass(frozen=True)
class TextRules:
    """How a text tower reads prompts (its family's rules, nvflare_lora.families): at most max_length tokens;
    padded to the longest prompt, or to max_length (pad_to_max_length: SigLIP); the padding hidden by the attention
    mask (mask_padding) or attended to (SigLIP: an all-ones mask, as its tokenizer gives none); prompts lower-cased
    first (lowercase: SigLIP). One rule for training (tokenize_labels) and serving (exporters/onnx/predict.py, from
    the export's text.json)."""

    max_length: int
    pad_to_max_length: bool = False
    mask_padding: bool = True
    lowercase: bool = False

    def tokenizer_kwargs(self) -> Dict:
        """What a transformers tokenizer is called with: truncated to max_length, padded on the right (serving's
        `tokenizers` pads right; a checkpoint whose tokenizer pads left, as Gemma's may, is read the same way, and
        SigLIP reads the last position) to the longest prompt or to max_length."""
        return {"padding": "max_length" if self.pad_to_max_length else True, "padding_side": "right",
                "truncation": True, "max_length": self.max_length}

    def texts(self, labels: Sequence[str], templates: Sequence[str]) -> List[str]:
        """Every class's prompts as the tokenizer gets them."""
        out = prompts(labels, templates)
        return [t.lower() for t in out] if self.lowercase else out

    def mask(self, attention_mask: np.ndarray) -> np.ndarray:
        """The attention mask the tower reads, from the tokenizer's."""
        mask = np.asarray(attention_mask, np.int64)
        return mask if self.mask_padding else np.ones_like(mask)

    def to_dict(self) -> Dict:
        return {"max_length": int(self.max_length), "pad_to_max_length": bool(self.pad_to_max_length),
                "mask_padding": bool(self.mask_padding), "lowercase": bool(self.lowercase)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "TextRules":
        """The inverse of to_dict; a record from before families (CLIP's rules) has max_length only."""
        return cls(int(d["max_length"]), bool(d.get("pad_to_max_length", False)), bool(d.get("mask_padding", True)),
                   bool(d.get("lowercase", False)))


def tokenize_labels(tokenizer, labels: Sequence[str], templates: Sequence[str], rules: TextRules,
                    where: str = "the labels") -> Tuple[np.ndarray, np.ndarray, int]:
    """(input_ids, attention_mask, templates per class) of every class's prompts, class by class (int64 arrays),
    tokenized by the tower's rules: what CLIPImageClassifier.set_labels takes. Refuses labels whose prompts the
    tokenizer makes the same tokens (cut to the tower's length, or lower-cased: the model could not tell those
    classes apart)."""
    labels, templates = check_class_names(labels, where), check_templates(templates)
    tok = tokenizer(rules.texts(labels, templates), return_tensors="np", **rules.tokenizer_kwargs())
    ids, mask = np.asarray(tok["input_ids"], np.int64), rules.mask(tok["attention_mask"])
    seen: Dict[bytes, str] = {}
    for label, rows in zip(labels, ids.reshape(len(labels), len(templates), -1)):
        key = rows.tobytes()
        if key in seen:
            raise HeadError(f"{where}: {seen[key]!r} and {label!r} become the same tokens once their prompts are "
                            f"{'lower-cased and ' if rules.lowercase else ''}cut to the text tower's {rules.max_length} "
                            f"positions; shorten the prompt templates or rename one class so they differ early")
        seen[key] = label
    return ids, mask, len(templates)


@dataclass(frozen=True)
class Head:
    """What the head is. kind: "linear" or "text"; init: how a linear head starts ("seeded" or "zeroshot"; a text
    head's is "text": it is CLIP's zero-shot classifier from round 0); templates: the class prompts (a zero-shot
    or text head); normalize_embeds: the head reads unit-length image embeddings (a zero-shot or text head, or a
    model built so). Checked when made."""

    kind: str = "linear"
    init: str = "seeded"
    templates: Tuple[str, ...] = ()
    normalize_embeds: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise HeadError(f"head must be \"linear\" or \"text\"; got {self.kind!r}")
        if self.kind == "text":
            if self.init not in ("text", "seeded"):
                raise HeadError(f"head_init {self.init!r} starts a linear head; the text head has no head to start: it "
                                f"is CLIP's zero-shot classifier from round 0 (leave head_init at \"seeded\")")
            object.__setattr__(self, "init", "text")
            object.__setattr__(self, "normalize_embeds", True)
        elif self.init not in INITS:
            raise HeadError(f"head_init must be one of {', '.join(map(repr, INITS))}; got {self.init!r}")
        if self.kind == "text" or self.init == "zeroshot":
            object.__setattr__(self, "templates", check_templates(self.templates or DEFAULT_TEMPLATES))
            object.__setattr__(self, "normalize_embeds", True)
        else:
            object.__setattr__(self, "templates", ())
            object.__setattr__(self, "normalize_embeds", bool(self.normalize_embeds))

    @property
    def text(self) -> bool:
        """Classes are scored as words by the text tower (each site on its own labels)."""
        return self.kind == "text"

    @classmethod
    def from_settings(cls, head: str = "linear", head_init: str = "seeded",
                      prompt_templates: Optional[Sequence[str]] = None) -> "Head":
        """The head a job's settings (head, head_init, prompt_templates) declare."""
        return cls(kind=head, init=head_init, templates=tuple(prompt_templates or ()))

    def to_dict(self) -> Dict:
        """As the announcement and checkpoints carry it (nvflare_lora.json "head")."""
        if self.text:
            return {"type": "text", "init": "text", "normalize_embeds": True, "templates": list(self.templates)}
        out = {"init": self.init, "normalize_embeds": self.normalize_embeds}
        if self.templates:
            out["templates"] = list(self.templates)
        return out

    @classmethod
    def from_dict(cls, d: Optional[Mapping]) -> "Head":
        """The inverse of to_dict; an empty or missing record is a seeded linear head (a file from before heads
        were recorded)."""
        d = dict(d or {})
        if not isinstance(d.get("templates", []), (list, tuple)):
            raise HeadError(f"a head record's templates must be a list, got {d.get('templates')!r}")
        return cls(kind=str(d.get("type", "linear")), init=str(d.get("init", "seeded")),
                   templates=tuple(d.get("templates") or ()), normalize_embeds=bool(d.get("normalize_embeds", False)))
