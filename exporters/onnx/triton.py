"""A Triton Inference Server model repository of a verified export (`python -m exporters.onnx RUN_DIR --triton DIR`).

DIR/<model>/config.pbtxt and DIR/<model>/1/model.onnx for each file the export wrote and verified, read by
Triton's ONNX Runtime backend: clip_lora_fp32, clip_lora_optimized, clip_lora_int8, clip_lora_fp16, and
clip_lora_text (and its int8 / fp16 variants) for the text tower, whose folder also holds the tokenizer, the
prompt templates and the job's class embeddings. Each config is written from its ONNX graph (input and output names, dtypes,
dims without the batch axis), with max_batch_size and dynamic batching; the logits output names labels.txt;
int8 runs on CPU instances, fp16 on GPU ones (optionally through ONNX Runtime's TensorRT accelerator at FP16),
the others where Triton finds a device (KIND_AUTO). DIR/README.md says how to start tritonserver, what a client
must do to an image first, and the sha256 of every model file (the export's, checked before copying).

What the backend cannot take: ONNX Runtime session config entries other than its own few parameters (its
src/onnxruntime.cc passes no "session.x64quantprecision"), so the int8 model computes the verified logits on CPUs
with AVX-512 VNNI / AVX-VNNI only; README.md says so. No Triton server runs here: the tests parse every config
into Triton's own ModelConfig protobuf (tritonclient) and check it against the graph.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

import onnx
from nvflare_lora.files import swap_into_place

from .errors import ExportError
from .predict import CLASS_EMBEDDINGS_FILE, TEXT_FILE, TOKENIZER_FILE, ExportFiles
from .session import SESSION_OPTIONS_RULE

MODEL_PREFIX = "clip_lora"
MAX_BATCH_SIZE = 64
QUEUE_DELAY_US = 1000
# variant -> Triton instance kind: int8 dynamic quantization is a CPU kernel set; fp16 is for GPUs
INSTANCE_KIND = {"int8": "KIND_CPU", "fp16": "KIND_GPU"}
ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 7: "TYPE_INT64", 6: "TYPE_INT32", 2: "TYPE_UINT8", 3: "TYPE_INT8",
                  9: "TYPE_BOOL", 11: "TYPE_FP64"}


def check_repository_target(target: Path, force: bool) -> None:
    """Before any work: refuse a --triton target that is a file, or a non-empty folder without --force."""
    if target.exists() and not target.is_dir():
        raise ExportError(f"--triton {target} is a file; name a folder for the model repository")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise ExportError(f"--triton {target} exists and is not empty; choose another folder, or pass --force to "
                          f"replace it")


def graph_io(path: Path) -> Tuple[List[Dict], List[Dict]]:
    """(inputs, outputs) of an ONNX file as {"name", "data_type", "dims"} with the batch axis dropped; other
    dynamic axes (the text tower's sequence) are -1."""
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def entries(values):
        out = []
        for v in values:
            if v.name in initializers:
                continue
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            out.append({"name": v.name, "data_type": ONNX_TO_TRITON[t.elem_type], "dims": dims[1:]})
        return out
    return entries(graph.input), entries(graph.output)


def model_config(name: str, variant: str, inputs: List[Dict], outputs: List[Dict], tensorrt: bool) -> str:
    """config.pbtxt (protobuf text format of Triton's ModelConfig) for the ONNX Runtime backend."""
    def tensors(entries, labels):
        blocks = []
        for e in entries:
            extra = '\n    label_filename: "labels.txt"' if labels and e["name"] == "logits" else ""
            blocks.append(f'  {{\n    name: "{e["name"]}"\n    data_type: {e["data_type"]}\n'
                          f'    dims: [ {", ".join(str(d) for d in e["dims"])} ]{extra}\n  }}')
        return ",\n".join(blocks)

    lines = [f'name: "{name}"', 'platform: "onnxruntime_onnx"', 'backend: "onnxruntime"',
             f"max_batch_size: {MAX_BATCH_SIZE}", f"input [\n{tensors(inputs, False)}\n]",
             f"output [\n{tensors(outputs, True)}\n]",
             f"dynamic_batching {{\n  max_queue_delay_microseconds: {QUEUE_DELAY_US}\n}}"]
    kind = INSTANCE_KIND.get(variant.removeprefix("text_"))
    if kind:
        lines.append(f"instance_group [\n  {{\n    count: 1\n    kind: {kind}\n  }}\n]")
    if variant.endswith("int8"):
        lines.insert(0, "# signed int8 weights: exact on CPUs with AVX-512 VNNI or AVX-VNNI. Without VNNI, ONNX Runtime needs\n"
                        "# the session entry session.x64quantprecision=1, which Triton's backend does not pass: see README.md")
    if variant.endswith("fp16") and tensorrt:
        lines.append('optimization {\n  execution_accelerators {\n    gpu_execution_accelerator [\n      {\n'
                     '        name: "tensorrt"\n        parameters { key: "precision_mode" value: "FP16" }\n'
                     '        parameters { key: "max_workspace_size_bytes" value: "1073741824" }\n      }\n    ]\n  }\n}')
    return "\n".join(lines) + "\n"


def write_repository(export_dir: Path, target: Path, tensorrt: bool = False, force: bool = False) -> Path:
    """Write the repository of export_dir's verified files into target (whole or not at all)."""
    check_repository_target(target, force)
    files = ExportFiles(export_dir)  # copy only what the export verified: the checked bytes are written
    report = files.report
    labels = files.json("labels.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    models = {}
    try:
        for variant, file in report["files"].items():
            name = f"{MODEL_PREFIX}_{variant}"
            version = tmp / name / "1"
            version.mkdir(parents=True)
            (version / "model.onnx").write_bytes(files.read(file))
            external = files.external_data(file)
            if external:  # the graph names its external data file: it keeps its name
                (version / external).write_bytes(files.read(external))
            inputs, outputs = graph_io(version / "model.onnx")
            (tmp / name / "config.pbtxt").write_text(model_config(name, variant, inputs, outputs, tensorrt))
            if any(o["name"] == "logits" for o in outputs):
                (tmp / name / "labels.txt").write_text("".join(f"{label}\n" for label in labels))
            if variant == "text":  # what a client needs to turn class names into the text tower's inputs
                for f in (TOKENIZER_FILE, TEXT_FILE, CLASS_EMBEDDINGS_FILE):
                    if f in files.hashes:
                        (tmp / name / f).write_bytes(files.read(f))
            models[name] = {"variant": variant, "source": file, "sha256": report["sha256"][file],
                            "inputs": inputs, "outputs": outputs}
        (tmp / "README.md").write_text(_readme(report, models, tensorrt))
        for f in tmp.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
        tmp.chmod(0o755)
        swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _readme(report: Dict, models: Dict, tensorrt: bool) -> str:
    pp = report["preprocessing"]
    how = pp.get("resample", "bicubic")
    resize = (f"resize the whole image to {pp['crop_size']} x {pp['crop_size']} px ({how})"
              if pp.get("resize") == "squash" else
              f"resize the short side to {pp['size']} px ({how}), centre-crop to {pp['crop_size']} x {pp['crop_size']}")
    rule = SESSION_OPTIONS_RULE["session.x64quantprecision"]
    rows = "\n".join(f"| `{name}` | {m['variant']} | {INSTANCE_KIND.get(m['variant'].removeprefix('text_'), 'KIND_AUTO')} | "
                     f"`{m['source']}` | `{m['sha256']}` |" for name, m in models.items())
    image = next((m for m in models.values() if not m["variant"].startswith("text")), None)
    text = ""
    if "clip_lora_text" in models:
        text = ("\n`clip_lora_text` takes `input_ids` and `attention_mask` (INT64, right-padded; `text.json` says "
                "to what length, whether the prompts are lower-cased first and whether the mask hides the padding or "
                "is all ones, as SigLIP reads it) and gives `text_embeds`. Its folder holds what a client needs to "
                "classify against any class names: `tokenizer.json` (the `tokenizers` package reads it), `text.json` "
                "(prompt templates, the base family's text rules: length, padding, mask, case; its logit scale, "
                "bias and scoring) and `class_embeddings.safetensors` (the job's labels, encoded): score the unit "
                "`image_embeds` against the unit mean of each class's prompt embeddings times the logit scale, plus "
                "the bias, then a softmax (CLIP, MetaCLIP 2) or each class's sigmoid (SigLIP), as "
                "`exporters/onnx/predict.py` (`TextEncoder`, `ImageClassifier`) does.\n")
    int8 = ""
    if "clip_lora_int8" in models:
        int8 = (f"\n## int8 and the CPU\n\n`clip_lora_int8` holds signed 8-bit weights. ONNX Runtime computes its "
                f"verified logits exactly on CPUs with AVX-512 VNNI or AVX-VNNI. On other x86-64 CPUs it needs the "
                f"session config entry `session.x64quantprecision = \"{rule['value']}\"` ({rule['why']}). Triton's ONNX "
                f"Runtime backend passes no such entry from `config.pbtxt`, so serve `clip_lora_int8` from a VNNI CPU, "
                f"or serve `clip_lora_fp32` / `clip_lora_optimized` on a CPU without VNNI. "
                f"`python -m exporters.onnx.predict` sets the entry itself.\n")
    return f"""# Triton model repository of an nvflare_lora export

Written by `python -m exporters.onnx ... --triton` from the verified files of an export (base
`{report['base_model']}`, checkpoint `{report.get('checkpoint')}`, round {report.get('round')}). Start it with

```bash
tritonserver --model-repository=$PWD
# or: docker run --rm -p8000:8000 -p8001:8001 -v $PWD:/models nvcr.io/nvidia/tritonserver:<yy.mm>-py3 \\
#       tritonserver --model-repository=/models
```

| model | variant | instances | exported file | sha256 |
|---|---|---|---|---|
{rows}

Each model batches requests dynamically up to {MAX_BATCH_SIZE} (`max_batch_size`); `logits` carries
`labels.txt`, so a client asking for classification results gets label names.{' The fp16 model runs through ONNX Runtime' + chr(39) + 's TensorRT accelerator at FP16.' if tensorrt else ''}

## What a client sends

`{image['inputs'][0]['name'] if image else 'pixel_values'}`: FP32, shape (batch, 3, {pp['crop_size']}, {pp['crop_size']}), made from an RGB image
exactly as training made it: {resize}, scale to [0, 1], subtract mean {pp['mean']} and divide by std
{pp['std']} per channel, channels first (NCHW). `nvflare_lora.preprocessing.Preprocessing.array` does this
with numpy and PIL. Outputs: `logits` (batch, classes) and `image_embeds` (batch, projection).
{text}{int8}
A Triton server was not run where this was written; each `config.pbtxt` was parsed into Triton's
`ModelConfig` protobuf and checked against its graph.
"""
