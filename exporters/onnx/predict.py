"""Serve an exported model: python -m exporters.onnx.predict MODEL_DIR INPUT... [--top K] [--variant NAME]
[--batch N] [--out FILE.csv|FILE.jsonl] [--labels "cat,dog,bird"] [--trust ROOT]

This is the code to copy into a service: read the labels and the preprocessing the model was trained with,
check that the files are the ones the export verified (their sha256 in export_report.json, from the bytes then
used; with --trust, the report's signature by the project: ExportFiles), open one ONNX
Runtime session (CUDA when onnxruntime-gpu has it, else CPU; exporters/onnx/session.py sets what the CPU
needs for int8), and turn logits into probabilities. MODEL_DIR is what `python -m exporters.onnx` wrote.

INPUT: image files, folders (every image below them, by the rule training uses for class folders:
nvflare_lora.preprocessing.image_files) and glob patterns ("photos/**/*.jpg"). Images are decoded as training
decodes them and classified in batches; a file that cannot be decoded is skipped, counted and named at the
end. Rows go to stdout, or to --out (CSV or JSON lines, written whole at the end); the last line on stderr
gives the count and the throughput. Exit status: 0 done; 2 bad input (nothing classified, nothing written).

--labels: classify against any label list given at run time, as CLIP does: each label's prompts (the export's
templates) through the exported text tower, tokenized with the `tokenizers` package (no torch, no transformers) by
the base family's rules (text.json: length, padding, case), and the image's unit embedding scored against the unit
class embeddings as the family scores them: CLIP and MetaCLIP 2 by a softmax over logit_scale x cosine; SigLIP by
each class's own sigmoid of logit_scale x cosine + logit_bias (the probabilities do not sum to 1, and adding a label
leaves the others' as they were; an export of a SigLIP text head scores its own labels so too, with or without
--labels). The model's own head is not used then. Needs an export made with --with-text from
a base that has a tokenizer.
"""

from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import io
import json
import sys
import time
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
from nvflare_lora.files import atomic_write, current_umask  # stdlib only: no torch
from nvflare_lora.head import HeadError, TextRules, check_class_names  # torch-free, as this module
from nvflare_lora.preprocessing import Preprocessing, image_files, open_image
from nvflare_lora.signing import SignatureError, TrustRoot, read_record  # cryptography only

from .errors import ServingError
from .session import open_session

REPORT_FILE = "export_report.json"
REPORT_SIGNATURE_FILE = "export_report.sig"  # a participant's signature of REPORT_FILE's bytes (--sign KIT)
OUTPUT_FORMATS = (".csv", ".jsonl")
TOKENIZER_FILE, TEXT_FILE, CLASS_EMBEDDINGS_FILE = "tokenizer.json", "text.json", "class_embeddings.safetensors"


def _reexport(model_dir: Path, report: dict) -> str:
    return f"python -m exporters.onnx {report.get('source_checkpoint') or 'RUN_DIR'} --out {model_dir}"


class ExportFiles:
    """An exported model's files as export_report.json lists them. Each is read once: its bytes are hashed, checked
    against the report's sha256, and handed on to what parses them (JSON, safetensors, the tokenizer, ONNX
    Runtime), so what is served is what was checked. With `trust` (the project's rootCA.pem or a kit of it) the report
    must carry the signature of a participant of that project (export_report.sig: `python -m exporters.onnx --sign
    KIT`), so its hashes, hence every file, are the signer's. `verified` says which check was made."""

    def __init__(self, model_dir: str | Path, trust: "Optional[str | Path | TrustRoot]" = None):
        self.dir = Path(model_dir)
        if not (self.dir / REPORT_FILE).is_file():
            raise ServingError(f"{self.dir} is not an exported model directory (no {REPORT_FILE}); create one with: "
                               f"python -m exporters.onnx RUN_DIR --out {self.dir}")
        raw = (self.dir / REPORT_FILE).read_bytes()
        try:
            report = json.loads(raw)
            if not isinstance(report.get("files"), dict):
                raise ServingError("it lists no files")
        except (ValueError, AttributeError) as e:
            raise ServingError(f"{self.dir / REPORT_FILE} is not a readable export report ({e}); re-export: "
                               f"python -m exporters.onnx RUN_DIR --out {self.dir}") from None
        self.report, self.verified = report, "sha256 of each file (export_report.json, unsigned)"
        if trust is not None:
            self.verified = "signed by " + self._check_signature(raw, trust)
        self.hashes = report.get("sha256")
        if not isinstance(self.hashes, dict) or not self.hashes:
            raise ServingError(f"{self.dir / REPORT_FILE} records no sha256 of its files (an export from before "
                               f"integrity checks), so they cannot be checked; re-export: {_reexport(self.dir, report)}")

    @classmethod
    def unchecked(cls, model_dir: str | Path) -> "ExportFiles":
        """The exporter's own files while it writes them (no report yet): read as they are."""
        files = cls.__new__(cls)
        files.dir, files.report, files.hashes, files.verified = Path(model_dir), {}, None, "not checked (being written)"
        return files

    def _check_signature(self, raw: bytes, trust) -> str:
        try:
            root = trust if isinstance(trust, TrustRoot) else TrustRoot(trust)
            if not (self.dir / REPORT_SIGNATURE_FILE).is_file():
                raise SignatureError(
                    f"{self.dir} is not signed ({REPORT_SIGNATURE_FILE} missing), and --trust asks for a signature of "
                    f"project {root.project!r}: export it with --sign SITE_KIT, or serve it without --trust")
            return root.verify(raw, read_record(self.dir / REPORT_SIGNATURE_FILE),
                               f"{self.dir / REPORT_FILE} ({REPORT_SIGNATURE_FILE})")
        except SignatureError as e:
            raise ServingError(str(e)) from None

    def read(self, name: str) -> bytes:
        """The bytes of file `name`, checked against the report's sha256 (ServingError if missing, unlisted or
        changed)."""
        path = self.dir / name
        if self.hashes is not None and name not in self.hashes:
            raise ServingError(f"{path}: {REPORT_FILE} records no sha256 for it; re-export: "
                               f"{_reexport(self.dir, self.report)}")
        try:
            data = path.read_bytes()
        except OSError:
            raise ServingError(f"{path} is missing from the export; re-export: {_reexport(self.dir, self.report)}") \
                from None
        if self.hashes is not None and hashlib.sha256(data).hexdigest() != self.hashes[name]:
            raise ServingError(f"{path} is not the file the export verified (its sha256 differs from the one in "
                               f"{REPORT_FILE}): it was changed or damaged after the export; re-export: "
                               f"{_reexport(self.dir, self.report)}")
        return data

    def json(self, name: str):
        return json.loads(self.read(name))

    def external_data(self, name: str) -> Optional[str]:
        """The external-data file (NAME.data, models over 2 GB) of ONNX file `name`, if it has one: one on disk that
        the report does not list is refused, like any other unlisted file the model would read."""
        data = f"{name}.data"
        on_disk = (self.dir / data).exists()
        if self.hashes is None:  # the exporter's own files, being written
            return data if on_disk else None
        if data in self.hashes:
            return data
        if on_disk:
            raise ServingError(f"{self.dir / data}: {name}'s external data is not listed in {REPORT_FILE}; "
                               f"re-export: {_reexport(self.dir, self.report)}")
        return None

    def session(self, name: str, variant: str):
        """An ONNX Runtime session of file `name` from its checked bytes. A model with external data is opened from
        its path after both files are checked (ONNX Runtime reads the external file itself)."""
        model = self.read(name)
        if self.external_data(name):
            self.read(f"{name}.data")
            return open_session(self.dir / name, variant)
        return open_session(model, variant)


def _scoring(value, model_dir) -> str:
    """A scoring an export records ("softmax" or "sigmoid"); any other is refused (it would be read as softmax)."""
    if value not in ("softmax", "sigmoid"):
        raise ServingError(f"{model_dir}: scoring {value!r} is not one this server knows (softmax, sigmoid); re-export "
                           f"with this version: python -m exporters.onnx RUN_DIR --out {model_dir}")
    return value


def check_labels(labels: Sequence[str]) -> List[str]:
    """A label list given at serve time, stripped, by training's rule (nvflare_lora.head.check_class_names: two or
    more, none empty, none twice)."""
    try:
        return check_class_names(labels, "--labels (a comma-separated list of class names)", strip=True)
    except HeadError as e:
        raise ServingError(str(e)) from None


class TextEncoder:
    """The exported text tower: class names -> unit class embeddings, each the renormalised mean of its prompts'
    unit text embeddings (as nvflare_lora.zeroshot computes them in PyTorch). Tokenizes with `tokenizers`."""

    PROMPTS_PER_CALL = 256

    def __init__(self, files: ExportFiles, text_file: str = "text_model.onnx", variant: str = "fp32"):
        try:  # tokenizers: optional at serve time, needed only to classify against labels named then
            from tokenizers import Tokenizer
        except ImportError:
            raise ServingError("classifying against labels needs the tokenizers package: "
                               "pip install tokenizers") from None

        self.spec = files.json(TEXT_FILE)
        self.rules = TextRules.from_dict(self.spec)
        self.tokenizer = Tokenizer.from_str(files.read(TOKENIZER_FILE).decode("utf-8"))
        self.tokenizer.enable_truncation(self.rules.max_length)
        self.tokenizer.enable_padding(pad_id=int(self.spec["pad_token_id"]), pad_token=self.spec["pad_token"],
                                      length=self.rules.max_length if self.rules.pad_to_max_length else None)
        self.session = files.session(text_file, variant)

    def encode(self, labels: Sequence[str]) -> np.ndarray:
        templates = self.spec["templates"]
        prompts = self.rules.texts(labels, templates)
        chunks = []
        for start in range(0, len(prompts), self.PROMPTS_PER_CALL):  # a long label list in bounded memory
            encodings = self.tokenizer.encode_batch(prompts[start:start + self.PROMPTS_PER_CALL])
            ids = np.array([e.ids for e in encodings], np.int64)
            mask = self.rules.mask(np.array([e.attention_mask for e in encodings], np.int64))
            chunks.append(self.session.run(["text_embeds"], {"input_ids": ids, "attention_mask": mask})[0])
        emb = np.concatenate(chunks).astype(np.float64)
        emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        mean = emb.reshape(len(labels), len(templates), -1).mean(axis=1)
        return (mean / np.linalg.norm(mean, axis=1, keepdims=True)).astype(np.float32)


class ImageClassifier:
    """An exported model ready to serve. variant: "fp32", or one the export also wrote ("optimized", "int8",
    "fp16"). Its files are read once and checked against the export's sha256 (ExportFiles) before the session
    opens; with `trust` (the project's rootCA.pem or a kit) the report must be signed by the project."""

    def __init__(self, model_dir: str | Path, variant: str = "fp32", labels: Optional[Sequence[str]] = None,
                 trust: "Optional[str | Path | TrustRoot]" = None):
        """labels: classify against these class names through the exported text tower instead of the model's
        head (any list, named at run time; see --labels)."""
        model_dir = Path(model_dir)
        files = ExportFiles(model_dir, trust)
        report = files.report
        self.verified = files.verified
        image_variants = sorted(v for v in report["files"] if not v.startswith("text"))
        if variant not in image_variants:
            raise ServingError(f"{model_dir} has no {variant!r} model; it has {image_variants}")
        model_file = report["files"][variant]
        text_file = None
        if labels is not None:
            labels = check_labels(labels)
            if "text" not in report["files"]:
                raise ServingError(f"{model_dir} has no text tower, so it cannot classify against labels named at "
                                   f"serve time; re-export with --with-text: {_reexport(model_dir, report)} --with-text")
            if TOKENIZER_FILE not in files.hashes:
                raise ServingError(f"{model_dir} has no tokenizer (its base {report.get('base_model')!r} came without "
                                   f"one), so labels cannot be encoded; export from a base directory with its tokenizer")
            text_file = report["files"].get(f"text_{variant}", report["files"]["text"])
        self.variant = variant
        self.labels: List[str] = files.json("labels.json")
        self.preprocess = Preprocessing.from_dict(files.json("preprocessing.json"))
        self.session = files.session(model_file, variant)
        # the head's scoring: softmax, or each class's sigmoid (a SigLIP text head, baked in or given --labels)
        self.class_embeddings, self.logit_scale, self.logit_bias = None, None, 0.0
        self.scoring = _scoring(report.get("scoring", "softmax"), model_dir)
        if labels is not None:
            spec = files.json(TEXT_FILE)
            self.logit_scale = float(spec["logit_scale"])
            self.logit_bias, self.scoring = float(spec.get("logit_bias", 0.0)), _scoring(spec.get("scoring", "softmax"),
                                                                                        model_dir)
            if labels == self.labels:  # the job's labels, encoded at export by the fp32 text tower: only the image
                from safetensors.numpy import load  # tower runs, whatever the variant

                self.class_embeddings = load(files.read(CLASS_EMBEDDINGS_FILE))["embeddings"]
            else:  # other names: through the variant's own text tower when the export wrote one, else fp32's
                self.class_embeddings = TextEncoder(files, text_file, variant).encode(labels)
            self.labels = labels

    def probabilities(self, images) -> np.ndarray:
        """Images (PIL or uint8 arrays) -> (n, classes) probabilities: softmax, or each class's sigmoid where the head
        scores as SigLIP does (a SigLIP text head, or --labels on a SigLIP export)."""
        return self._probabilities(np.stack([self.preprocess.array(im) for im in images]))

    def _probabilities(self, pixels: np.ndarray) -> np.ndarray:
        logits, image_embeds = self.session.run(["logits", "image_embeds"], {"pixel_values": pixels})
        if self.class_embeddings is not None:  # the family's own scoring: unit image . unit class embeddings
            logits = self.logit_scale * image_embeds @ self.class_embeddings.T + self.logit_bias
        if self.scoring == "sigmoid":
            return 1.0 / (1.0 + np.exp(-logits))
        logits = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def top(self, images, k: int = 3) -> List[List[Tuple[str, float]]]:
        return self._top(self.probabilities(images), k)

    def _top(self, probs: np.ndarray, k: int) -> List[List[Tuple[str, float]]]:
        return [[(self.labels[i], float(p[i])) for i in np.argsort(-p)[:k]] for p in probs]

    def classify_files(self, paths: Sequence[str | Path], k: int = 3, batch: int = 32,
                       bad: Optional[dict] = None) -> Iterator[Tuple[str, List[Tuple[str, float]]]]:
        """(path, top k) of every file that decodes, in batches of `batch`; a file that does not is left out and
        recorded in `bad` ({path: reason}) when given."""
        if batch < 1:
            raise ServingError(f"--batch must be >= 1, got {batch}")
        for start in range(0, len(paths), batch):
            names, pixels = [], []
            for path in paths[start:start + batch]:
                try:
                    pixels.append(self.preprocess.array(open_image(path)))  # training's decoding and transform
                    names.append(str(path))
                except Exception as e:  # noqa: BLE001 (PIL raises many kinds: a file that does not decode is skipped)
                    if bad is not None:
                        bad[str(path)] = f"{type(e).__name__}: {e}"
            if names:
                yield from zip(names, self._top(self._probabilities(np.stack(pixels)), k))


def expand_inputs(inputs: Sequence[str]) -> List[Path]:
    """Files as given, folders as the images below them, glob patterns as their matches (recursive "**"), in
    order, each file once. A path that does not exist, a pattern or folder with no image: ServingError."""
    out, seen = [], set()
    for given in inputs:
        path = Path(given).expanduser()
        if path.is_dir():
            found = image_files(path)
            if not found:
                raise ServingError(f"folder {path} holds no image files (any depth; .png, .jpg, ...)")
        elif path.exists():
            found = [path]
        elif glob.has_magic(given):
            found = [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).is_file()]
            if not found:
                raise ServingError(f"pattern {given!r} matches no file")
        else:
            raise ServingError(f"cannot read image {given}: no such file or folder")
        for f in found:
            if f not in seen:
                seen.add(f)
                out.append(f)
    return out


def _output_target(out: Optional[str]) -> Optional[Path]:
    if out is None:
        return None
    path = Path(out).expanduser()
    if path.suffix.lower() not in OUTPUT_FORMATS:
        raise ServingError(f"--out {out}: name a .csv or a .jsonl file")
    if not path.parent.is_dir():
        raise ServingError(f"--out {out}: folder {path.parent} does not exist; create it first")
    if path.is_dir():
        raise ServingError(f"--out {out} is a folder; name a .csv or a .jsonl file")
    return path


def _rows_text(rows, fmt: str, k: int) -> str:
    buf = io.StringIO()
    if fmt == ".csv":
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["path"] + [f"{c}_{i}" for i in range(1, k + 1) for c in ("label", "probability")])
        for path, best in rows:
            writer.writerow([path] + [x for label, p in best for x in (label, f"{p:.6f}")])
    else:
        for path, best in rows:
            buf.write(json.dumps({"path": path, "top": [{"label": label, "probability": round(p, 6)}
                                                         for label, p in best]}) + "\n")
    return buf.getvalue()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m exporters.onnx.predict", description=__doc__.splitlines()[0])
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("inputs", metavar="INPUT", nargs="+", help="image files, folders (recursive) or glob patterns")
    p.add_argument("--top", type=int, default=3, help="labels per image (default 3)")
    p.add_argument("--variant", default="fp32", help="fp32 (default), optimized, int8 or fp16, if exported")
    p.add_argument("--batch", type=int, default=32, help="images per ONNX Runtime call (default 32)")
    p.add_argument("--out", help="write the rows to FILE.csv or FILE.jsonl instead of stdout")
    p.add_argument("--labels", help="comma-separated class names to classify against through the exported text "
                                    "tower (any names; an export made with --with-text)")
    p.add_argument("--trust", metavar="ROOT", help="serve only an export signed by a participant of this project "
                                                   "(its rootCA.pem, or any startup kit of it): --sign at export")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    started = time.perf_counter()
    try:
        if args.batch < 1:
            raise ServingError(f"--batch must be >= 1, got {args.batch}")
        if args.top < 1:
            raise ServingError(f"--top must be >= 1, got {args.top}")
        out = _output_target(args.out)
        labels = None if args.labels is None else args.labels.split(",")
        classifier = ImageClassifier(args.model_dir, args.variant, labels, trust=args.trust)
        paths = expand_inputs(args.inputs)
    except ServingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.top = min(args.top, len(classifier.labels))
    bad, rows, done, last_note = {}, [], 0, time.perf_counter()
    for row in classifier.classify_files(paths, args.top, args.batch, bad):
        if out is None:
            print(f"{row[0]}: " + "  ".join(f"{label} {prob:.3f}" for label, prob in row[1]))
        else:
            rows.append(row)
        done += 1
        if time.perf_counter() - last_note > 5:  # a long run says how far it is
            rate = done / (time.perf_counter() - started)
            print(f"  {done + len(bad)}/{len(paths)} files ({len(bad)} unreadable), {rate:.1f} images/s",
                  file=sys.stderr)
            last_note = time.perf_counter()
    classified = len(paths) - len(bad)
    if classified == 0:
        print(f"error: none of the {len(paths)} files could be read as an image: "
              + "; ".join(f"{k} ({v})" for k, v in list(bad.items())[:3]), file=sys.stderr)
        return 2
    if out is not None:
        atomic_write(out, _rows_text(rows, out.suffix.lower(), args.top)).chmod(0o666 & ~current_umask())
    seconds = time.perf_counter() - started
    skipped = (f"; skipped {len(bad)} unreadable: " + ", ".join(list(bad)[:3]) + (" ..." if len(bad) > 3 else "")
               if bad else "")
    print(f"classified {classified} image{'s' * (classified != 1)} in {seconds:.1f} s "
          f"({classified / seconds:.1f} images/s, batch "
          f"{args.batch}, {args.variant})" + (f", written to {out}" if out else "") + skipped, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
