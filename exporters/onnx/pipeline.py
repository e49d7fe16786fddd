"""export_run: checkpoint -> merged fp32 model -> ONNX (+ variants) -> verified -> output directory.

Each file is verified on its own: one that fails its gate is not written, and the report and the error
say which and by how much, while the rest are written (the fp32 model always, when it verifies; when it
does not, nothing is). The files are built in a hidden sibling directory and swapped in at the end, so
the output directory holds either the earlier export or the new one, never half of one.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import onnxruntime
import torch
from safetensors.numpy import save_file

from nvflare_lora.checkpoint import trust_for
from nvflare_lora.data import load_dataset
from nvflare_lora.files import current_umask, sha256_file, swap_into_place, write_json_atomic
from nvflare_lora.head import DEFAULT_TEMPLATES, Head, HeadError
from nvflare_lora.models import load_tokenizer, use_eager_attention
from nvflare_lora.signing import SignatureError, Signer

from . import graph, variants, verify
from .errors import ExportError, VerificationError
from .locate import locate_checkpoint
from .predict import (CLASS_EMBEDDINGS_FILE, REPORT_FILE, REPORT_SIGNATURE_FILE, TEXT_FILE, TOKENIZER_FILE, ExportFiles,
                      TextEncoder)
from .rebuild import Rebuilt, check_wise, rebuild
from .run_data import run_validation_set
from .session import SESSION_OPTIONS_RULE, open_session, session_config
from .triton import check_repository_target, write_repository

LABELS_FILE, PREPROCESSING_FILE = "labels.json", "preprocessing.json"
FILES = {"fp32": "model.onnx", "optimized": "model.optimized.onnx", "int8": "model.int8.onnx",
         "fp16": "model.fp16.onnx", "text": "text_model.onnx", "text_int8": "text_model.int8.onnx",
         "text_fp16": "text_model.fp16.onnx"}
# a label list no site holds: the text tower is verified on it too (serving takes any labels)
UNSEEN_LABELS = ("cat", "dog", "airplane", "truck", "flower", "house")


def verification_images(source: str, run_dir: Path, rebuilt: Rebuilt, samples: int, seed: int = 0):
    """(pixel arrays, labels or None, description): `samples` images through the model's preprocessing.
    source "auto": the run's validation images when they can be rebuilt, else the bundled digits.
    Labels are kept only when the data's classes are the model's labels, to report accuracy."""
    data, what = None, ""
    if source == "auto":
        data, why = run_validation_set(rebuilt.metadata, rebuilt.preprocessing, rebuilt.labels)
        what = why if data is not None else f"digits ({why}, so the run's validation images are not known)"
        source = "digits" if data is None else source
    if data is None:
        try:
            data = load_dataset(source, rebuilt.preprocessing)
        except (OSError, ValueError) as e:
            raise ExportError(f"cannot read verification data {source!r}: {e}") from e
        what = what or source
    idx = np.sort(np.random.default_rng(seed).permutation(len(data))[:samples])
    x, y = data.batch(idx)
    same_classes = list(data.classes) == list(rebuilt.labels)
    return np.ascontiguousarray(x.numpy()), (y.numpy() if same_classes else None), what


def _check_output_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / REPORT_FILE).is_file())):
        raise ExportError(f"output {out} exists and is not an earlier export (no {REPORT_FILE}); "
                          f"choose another --out or remove it")


def _readable_by_all(directory: Path) -> None:
    """mkdtemp/mkstemp create owner-only files; a served model is read by the service's user, so apply the umask."""
    umask = current_umask()
    directory.chmod(0o777 & ~umask)
    for f in directory.iterdir():
        f.chmod(0o666 & ~umask)


def _swap_into_place(tmp: Path, out: Path) -> None:
    _readable_by_all(tmp)
    swap_into_place(tmp, out)


def _text_parity(rebuilt: Rebuilt, path: Path) -> Dict:
    """Text tower: ORT vs the unmerged model's text tower on token ids of two lengths (dynamic axes)."""
    reference = graph.TextOutputs(rebuilt.unmerged).eval()
    session = open_session(path)
    text_config = rebuilt.merged.clip_config.text_config
    diffs = []
    for batch, length in ((1, 4), (4, text_config.max_position_embeddings)):
        ids, mask = graph.example_text(rebuilt.merged, batch, length)
        end = length - length // 4  # the first row is shorter: right-padded as CLIP's tokenizer pads
        eos, pad = graph.special_ids(text_config)
        ids[0, end - 1], ids[0, end:], mask[0, end:] = eos, pad, 0
        with torch.no_grad():
            ref = reference(ids, mask).numpy()
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        diffs.append(float(np.abs(ref - got).max()))
    diff = max(diffs)
    return {"file": FILES["text"], "max_abs_embeds_diff": diff, "max_abs_allowed": verify.FP32_MAX_ABS_DIFF,
            "passed": diff <= verify.FP32_MAX_ABS_DIFF, "provider": session.get_providers()[0],
            "inputs": graph.TEXT_INPUTS, "outputs": graph.TEXT_OUTPUTS,
            "max_length": text_config.max_position_embeddings, "eos_token_id": graph.special_ids(text_config)[0],
            "logit_scale": float(rebuilt.merged.logit_scale.exp()), "logit_bias": float(rebuilt.merged.score_bias()),
            "scoring": rebuilt.merged.family.scoring,
            "tokenizer": "the base model's own tokenizer (AutoTokenizer.from_pretrained(BASE))"}


def _export_text(tmp: Path, rebuilt: Rebuilt, image_embeds, reference, int8: bool, fp16: bool, opset: int,
                 made: list, failed: Dict, log) -> Dict:
    """The text tower as its own verified file(s), and what serving needs to classify against labels named at run
    time: tokenizer.json (read by `tokenizers`), text.json (templates, length, padding, logit scale) and the job's
    class embeddings. Verified twice: text_embeds on token ids of two lengths (dynamic axes), and CLIP's
    classification of the verification images, through predict.TextEncoder (tokenizers + ONNX Runtime) against
    PyTorch (transformers' tokenizer + the unmerged text tower), for the job's labels and for UNSEEN_LABELS: fp32
    to 1e-4 with every top-1 equal; int8 and fp16 text towers (with --quantize int8 / --fp16) by top-1 agreement.
    image_embeds: model.onnx's unit image embeddings of the verification images (from its own verification)."""
    graph.export_text_model(rebuilt.merged, tmp / FILES["text"], opset)
    text = _text_parity(rebuilt, tmp / FILES["text"])
    log(f"  text      {FILES['text']:22s} max|dembeds| {text['max_abs_embeds_diff']:.2e}"
        + ("" if text["passed"] else "  NOT WRITTEN"))
    if not text["passed"]:
        failed["text"] = [f"max |text_embeds difference| {text['max_abs_embeds_diff']:.3g} exceeds "
                          f"{verify.FP32_MAX_ABS_DIFF:g} by {text['max_abs_embeds_diff'] - verify.FP32_MAX_ABS_DIFF:.3g}"]
        (tmp / FILES["text"]).unlink()
        return text
    made.append("text")
    try:
        tokenizer = load_tokenizer(rebuilt.base_model)
    except HeadError as e:
        text["serving"] = f"no labels at serve time: {e}"
        log(f"  note: the text tower is exported without a tokenizer, so predict --labels cannot use it ({e})")
        return text
    templates = list(Head.from_dict(rebuilt.metadata.get("head")).templates or DEFAULT_TEMPLATES)
    with tempfile.TemporaryDirectory() as saved:
        tokenizer.save_pretrained(saved)  # a fast tokenizer writes tokenizer.json, which `tokenizers` reads
        shutil.copyfile(Path(saved) / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
    scale, bias, rules = text["logit_scale"], text["logit_bias"], rebuilt.merged.text_rules
    write_json_atomic(tmp / TEXT_FILE, {"templates": templates, **rules.to_dict(),
                                        "pad_token_id": tokenizer.pad_token_id, "pad_token": tokenizer.pad_token,
                                        "logit_scale": scale, "logit_bias": bias, "scoring": text["scoring"]})
    lists = {"job_labels": list(rebuilt.labels), "unseen_labels": list(UNSEEN_LABELS)}
    with torch.no_grad():
        ref = {k: scale * reference[1] @ rebuilt.unmerged.embed_labels(tokenizer, v, templates).numpy().T + bias
               for k, v in lists.items()}
    prompts = rules.texts(lists["job_labels"], templates)
    ours = TextEncoder(ExportFiles.unchecked(tmp), FILES["text"]).tokenizer.encode_batch(prompts)
    theirs = tokenizer(prompts, **rules.tokenizer_kwargs())["input_ids"]
    text.update(templates=templates, logit_scale=scale, tokenizer=f"{TOKENIZER_FILE} (the tokenizers package)",
                tokens_equal=[e.ids for e in ours] == [list(t) for t in theirs], unseen_labels=lists["unseen_labels"],
                prompts={})
    for variant in ("text", "text_int8", "text_fp16"):
        path = tmp / FILES[variant]
        try:
            if variant == "text_int8" and int8:
                variants.quantize_int8(tmp / FILES["text"], path)
            elif variant == "text_fp16" and fp16:
                variants.to_fp16(tmp / FILES["text"], path)
            elif variant != "text":
                continue
        except ExportError as e:
            failed[variant] = [f"could not be built: {e}"]
            log(f"  {variant:9s} {FILES[variant]:22s} NOT WRITTEN: {failed[variant][0]}")
            continue
        gate = {"text": "fp32", "text_int8": "int8", "text_fp16": "fp16"}[variant]  # also the session's variant
        encoder = TextEncoder(ExportFiles.unchecked(tmp), FILES[variant], gate)
        embeddings = {k: encoder.encode(v) for k, v in lists.items()}
        parities = {k: verify.compare(gate, [ref[k]], [scale * image_embeds @ embeddings[k].T + bias], "CPU")
                    for k in lists}
        if variant == "text":
            save_file({"embeddings": embeddings["job_labels"]}, str(tmp / CLASS_EMBEDDINGS_FILE))
        problems = [f"{k}: {f}" for k, par in parities.items() for f in par.failures]
        if variant == "text" and not text["tokens_equal"]:
            problems.insert(0, "the tokenizers package gives other token ids than the base's tokenizer")
        text["prompts"][variant] = {k: par.to_dict() for k, par in parities.items()}
        log(f"  {variant:9s} {FILES[variant]:22s} labels as text: top-1 "
            + ", ".join(f"{k.replace('_', ' ')} {100 * par.top1_agreement:.2f}% (max|dlogit| "
                        f"{par.max_abs_logit_diff:.2e})" for k, par in parities.items())
            + ("  NOT WRITTEN: " + "; ".join(problems) if problems else ""))
        if not problems:
            if variant != "text":
                made.append(variant)
            continue
        failed[variant] = problems
        if variant == "text":  # without a verified fp32 text tower nothing of the text side is served
            made.remove("text")
            for f in (FILES["text"], TOKENIZER_FILE, TEXT_FILE, CLASS_EMBEDDINGS_FILE):
                (tmp / f).unlink(missing_ok=True)
            return text
        path.unlink()
    return text


def export_run(run_dir, out=None, checkpoint: Optional[str] = None, model: Optional[str] = None,
               optimize: bool = False, quantize: Optional[str] = None, fp16: bool = False,
               opset: int = graph.DEFAULT_OPSET, with_text: bool = False, data: str = "auto",
               samples: int = 256, triton: Optional[str] = None, triton_tensorrt: bool = False, force: bool = False,
               wise: Optional[float] = None, he_context: Optional[str] = None, trust: Optional[str] = None,
               allow_unverified: bool = False, sign: Optional[str] = None,
               log: Callable[[str], None] = print) -> Dict:
    """Export the run's global adapter merged into its base; returns the report written to OUT/export_report.json.
    triton: also write a Triton model repository of the verified files there (exporters/onnx/triton.py); an
    existing non-empty folder is refused unless force. Raises ExportError (bad input) or VerificationError (a
    requested file does not compute what PEFT computes: raised after the files that did verify are written,
    with their Triton models, or with nothing written when fp32 failed). wise: WiSE-FT's ALPHA
    (exporters/onnx/rebuild.py): the LoRA update scaled by ALPHA, the head interpolated toward its zero-shot start;
    see export_wise for several. he_context: the site key (client_context.tenseal) an encrypted checkpoint is
    decrypted with (an encrypted job: nvflare_lora.secure). trust: the project's rootCA.pem or a kit of it, which
    the checkpoint's signature is checked against (default: the startup kit that holds the checkpoint, if any);
    allow_unverified: accept a checkpoint without a manifest or signature. sign: a startup kit whose key signs
    export_report.json (REPORT_SIGNATURE_FILE), which `predict --trust` checks."""
    if quantize not in (None, "int8"):
        raise ExportError(f"--quantize supports 'int8' only, got {quantize!r}")
    if samples < 1:
        raise ExportError(f"--verify-samples must be >= 1, got {samples}")
    wise = None if wise is None else check_wise(wise)
    if triton_tensorrt and triton is None:
        raise ExportError("--triton-tensorrt configures the Triton repository: give --triton DIR too")
    started = time.perf_counter()
    located = locate_checkpoint(run_dir, checkpoint)
    if located.note:
        log(f"note: {located.note}")
    out = Path(out).expanduser() if out else Path(run_dir).expanduser() / "onnx"
    _check_output_dir(out)
    if triton is not None:
        repo = Path(triton).expanduser().resolve()
        if repo == out.resolve() or out.resolve() in repo.parents or repo in out.resolve().parents:
            raise ExportError(f"--triton {triton} and the export's folder {out} overlap; give the Triton repository a "
                              f"folder of its own (e.g. beside it)")
        check_repository_target(repo, force)
    log(f"checkpoint: {located.path}")
    try:
        root = trust_for(located.path, trust)
        signer = Signer.from_kit(sign) if sign is not None else None
    except SignatureError as e:
        raise ExportError(str(e)) from None
    if root is not None:
        log(f"trust root: {root.path}" + ("" if trust else " (the startup kit that holds the checkpoint)"))

    rebuilt = rebuild(located.path, model, include_text=with_text, wise=wise, he_context=he_context, trust=root,
                      allow_unverified=allow_unverified)
    log(f"checkpoint verified: {rebuilt.verified}")
    for note in rebuilt.notes:
        log(f"note: {note}")
    log(f"base: {rebuilt.base_model} (fingerprint {'matches' if rebuilt.fingerprint_checked else 'not recorded'})")
    pixels, labels, data_used = verification_images(data, Path(run_dir).expanduser(), rebuilt, samples)
    log(f"verifying on {len(pixels)} images: {data_used}")
    reference = verify.torch_outputs(graph.ImageOutputs(rebuilt.unmerged).eval(), pixels)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        report = _export_into(tmp, rebuilt, pixels, labels, reference, optimize, quantize == "int8", fp16,
                              opset, with_text, log)
        report.update(source_checkpoint=str(located.path), checkpoint=located.name, wise_alpha=wise,
                      source_verified=rebuilt.verified, signed_by=signer.name if signer else None,
                      notes=([located.note] if located.note else []) + report["notes"],
                      seconds=round(time.perf_counter() - started, 2))
        report["verification"]["data"] = data_used
        report["sha256"] = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        write_json_atomic(tmp / REPORT_FILE, report)
        if signer is not None:  # the report's bytes as written: every file's sha256, so every file
            write_json_atomic(tmp / REPORT_SIGNATURE_FILE, signer.sign((tmp / REPORT_FILE).read_bytes()))
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if triton is not None:
        repo = write_repository(out, Path(triton).expanduser(), tensorrt=triton_tensorrt, force=force)
        log(f"Triton model repository: {repo} ({', '.join(sorted(p.name for p in repo.iterdir() if p.is_dir()))})")
    written = ", ".join(FILES[v] for v in report["files"])
    if report["failed"]:
        raise VerificationError(f"wrote {out} with the files that verified ({written}); not written: "
                                + " | ".join(f"{v}: " + "; ".join(f) for v, f in report["failed"].items()))
    log(f"exported and verified: {out}")
    return report


def export_wise(run_dir, alphas, out=None, log: Callable[[str], None] = print, **kwargs) -> Dict[float, Dict]:
    """One verified export per WiSE-FT ALPHA into OUT/wise_<ALPHA> (OUT defaults to RUN_DIR/onnx); every ALPHA is
    checked before the first export. Returns {alpha: report}. A VerificationError of one ALPHA is raised after
    the others are written."""
    alphas = [check_wise(a) for a in alphas]
    if len({f"{a:g}" for a in alphas}) != len(alphas):  # the folder names must differ, not only the numbers
        raise ExportError(f"--wise lists an ALPHA twice: {alphas}")
    if kwargs.get("triton") is not None:
        raise ExportError("--triton takes one model: give one --wise ALPHA with it, or export the chosen ALPHA again")
    out = Path(out).expanduser() if out else Path(run_dir).expanduser() / "onnx"
    for a in alphas:
        _check_output_dir(out / f"wise_{a:g}")
    reports, failed = {}, []
    for a in alphas:
        log(f"WiSE-FT alpha {a:g} -> {out / f'wise_{a:g}'}")
        try:
            reports[a] = export_run(run_dir, out=out / f"wise_{a:g}", wise=a, log=log, **kwargs)
        except VerificationError as e:
            failed.append(f"alpha {a:g}: {e}")
    if failed:
        raise VerificationError(" | ".join(failed))
    return reports


def _export_into(tmp: Path, rebuilt: Rebuilt, pixels, labels, reference, optimize, int8, fp16, opset,
                 with_text, log) -> Dict:
    """Write each requested file into tmp and verify it on its own; a variant that fails is deleted and listed
    under report["failed"]. Raises VerificationError only when the fp32 model itself fails: then nothing is kept."""
    merged = rebuilt.merged
    use_eager_attention(merged)
    graph.export_image_model(merged, tmp / FILES["fp32"], opset)
    parities, latency, failed, outputs = [], {}, {}, {}

    def verified(variant: str, build: Optional[Callable[[Path], None]] = None) -> bool:
        path = tmp / FILES[variant]
        try:
            if build is not None:
                build(path)
        except ExportError as e:
            failed[variant] = [f"could not be built: {e}"]
            log(f"  {variant:9s} {FILES[variant]:22s} NOT WRITTEN: {failed[variant][0]}")
            return False
        parity, latency[variant], outputs[variant] = _verify_image_model(path, variant, reference, pixels, labels,
                                                                          log)
        parities.append(parity)
        if parity.failures:
            failed[variant] = parity.failures
            path.unlink()
        return not parity.failures

    if not verified("fp32"):
        raise VerificationError("verification against the unmerged PEFT model failed, nothing written: fp32: "
                                + "; ".join(failed["fp32"]))
    made, fused, source = ["fp32"], None, tmp / FILES["fp32"]
    if optimize:
        vc = merged.clip_config.vision_config

        def build_optimized(path):
            nonlocal fused
            fused = variants.optimize(source, path, vc.num_attention_heads, vc.hidden_size)
            log(f"optimized: fused {fused or 'nothing'}")

        if verified("optimized", build_optimized):
            made.append("optimized")
            source = tmp / FILES["optimized"]  # int8 and fp16 start from the fused graph when it verified
    if int8 and verified("int8", lambda path: variants.quantize_int8(source, path)):
        made.append("int8")
    if fp16 and verified("fp16", lambda path: variants.to_fp16(source, path)):
        made.append("fp16")
    text = None
    if with_text:
        text = _export_text(tmp, rebuilt, outputs["fp32"][1], reference, int8, fp16, opset, made, failed, log)
    write_json_atomic(tmp / LABELS_FILE, list(rebuilt.labels))
    write_json_atomic(tmp / PREPROCESSING_FILE, rebuilt.preprocessing.to_dict())
    notes = list(rebuilt.notes)
    if "fp16" in made and parities[-1].provider == "CPUExecutionProvider":
        notes.append("fp16 was verified on the CPU (no CUDAExecutionProvider here); GPU kernels round differently, "
                     "so re-run the export where it will be served to verify it there")
    report = _report(rebuilt, made, fused, parities, latency, text, labels, reference, opset, notes)
    report["failed"] = failed
    if "int8" in report["verification"]["variants"]:
        report["verification"]["variants"]["int8"]["scheme"] = variants.INT8_SCHEME
        report["verification"]["variants"]["int8"]["session_config"] = session_config()
    return report


def _verify_image_model(path: Path, variant: str, reference, pixels, labels, log):
    """(parity, latency, the file's outputs on pixels)."""
    session = open_session(path, variant)
    outputs = verify.ort_outputs(session, pixels)
    parity = verify.compare(variant, reference, outputs, session.get_providers()[0], labels)
    if variant == "int8":
        parity.cpu = verify.cpu_features()
    run = lambda x, s=session: s.run(None, {"pixel_values": x})  # noqa: E731
    latency = {f"batch_{b}": verify.latency_ms(run, pixels[:b]) for b in (1, 8) if len(pixels) >= b}
    ties = parity.near_tie_flips
    log(f"  {variant:9s} {FILES[variant]:22s} max|dlogit| {parity.max_abs_logit_diff:.2e}  top-1 "
        f"{100 * parity.top1_agreement:6.2f}%" + (f" (+{ties} near-tie{'s' * (ties > 1)})" if ties else "")
        + f"  {parity.provider}  "
        + "  ".join(f"{k.replace('_', ' ')}: {v:.1f} ms" for k, v in latency.items())
        + ("" if not parity.failures else "  NOT WRITTEN: " + "; ".join(parity.failures)))
    return parity, latency, outputs


def _report(rebuilt: Rebuilt, files, fused, parities, latency, text, labels, reference, opset, notes) -> Dict:
    meta, config = rebuilt.metadata, rebuilt.merged.clip_config
    size = config.vision_config.image_size
    return {
        "format": "nvflare_lora.onnx/1",
        "files": {v: FILES[v] for v in files},
        "base_model": rebuilt.base_model, "base_fingerprint": rebuilt.fingerprint,
        "base_fingerprint_checked": rebuilt.fingerprint_checked,
        "round": meta.get("round"), "metrics": meta.get("metrics"), "lora_config": meta.get("lora_config"),
        "labels": list(rebuilt.labels), "preprocessing": rebuilt.preprocessing.to_dict(),
        "inputs": {"pixel_values": ["batch", 3, size, size]},
        "outputs": {"logits": ["batch", len(rebuilt.labels)],
                    "image_embeds": ["batch", rebuilt.merged.family.embed_dim(config)]},
        "family": rebuilt.merged.family.name,
        # how model.onnx's logits become probabilities: a text head (baked in) scores as its family does
        "scoring": rebuilt.merged.family.scoring if Head.from_dict(meta.get("head")).text else "softmax",
        "opset": opset, "exporter": f"torch.onnx dynamo (torch {torch.__version__})",
        "onnxruntime": onnxruntime.__version__, "provider": parities[0].provider,
        "optimizer_fusions": fused,
        "verification": {
            "reference": "unmerged PEFT model, PyTorch fp32 on CPU",
            "reference_accuracy": None if labels is None else float((reference[0].argmax(1) == labels).mean()),
            "variants": {p.variant: p.to_dict() for p in parities}, "text": text},
        "latency_ms": latency, "notes": notes,
        # what a runtime must set to compute what was verified (exporters/onnx/session.py); the Triton README too
        "session_options": SESSION_OPTIONS_RULE,
    }
