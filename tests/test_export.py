"""The ONNX exporter (python -m exporters.onnx) and its serving entry point, on real PEFT models and real
ONNX Runtime sessions. The run directory is laid out as the simulator writes it; the adapters in it are
saved with the core library's checkpoint writer, their metadata built as the server builds it
(managers.model_metadata: a CheckpointMeta)."""

import contextlib
import io
import json
import os
import platform
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from exporters.onnx import VerificationError
from exporters.onnx.__main__ import main as export_main
from exporters.onnx.predict import ImageClassifier
from exporters.onnx.predict import main as predict_main
from exporters.onnx.session import open_session, session_config
from exporters.onnx.verify import compare
from nvflare_lora.checkpoint import save_adapter_dir
from nvflare_lora.data import load_digits_dataset, split_record
from nvflare_lora.files import sha256_file
from nvflare_lora.managers import model_metadata
from nvflare_lora.models import build_classifier, save_preset
from nvflare_lora import FederatedCLIPModel, quick_clip_lora
from nvflare_lora.preprocessing import Preprocessing
from nvflare_lora.testing import ort_logits
from support.checkpoints import rewrite_meta
from nvflare_lora.training import train_local

REPO = Path(__file__).resolve().parents[1]
ADAPTER_DIR = Path("server/simulate_job/app_server/adapter")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def _save(wrapper, directory, **extra):
    """extra: CheckpointMeta fields (round, metrics, val_split, ...), as the persistor adds them."""
    fed = wrapper.model
    save_adapter_dir(directory, fed.get_parameters(), wrapper.peft_model.peft_config["default"],
                     model_metadata(fed, extra))


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset(Preprocessing(size=32, crop_size=32))


@pytest.fixture(scope="module")
def trained(digits):
    """A briefly trained adapter (r=4)."""
    wrapper = quick_clip_lora("tiny-clip", 10, 4)
    torch.manual_seed(0)  # LoRA dropout draws from the global generator: the same model whatever ran before
    train_local(wrapper.model, digits, epochs=1, max_steps=25, batch_size=32, lr=1e-2, seed=0)
    return wrapper


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, trained):
    """A simulator-like workspace: best/ holds a briefly trained adapter, latest/ the untrained initial one.
    Their metadata records no site's data split (val_split)."""
    ws = tmp_path_factory.mktemp("run") / "ws"
    _save(trained, ws / ADAPTER_DIR / "best", round=2, metrics={"val_accuracy": 0.5})
    _save(quick_clip_lora("tiny-clip", 10, 4), ws / ADAPTER_DIR / "latest", round=0)
    return ws


@pytest.fixture(scope="module")
def exported(run_dir):
    """The command a user runs, through its main in this process (README.md's export runs the command line in a
    process of its own, tests/test_readme.py): optimized graph and text tower too."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = export_main([str(run_dir), "--optimize", "--quantize", "int8", "--with-text", "--verify-samples", "96",
                            "--triton", str(run_dir / "triton")])
    assert code == 0, out.getvalue() + err.getvalue()
    return run_dir / "onnx", out.getvalue()


def _session(path):
    return open_session(path, "int8")  # the CPU provider, with the entries this CPU needs for int8 files


# ---- export and verification -------------------------------------------------------------------
def test_export_writes_a_verified_serving_directory(exported, run_dir):
    out, stdout = exported
    assert {p.name for p in out.iterdir()} == {"model.onnx", "model.optimized.onnx", "model.int8.onnx", "text_model.onnx",
                                               "labels.json", "preprocessing.json", "export_report.json"}
    report = json.loads((out / "export_report.json").read_text())
    assert report["sha256"] == {p.name: sha256_file(p) for p in out.iterdir() if p.name != "export_report.json"}
    int8 = report["verification"]["variants"]["int8"]
    assert int8["scheme"] == "s8" and int8["session_config"] == session_config()
    assert report["session_options"]["session.x64quantprecision"]["value"] == "1"
    assert report["source_checkpoint"] == str((run_dir / ADAPTER_DIR / "best").resolve())
    assert report["checkpoint"] == "best" and report["round"] == 2
    assert report["base_model"] == "tiny-clip" and report["base_fingerprint_checked"]
    assert report["opset"] == 18 and report["provider"] == "CPUExecutionProvider"
    for variant in ("fp32", "optimized"):
        v = report["verification"]["variants"][variant]
        assert v["passed"] and v["samples"] == 96 and v["max_abs_logit_diff"] <= 1e-4 and v["top1_agreement"] == 1.0
    assert report["verification"]["text"]["passed"]
    assert report["optimizer_fusions"].get("Attention", 0) == 2, "both attention blocks should be fused"
    assert set(report["latency_ms"]["fp32"]) == {"batch_1", "batch_8"}
    assert json.loads((out / "labels.json").read_text()) == [str(i) for i in range(10)]
    pp = json.loads((out / "preprocessing.json").read_text())
    assert (pp["size"], pp["crop_size"]) == (32, 32) and len(pp["mean"]) == len(pp["std"]) == 3
    assert "exported and verified" in stdout and "checkpoint:" in stdout


def test_without_the_sites_split_in_the_checkpoint_it_verifies_on_the_digits_and_says_so(exported, run_dir):
    from exporters.onnx.run_data import run_validation_set

    out, stdout = exported
    data = json.loads((out / "export_report.json").read_text())["verification"]["data"]
    assert data.startswith("digits (") and "records no site's data split" in data, data
    assert f"verifying on 96 images: {data}" in stdout
    # a split recorded, but of a site's folder that is not on this machine: the digits again, saying why
    meta = {"val_split": {"site-1": split_record("site-1", str(run_dir / "elsewhere"), False, 1, "iid", 0.5, 0, 0.2)}}
    dataset, why = run_validation_set(meta, Preprocessing(size=32, crop_size=32), [str(i) for i in range(10)])
    assert dataset is None and why.startswith("site-1's data ") and "cannot be read here" in why, why


def test_the_export_verifies_on_the_sites_own_validation_images_recorded_in_the_checkpoint(trained, tmp_path, capsys):
    """The server records each site's split (val_split, sent with its updates) in the checkpoint's metadata;
    the exporter verifies on exactly those sites' validation images: all of them when asked for more."""
    from nvflare_lora.facts import JobFacts
    from nvflare_lora.settings import settings
    from nvflare_lora.site import Site

    job = settings()  # jobs/clip_lora's split: the digits across 4 sites, Dirichlet label skew
    sites = [Site(name, JobFacts.from_settings(job), job) for name in ("site-2", "site-4")]
    run = tmp_path / "ws"
    _save(trained, run / ADAPTER_DIR / "best", round=7, val_split={s.name: s.split for s in sites})
    out = tmp_path / "onnx"
    assert export_main([str(run), "--out", str(out), "--verify-samples", "100000"]) == 0, capsys.readouterr().err
    report = json.loads((out / "export_report.json").read_text())
    data = report["verification"]["data"]
    assert data.startswith("the sites' validation images (2 sites: digits") and "dirichlet" in data, data
    count = sum(len(s.val_set) for s in sites)
    assert report["verification"]["variants"]["fp32"]["samples"] == count
    assert f"verifying on {count} images: {data}" in capsys.readouterr().out
    # the very images: the reference model scores on them what the model scores on the sites' own splits
    scores = [trained.model.evaluate(s.val_set) for s in sites]
    correct = sum(round(e["accuracy"] * e["count"]) for e in scores)
    assert round(report["verification"]["reference_accuracy"] * count) == correct, (scores, report["verification"])


def test_exported_model_is_the_trained_adapter_not_the_untrained_head(exported, run_dir, digits):
    """Independent of the exporter's code: plain PEFT loads the checkpoint, and ORT must give its outputs."""
    from peft import PeftModel

    out, _ = exported
    x, _ = digits.batch(range(7))  # batch 7: the batch axis is dynamic
    base, _ = build_classifier("tiny-clip", 10)
    peft_model = PeftModel.from_pretrained(base, str(run_dir / ADAPTER_DIR / "best")).eval()
    with torch.no_grad():
        trained_logits = peft_model(x).numpy()
        untrained_logits = quick_clip_lora("tiny-clip", 10, 4).model(x).numpy()
    logits, embeds = _session(out / "model.onnx").run(None, {"pixel_values": x.numpy()})
    assert logits.shape == (7, 10) and embeds.shape == (7, 32)
    assert np.abs(logits - trained_logits).max() < 1e-4
    assert np.abs(logits - untrained_logits).max() > 1e-2, "the export carries the untrained head"
    one = _session(out / "model.onnx").run(["logits"], {"pixel_values": x[:1].numpy()})[0]
    assert np.abs(one - trained_logits[:1]).max() < 1e-4


def test_text_tower_gives_the_base_text_embeddings(exported):
    out, _ = exported
    base, _ = build_classifier("tiny-clip", 10, include_text=True)
    session = _session(out / "text_model.onnx")
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    for batch, length in ((3, 5), (2, 16)):
        ids = torch.randint(0, 990, (batch, length), generator=torch.Generator().manual_seed(length))
        ids[:, -1] = 999  # the preset's end-of-text token
        mask = torch.ones_like(ids)
        with torch.no_grad():
            expected = base.text_projection(base.text_model(input_ids=ids, attention_mask=mask).pooler_output).numpy()
        got = session.run(["text_embeds"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        assert np.abs(got - expected).max() < 1e-4


def test_int8_and_fp16_keep_the_predictions(exported, digits, tmp_path):
    from exporters.onnx.variants import quantize_int8, to_fp16

    out, _ = exported
    quantize_int8(out / "model.onnx", tmp_path / "int8.onnx")
    to_fp16(out / "model.onnx", tmp_path / "fp16.onnx")
    x = digits.batch(range(0, len(digits), 3))[0].numpy()
    reference = _session(out / "model.onnx").run(["logits"], {"pixel_values": x})
    for name, min_agreement in (("int8", 0.97), ("fp16", 0.98)):
        got = _session(tmp_path / f"{name}.onnx").run(["logits"], {"pixel_values": x})
        parity = compare(name, reference, got, "CPU")
        assert parity.counted_agreement >= min_agreement, parity
    assert (tmp_path / "int8.onnx").stat().st_size < 0.6 * (out / "model.onnx").stat().st_size
    assert _weight_elements(tmp_path / "fp16.onnx", "FLOAT16") > 10 * _weight_elements(tmp_path / "fp16.onnx", "FLOAT")


@pytest.mark.skipif(platform.machine() != "x86_64" or not shutil.which("qemu-x86_64"),
                    reason="needs x86_64 and qemu-x86_64 (Debian: apt-get install qemu-user; .ci/run installs it)")
def test_one_int8_file_computes_the_same_logits_on_an_avx2_cpu_as_on_a_vnni_one(exported, digits, tmp_path):
    """The exported int8 file holds signed weights. Opened as the project opens it (exporters/onnx/session.py),
    it computes the logits of the unsigned-weight model (the same quantization grid, whose U8U8 kernels are exact
    on every CPU), natively and under qemu's Haswell (AVX2, no AVX-512/VNNI, like the AMD EPYC machines the old
    signed export failed on). Without session.x64quantprecision the Haswell's U8S8 kernels saturate: the test
    would catch the option going missing."""
    from exporters.onnx.session import has_vnni
    from exporters.onnx.variants import quantize_int8

    out, _ = exported
    np.save(tmp_path / "x.npy", digits.batch(range(0, len(digits), 6))[0].numpy())  # 300 digits: emulation is slow
    haswell = ("qemu-x86_64", "-cpu", "Haswell")

    def logits(model, mode, prefix=()):
        dst = tmp_path / f"{model.stem}-{mode}-{len(prefix)}.npy"
        subprocess.run([*prefix, *ort_logits.command(model, tmp_path / "x.npy", dst, mode)], check=True,
                       capture_output=True, timeout=300)
        return np.load(dst)

    quantize_int8(out / "model.optimized.onnx", tmp_path / "unsigned.onnx", "u8u8")
    unsigned = logits(tmp_path / "unsigned.onnx", "off")
    signed = out / "model.int8.onnx"
    for where, prefix in (("native", ()), ("haswell", haswell)):
        assert np.abs(logits(signed, "auto", prefix) - unsigned).max() < 1e-4, where
    assert np.abs(logits(signed, "off", haswell) - unsigned).max() > 0.05, "no saturation without the option?"
    if has_vnni():  # here the option is not needed, and forcing it changes the kernels, not the logits
        assert np.abs(logits(signed, "on") - logits(signed, "off")).max() < 1e-4
    reference = logits(out / "model.onnx", "off").argmax(1)
    assert (unsigned.argmax(1) == reference).mean() >= 0.97


def _weight_elements(path, dtype: str) -> int:
    import onnx

    model = onnx.load(str(path))
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == getattr(onnx.TensorProto, dtype))


def test_a_failed_check_exits_1_says_by_how_much_and_writes_nothing(run_dir, tmp_path, capsys):
    """A head scaled to logits of ~1e5: fp32 rounding alone then exceeds the absolute 1e-4 tolerance."""
    from nvflare_lora.checkpoint import read_adapter_dir

    state, peft_config, meta = read_adapter_dir(run_dir / ADAPTER_DIR / "best")
    for key in ("base_model.model.classifier.weight", "base_model.model.classifier.bias"):
        state[key] = state[key] * 1e5
    save_adapter_dir(tmp_path / "run" / "best", state, peft_config, meta)  # a checkpoint written so (manifest too)
    out = tmp_path / "rejected"
    rc = export_main([str(tmp_path / "run"), "--out", str(out), "--verify-samples", "32"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "fp32: max |logit difference|" in err and "exceeds 0.0001 by" in err
    assert not out.exists() and not list(tmp_path.glob(".rejected*")), "a failed export must leave no files"


def test_a_variant_that_fails_its_gate_is_left_out_and_the_rest_are_written(run_dir, tmp_path, capsys, monkeypatch):
    """Forced: no int8 model can agree on 101% of the images, and fp16's gate is opened, so that which files
    are written does not depend on how this CPU rounds (the gate itself is tested above)."""
    from exporters.onnx import verify

    monkeypatch.setitem(verify.THRESHOLDS, "int8", (None, 1.01))
    monkeypatch.setitem(verify.THRESHOLDS, "fp16", (None, 0.0))
    out = tmp_path / "served"
    rc = export_main([str(run_dir), "--out", str(out), "--quantize", "int8", "--fp16", "--verify-samples", "32",
                      "--triton", str(tmp_path / "triton"), "--triton-tensorrt"])
    captured = capsys.readouterr()
    assert rc == 1, captured.err
    assert "not written: int8: top-1 agreement" in captured.err and "is below 101% by" in captured.err
    assert "int8      model.int8.onnx" in captured.out and "NOT WRITTEN" in captured.out
    assert {p.name for p in out.glob("*.onnx")} == {"model.onnx", "model.fp16.onnx"}
    report = json.loads((out / "export_report.json").read_text())
    assert report["files"] == {"fp32": "model.onnx", "fp16": "model.fp16.onnx"} and list(report["failed"]) == ["int8"]
    int8 = report["verification"]["variants"]["int8"]
    assert not int8["passed"] and int8["cpu"]["machine"] and "int8_flags" in int8["cpu"]
    assert int8["scheme"] == "s8"
    assert ImageClassifier(out, "fp16").top(digits_images(2), k=1)
    # the Triton repository holds what verified, the fp16 model on GPUs through TensorRT at FP16
    assert check_triton_repository(tmp_path / "triton", out) == {"clip_lora_fp32", "clip_lora_fp16"}
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    fp16 = text_format.Parse((tmp_path / "triton" / "clip_lora_fp16" / "config.pbtxt").read_text(), mc.ModelConfig())
    (trt,) = fp16.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP16"


def digits_images(n):
    from PIL import Image
    from sklearn.datasets import load_digits

    return [Image.fromarray((im * 255 / 16).astype(np.uint8)).convert("RGB") for im in load_digits().images[:n]]


def test_verification_gate_states_the_margin():
    rng = np.random.default_rng(0)
    ref = [rng.standard_normal((50, 10)).astype(np.float32), rng.standard_normal((50, 4)).astype(np.float32)]
    close = compare("fp32", ref, [ref[0] + 5e-5, ref[1]], "CPU")
    assert not close.failures
    off = compare("fp32", ref, [ref[0] + 3e-4, ref[1]], "CPU")
    assert off.failures == ["max |logit difference| 0.0003 exceeds 0.0001 by 0.0002"]
    flipped = ref[0].copy()
    flipped[:2] = -flipped[:2]  # two of 50 top-1 decisions change
    int8 = compare("int8", ref, [flipped, ref[1]], "CPU")
    assert int8.top1_agreement == 0.96 and int8.max_abs_allowed is None
    assert int8.failures == ["top-1 agreement 96.00% (48/50) is below 99% by 3.00 points"]
    one_nan = ref[0].copy()
    one_nan[3, 3] = np.nan
    assert compare("fp16", ref, [one_nan, ref[1]], "CPU").failures[0] == "the logits are not all finite"


def test_a_flip_between_classes_the_reference_cannot_tell_apart_is_a_near_tie_not_a_failure():
    """Image 0's top two logits differ by 0.5% of its logit range: the CPU's rounding decides which wins."""
    ref = np.tile(np.linspace(0.0, 1.0, 10, dtype=np.float32), (40, 1))
    ref[0, 8] = 1.0 - 0.005  # lead of the top-1 (class 9) over class 8: 0.5% of the range
    ref[1, 7] = 1.0 - 0.05  # 5%: a real decision
    tie = ref.copy()
    tie[0, 8] = 1.0 + 1e-3
    fp16 = compare("fp16", [ref], [tie], "CPU")
    assert fp16.top1_agreement == 39 / 40 and fp16.near_tie_flips == 1 and fp16.counted_agreement == 1.0
    assert not fp16.failures and fp16.to_dict()["passed"]
    fp32 = compare("fp32", [ref], [tie], "CPU")
    assert fp32.failures == ["max |logit difference| 0.006 exceeds 0.0001 by 0.0059"]  # fp32 stays bound by 1e-4
    real = ref.copy()
    real[1, 7] = 1.0 + 1e-3
    assert compare("fp16", [ref], [real], "CPU").failures == [
        "top-1 agreement 97.50% (39/40) is below 99% by 1.50 points"]
    both = tie.copy()
    both[1, 7] = 1.0 + 1e-3
    assert compare("fp16", [ref], [both], "CPU").failures == [
        "top-1 agreement 97.50% (38/40 + 1 near-tie) is below 99% by 1.50 points"]


# ---- serving -------------------------------------------------------------------------------------
def test_predict_prints_top_labels_with_probabilities(exported, tmp_path, capsys):
    from PIL import Image
    from sklearn.datasets import load_digits

    out, _ = exported
    images = load_digits().images[:2]
    paths = []
    for i, im in enumerate(images):
        paths.append(tmp_path / f"digit{i}.png")
        Image.fromarray((im * 255 / 16).astype(np.uint8)).resize((64, 64)).save(paths[-1])
    assert predict_main([str(out), *map(str, paths), "--top", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    classifier = ImageClassifier(out)
    with Image.open(paths[0]) as im:
        probs = classifier.probabilities([im.convert("RGB")])[0]
    assert abs(probs.sum() - 1) < 1e-5
    fields = lines[0].split(": ", 1)[1].split()
    labels, shown = fields[0::2], [float(p) for p in fields[1::2]]
    assert lines[0].startswith(str(paths[0])) and len(labels) == 3
    assert labels[0] == classifier.labels[int(probs.argmax())] and shown == sorted(shown, reverse=True)
    assert abs(shown[0] - probs.max()) < 1e-3


def test_serving_needs_no_torch_and_preprocesses_as_training_does(exported, digits, tmp_path):
    """predict.py runs with torch made unimportable, and its pixels equal the training preprocessing's."""
    from PIL import Image
    from sklearn.datasets import load_digits

    out, _ = exported
    image = Image.fromarray((load_digits().images[0] * 255 / 16).astype(np.uint8)).resize((48, 40))
    image.save(tmp_path / "digit.png")
    code = ("import sys, json, numpy as np; sys.modules['torch'] = None\n"
            "from PIL import Image\nfrom exporters.onnx.predict import ImageClassifier, main\n"
            f"c = ImageClassifier({str(out)!r}); np.save({str(tmp_path / 'px.npy')!r}, "
            f"c.preprocess.array(Image.open({str(tmp_path / 'digit.png')!r})))\n"
            f"sys.exit(main([{str(out)!r}, {str(tmp_path / 'digit.png')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120)
    assert proc.returncode == 0 and "digit.png: " in proc.stdout, proc.stderr
    with Image.open(tmp_path / "digit.png") as im:
        training = FederatedCLIPModel("tiny-clip", 10).preprocess(im).numpy()
    assert training.shape == (3, 32, 32) and np.abs(np.load(tmp_path / "px.npy") - training).max() <= 1e-6


def test_predict_refuses_what_was_not_exported(exported, tmp_path, capsys):
    assert predict_main([str(tmp_path), "x.png"]) == 2
    assert "not an exported model directory" in capsys.readouterr().err
    out, _ = exported
    assert predict_main([str(out), str(tmp_path / "missing.png")]) == 2
    assert "cannot read image" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"has no 'fp16' model; it has \['fp32', 'int8', 'optimized'\]"):
        ImageClassifier(out, "fp16")


def _digit_folder(root: Path, n: int = 12) -> Path:
    """n digits as PNGs, some in a nested folder, plus a corrupt file and a file that is no image."""
    from PIL import Image
    from sklearn.datasets import load_digits

    for i, im in enumerate(load_digits().images[:n]):
        path = root / ("nested/deeper" if i % 3 == 0 else "") / f"d{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((im * 255 / 16).astype(np.uint8)).save(path)
    (root / "nested" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but no image")
    (root / "notes.txt").write_text("not an image")
    return root


def test_predict_classifies_folders_and_globs_in_batches_skipping_a_corrupt_file(exported, tmp_path, capsys):
    """One row per readable image (nested folders too, by training's image rule), the corrupt one counted and
    named, the rows equal to ImageClassifier's, in CSV and in JSON lines."""
    import csv

    out, _ = exported
    photos = _digit_folder(tmp_path / "photos")
    assert predict_main([str(out), str(photos), "--batch", "5", "--variant", "optimized", "--out", str(tmp_path / "p.csv")]) == 0
    err = capsys.readouterr().err
    assert re.search(r"classified 12 images in [\d.]+ s \([\d.]+ images/s, batch 5, optimized\), written to .*p\.csv; "
                     r"skipped 1 unreadable: .*broken\.png", err), err
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert sorted(Path(r["path"]).name for r in rows) == [f"d{i:02d}.png" for i in range(12)]
    classifier = ImageClassifier(out, "optimized")  # fp32: no per-batch activation scales, so any batching agrees
    from PIL import Image

    expected = classifier.top([Image.open(r["path"]).convert("RGB") for r in rows], k=3)
    assert [[r[f"label_{i}"] for i in (1, 2, 3)] for r in rows] == [[lab for lab, _ in e] for e in expected]
    assert all(abs(float(r["probability_1"]) - e[0][1]) < 1e-5 for r, e in zip(rows, expected))
    pattern = str(photos / "**" / "deeper" / "*.png")
    assert predict_main([str(out), pattern, "--top", "1", "--out", str(tmp_path / "p.jsonl")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [Path(r["path"]).name for r in lines] == ["d00.png", "d03.png", "d06.png", "d09.png"]
    assert set(lines[0]) == {"path", "top"} and len(lines[0]["top"]) == 1


def test_predict_refuses_bad_input_before_it_writes_anything(exported, tmp_path, capsys):
    out, _ = exported
    photos = _digit_folder(tmp_path / "photos", 2)
    cases = [(["--batch", "0"], "--batch must be >= 1, got 0"),
             (["--out", str(tmp_path / "missing" / "p.csv")], "does not exist; create it first"),
             (["--out", str(tmp_path / "p.txt")], "name a .csv or a .jsonl file"),
             ([str(tmp_path / "*.jpg")], "matches no file")]
    for extra, message in cases:
        assert predict_main([str(out), str(photos), *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert predict_main([str(out), str(photos / "nested" / "broken.png")]) == 2
    assert "none of the 1 files could be read as an image" in capsys.readouterr().err
    assert not list(tmp_path.glob("p.*"))


def test_a_changed_byte_in_an_exported_file_is_refused_by_name(exported, tmp_path, capsys):
    """export_report.json holds the sha256 of every file the export wrote; serving checks what it loads."""
    out, _ = exported
    copy = shutil.copytree(out, tmp_path / "onnx")
    data = bytearray((copy / "model.int8.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "model.int8.onnx").write_bytes(bytes(data))
    assert predict_main([str(copy), str(_digit_folder(tmp_path / "photos", 2)), "--variant", "int8"]) == 2
    err = capsys.readouterr().err
    assert "model.int8.onnx is not the file the export verified" in err and "python -m exporters.onnx " in err, err
    assert ImageClassifier(copy, "fp32").labels  # the untouched files still serve
    (copy / "labels.json").write_text('["a", "b"]')
    with pytest.raises(ValueError, match=r"labels\.json is not the file the export verified"):
        ImageClassifier(copy, "fp32")


def test_a_tensor_changed_in_a_checkpoint_is_refused_by_resume_and_export(run_dir, tmp_path, capsys):
    """nvflare_lora.json's manifest records each tensor's shape, dtype and sha256, nvflare_lora.manifest.json every
    file's; every reader checks them (tests/test_signing.py: each tampering, signed checkpoints)."""
    from nvflare.apis.fl_context import FLContext
    from safetensors.numpy import load_file, save_file

    from nvflare_lora.fl.server.persistor import AdapterPersistor

    ws = tmp_path / "ws"
    shutil.copytree(run_dir / "server", ws / "server")
    latest = ws / ADAPTER_DIR / "latest"
    manifest = json.loads((latest / "nvflare_lora.json").read_text())["manifest"]["tensors"]
    key = "base_model.model.classifier.bias"
    assert manifest[key]["shape"] == [10] and manifest[key]["dtype"] == "float32"
    state = load_file(str(latest / "adapter_model.safetensors"))
    state[key] = state[key] + np.float32(1e-3)
    save_file(state, str(latest / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=rf"tensor '{re.escape(key)}' does not match the sha256 in its manifest"):
        AdapterPersistor(resume_from=str(ws))._load_resume(FLContext())
    assert export_main([str(ws), "--checkpoint", "latest", "--out", str(tmp_path / "o")]) == 2
    assert f"tensor '{key}' does not match the sha256" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # a checkpoint without its manifest (nvflare_lora.manifest.json): nothing says its files are the written ones
    best = ws / ADAPTER_DIR / "best"
    (best / "nvflare_lora.manifest.json").unlink()
    with pytest.raises(ValueError, match="resume_from: checkpoint .* has no manifest .*--allow-unverified"):
        AdapterPersistor(resume_from=str(best))._load_resume(FLContext())
    assert export_main([str(ws), "--out", str(tmp_path / "o")]) == 2
    assert "has no manifest" in capsys.readouterr().err and not (tmp_path / "o").exists()


def check_triton_repository(repo: Path, export_dir: Path) -> set:
    """Every config.pbtxt parses into Triton's own ModelConfig protobuf and matches its ONNX graph (names, dtypes,
    dims without the batch axis); the version folder holds the verified file; returns the model names."""
    import onnx
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    report = json.loads((export_dir / "export_report.json").read_text())
    types = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.INT64: "TYPE_INT64"}
    names = set()
    for variant, file in report["files"].items():
        name = f"clip_lora_{variant}"
        config = text_format.Parse((repo / name / "config.pbtxt").read_text(), mc.ModelConfig())
        assert config.name == name and config.platform == "onnxruntime_onnx" and config.max_batch_size >= 8
        assert config.HasField("dynamic_batching")
        model = repo / name / "1" / "model.onnx"
        assert sha256_file(model) == report["sha256"][file]
        graph = onnx.load(str(model)).graph
        for declared, actual in ((config.input, graph.input), (config.output, graph.output)):
            assert [t.name for t in declared] == [v.name for v in actual], name
            for t, v in zip(declared, actual):
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
                assert list(t.dims) == dims[1:] and mc.DataType.Name(t.data_type) == types[v.type.tensor_type.elem_type]
        kinds = [mc.ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group]
        assert kinds == {"int8": ["KIND_CPU"], "fp16": ["KIND_GPU"]}.get(variant.removeprefix("text_"), []), name
        if not variant.startswith("text"):
            assert [o.label_filename for o in config.output] == ["labels.txt", ""]
            labels = (repo / name / "labels.txt").read_text().splitlines()
            assert labels == json.loads((export_dir / "labels.json").read_text())
        names.add(name)
    readme = (repo / "README.md").read_text()
    assert "tritonserver --model-repository" in readme and "centre-crop" in readme
    return names


def test_triton_repository_of_the_export_matches_its_graphs(exported, run_dir):
    out, stdout = exported
    names = check_triton_repository(run_dir / "triton", out)
    assert names == {"clip_lora_fp32", "clip_lora_optimized", "clip_lora_int8", "clip_lora_text"}
    assert "Triton model repository: " in stdout
    assert "session.x64quantprecision" in (run_dir / "triton" / "README.md").read_text()


def test_triton_target_that_is_not_empty_is_refused_before_the_export(run_dir, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("keep")
    assert export_main([str(run_dir), "--out", str(tmp_path / "o"), "--triton", str(tmp_path / "mine")]) == 2
    assert "exists and is not empty; choose another folder, or pass --force" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and (tmp_path / "mine" / "keep.txt").read_text() == "keep"
    assert export_main([str(run_dir), "--out", str(tmp_path / "o"), "--triton-tensorrt"]) == 2
    assert "give --triton DIR too" in capsys.readouterr().err
    assert export_main([str(run_dir), "--out", str(tmp_path / "o"), "--triton", str(tmp_path / "o" / "t")]) == 2
    assert "overlap; give the Triton repository a folder of its own" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---- bad input: clear message, exit 2, no traceback ---------------------------------------------
def test_missing_run_dir_via_the_command_line(tmp_path, capsys, monkeypatch):
    """`python -m exporters.onnx MISSING` as Python runs it (runpy, as __main__; in this process: a fresh one only
    adds its imports): exit status 2, one message, no traceback."""
    monkeypatch.setattr(sys, "argv", ["exporters.onnx", str(tmp_path / "nope")])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module("exporters.onnx", run_name="__main__", alter_sys=True)
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert "run directory" in err and "does not exist" in err and "Traceback" not in err


def test_run_dir_without_a_checkpoint(tmp_path, capsys):
    (tmp_path / "ws" / "server").mkdir(parents=True)
    assert export_main([str(tmp_path / "ws")]) == 2
    err = capsys.readouterr().err
    assert "no adapter checkpoint under" in err and "adapter/best" in err


def test_base_model_that_cannot_be_found(run_dir, tmp_path, capsys):
    ckpt = shutil.copytree(run_dir / ADAPTER_DIR / "best", tmp_path / "best")
    rewrite_meta(ckpt, base_model=str(tmp_path / "models" / "clip-base"))
    assert export_main([str(ckpt), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "cannot find CLIP model" in err and "--model PATH" in err
    assert not (tmp_path / "o").exists()


def test_a_base_with_other_weights_is_refused(run_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    other = save_preset("tiny-clip", tmp_path / "other-base")
    weights = load_file(str(other / "model.safetensors"))
    weights["visual_projection.weight"] *= 2
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    assert export_main([str(run_dir), "--model", str(other), "--out", str(tmp_path / "o")]) == 2
    assert "trained on another base" in capsys.readouterr().err


def test_an_unrelated_output_directory_is_not_overwritten(run_dir, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert export_main([str(run_dir), "--out", str(tmp_path / "mine")]) == 2
    assert "is not an earlier export" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


# ---- WiSE-FT at export ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zero_shot_run(tmp_path_factory):
    """A run that started from CLIP's zero-shot head (a base with a tokenizer: python -m nvflare_lora.zeroshot), its
    best adapter moved from that start as training moves it (LoRA B and the head changed)."""
    from nvflare_lora.checkpoint import read_adapter_dir
    from nvflare_lora.config import LoRAConfig
    from nvflare_lora.base_model import _TINY_CONFIG
    from nvflare_lora.sample_data import write_random_base
    from nvflare_lora.zeroshot import write_initial_adapter

    root = tmp_path_factory.mktemp("zero_shot")
    base = str(write_random_base(root / "base", 0, **_TINY_CONFIG))
    labels = [str(i) for i in range(10)]
    init = write_initial_adapter(root / "init", base, labels, LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.0))
    state, peft_config, meta = read_adapter_dir(init)
    rng = np.random.default_rng(0)
    moved = {k: v + (0.5 if "classifier" in k else 0.05) * rng.standard_normal(v.shape).astype(np.float32)
             if "lora_B" in k or "classifier" in k else v for k, v in state.items()}
    save_adapter_dir(root / "ws" / ADAPTER_DIR / "best", moved, peft_config, {**meta, "round": 3, "checkpoint": "best"})
    return root / "ws", base, labels


def test_wise_alpha_0_exports_clips_zero_shot_model_and_1_the_fine_tuned_one(zero_shot_run, tmp_path, capsys):
    from transformers import CLIPModel

    from nvflare_lora.base_model import preprocessing_for
    from nvflare_lora.models import load_tokenizer

    run, base, labels = zero_shot_run
    out = tmp_path / "onnx"
    assert export_main([str(run), "--out", str(out), "--wise", "0, 0.5,1", "--verify-samples", "48"]) == 0, \
        capsys.readouterr().err
    assert export_main([str(run), "--out", str(tmp_path / "plain"), "--verify-samples", "48"]) == 0
    x = load_digits_dataset(preprocessing_for(base)).batch(range(0, 300, 5))[0]
    logits = {name: _session(path / "model.onnx").run(["logits"], {"pixel_values": x.numpy()})[0]
              for name, path in (("0", out / "wise_0"), ("0.5", out / "wise_0.5"), ("1", out / "wise_1"),
                                 ("plain", tmp_path / "plain"))}
    for alpha in ("0", "0.5", "1"):
        report = json.loads((out / f"wise_{alpha}" / "export_report.json").read_text())
        assert report["wise_alpha"] == float(alpha) and not report["failed"]
        assert any(n.startswith(f"WiSE-FT: alpha {alpha} ") for n in report["notes"]), report["notes"]
    tok = load_tokenizer(base)([f"a photo of a {c}." for c in labels], padding=True, return_tensors="pt")
    with torch.no_grad():
        zero_shot = CLIPModel.from_pretrained(base).eval()(pixel_values=x, **tok).logits_per_image.numpy()
    assert np.abs(logits["0"] - zero_shot).max() < 1e-4  # alpha 0: the base, zero-shot
    assert np.abs(logits["1"] - logits["plain"]).max() < 1e-5  # alpha 1: the fine-tuned model
    middle = np.abs(logits["0.5"] - (logits["0"] + logits["1"]) / 2).max()
    assert np.abs(logits["0.5"] - logits["0"]).max() > 0.1 and np.abs(logits["0.5"] - logits["1"]).max() > 0.1
    assert middle < np.abs(logits["1"] - logits["0"]).max()  # between the two, not linear (LoRA sits inside)


def test_wise_refuses_what_it_cannot_interpolate(run_dir, zero_shot_run, tmp_path, capsys):
    run, _, _ = zero_shot_run
    for args, message in (([str(run), "--wise", "1.5"], "--wise ALPHA must be a number in [0, 1]"),
                          ([str(run), "--wise", "x"], "--wise ALPHA must be a number in [0, 1]"),
                          ([str(run), "--wise", "0.5,0.5"], "--wise lists an ALPHA twice"),
                          ([str(run), "--wise", "0,1", "--triton", str(tmp_path / "t")], "--triton takes one model"),
                          ([str(run_dir), "--wise", "0.5"], "started from a seeded random init (head_init 'seeded')")):
        assert export_main([*args, "--out", str(tmp_path / "o")]) == 2, args
        assert message in capsys.readouterr().err, args
    assert not (tmp_path / "o").exists()



# ---- both towers: classes named at serve time -----------------------------------------------------
def test_predict_classifies_against_labels_no_site_trained_without_torch(zero_shot_run, tmp_path):
    """The text tower, its tokenizer (read by `tokenizers`) and the prompt templates are exported and verified on
    the job's labels and on labels no site holds; predict --labels ranks as CLIPModel ranks, with torch and
    transformers unimportable. At --wise 0 the model is the base, so CLIPModel's logits_per_image is the truth."""
    from PIL import Image
    from transformers import CLIPModel

    from nvflare_lora.base_model import preprocessing_for
    from nvflare_lora.models import load_tokenizer

    run, base, labels = zero_shot_run
    out = tmp_path / "onnx"
    assert export_main([str(run), "--out", str(out), "--wise", "0", "--with-text", "--verify-samples", "48"]) == 0
    report = json.loads((out / "export_report.json").read_text())
    text = report["verification"]["text"]
    assert text["tokens_equal"] and {"tokenizer.json", "text.json", "class_embeddings.safetensors"} <= set(report["sha256"])
    assert all(v["passed"] for v in text["prompts"]["text"].values()) and text["unseen_labels"][:2] == ["cat", "dog"]
    photos = _digit_folder(tmp_path / "photos", 6)
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "from exporters.onnx.predict import main\n"
            f"sys.exit(main([{str(out)!r}, {str(photos)!r}, '--labels', 'cat, dog,bird', '--top', '3', "
            f"'--out', {str(tmp_path / 'p.jsonl')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    pp = preprocessing_for(base)
    x = torch.stack([pp(Image.open(r["path"]).convert("RGB")) for r in rows])
    clip = CLIPModel.from_pretrained(base).eval()
    for names in (["cat", "dog", "bird"], labels):
        tok = load_tokenizer(base)([f"a photo of a {c}." for c in names], padding=True, return_tensors="pt")
        with torch.no_grad():
            truth = clip(pixel_values=x, **tok).logits_per_image.softmax(-1).numpy()
        got = ([[(t["label"], t["probability"]) for t in r["top"]] for r in rows] if names[0] == "cat" else
               ImageClassifier(out, labels=names).top([Image.open(r["path"]).convert("RGB") for r in rows], k=3))
        for probs, top in zip(truth, got):
            assert [lab for lab, _ in top] == [names[i] for i in np.argsort(-probs)[:3]]
            assert all(abs(p - probs[names.index(lab)]) < 1e-4 for lab, p in top)


def test_labels_at_serve_time_refuse_what_they_cannot_serve(exported, zero_shot_run, tmp_path, capsys):
    run, _, _ = zero_shot_run
    photos = str(_digit_folder(tmp_path / "photos", 2))
    out, _ = exported  # tiny-clip, a preset without a tokenizer: its text tower is exported, not servable by name
    assert "predict --labels" not in json.dumps(json.loads((out / "export_report.json").read_text())["failed"])
    no_text = tmp_path / "no_text"
    assert export_main([str(run), "--out", str(no_text), "--verify-samples", "16"]) == 0
    for model_dir, labels, message in ((out, "cat,dog", "has no tokenizer"),
                                       (no_text, "cat,dog", "has no text tower"),
                                       (no_text, " , dog", "are empty or only whitespace"),
                                       (no_text, "cat", "a classifier needs two or more"),
                                       (no_text, "cat,dog,cat", "['cat'] more than once")):
        assert predict_main([str(model_dir), photos, "--labels", labels]) == 2, message
        assert message in capsys.readouterr().err, message
