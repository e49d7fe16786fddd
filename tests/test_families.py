"""Bases of the other model families (nvflare_lora.families): SigLIP (SigLIP 2 at a fixed resolution has its
architecture) and MetaCLIP 2, as small random checkpoints written with save_pretrained (tests/support/bases.py), through
the code CLIP goes through: the zero-shot start is the family's own model, two in-process rounds, the export verified
and served without torch. The suite's simulator job with a SigLIP base is tests/test_compression.py's."""

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from exporters.onnx.__main__ import main as export_main
from exporters.onnx.predict import ImageClassifier
from exporters.onnx.rebuild import rebuild
from nvflare_lora import CLIPLoRAWrapper, FederatedCLIPModel, LoRAConfig, quick_clip_lora
from nvflare_lora.base_model import ModelNotFoundError, preprocessing_for
from nvflare_lora.checkpoint import save_adapter_dir
from nvflare_lora.data import load_digits_dataset
from nvflare_lora import families, sample_data
from nvflare_lora.families import FamilyError
from nvflare_lora.head import HeadError
from nvflare_lora.managers import model_metadata
from nvflare_lora.round import Federation
from nvflare_lora.sample_data import write_digits
from nvflare_lora.settings import JobSettings
from nvflare_lora.skeleton import adapter_skeleton, adapter_shapes
from nvflare_lora.training import train_local
from nvflare_lora.zeroshot import zeroshot_head
from support.bases import small_base

FAMILIES = ("siglip", "metaclip_2")
LABELS = ["Cat", "dog", "a small bird"]
TEMPLATE = "a photo of a {}."


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: small_base(root / family, family) for family in FAMILIES}


def own_logits(base: str, family: str, pixels: torch.Tensor, labels) -> torch.Tensor:
    """logits_per_image of the family's own transformers model, its text prepared as the family's processor does:
    SigLIP lower-cases, pads to the text tower's 32 positions and passes no attention mask; MetaCLIP 2 pads to the longest
    prompt and masks the padding."""
    model, tokenizer = AutoModel.from_pretrained(base).eval(), AutoTokenizer.from_pretrained(base)
    texts = [TEMPLATE.format(label) for label in labels]
    if family == "siglip":
        inputs = {"input_ids": tokenizer([t.lower() for t in texts], padding="max_length", max_length=32,
                                         return_tensors="pt")["input_ids"]}
    else:
        inputs = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    with torch.no_grad():
        return model(**inputs, pixel_values=pixels).logits_per_image


@pytest.mark.parametrize("family", FAMILIES)
def test_the_zero_shot_start_is_the_familys_own_model(bases, family):
    """Both heads start as the family's own classifier: the text head, and a linear head set by zeroshot_head (its
    bias SigLIP's logit_bias), give its logits_per_image to 1e-5. SigLIP's own scores are sigmoids of them."""
    base = bases[family]
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    theirs = own_logits(base, family, pixels, LABELS)
    text = FederatedCLIPModel(base, 3, labels=LABELS, head="text", templates=[TEMPLATE], device="cpu")
    torch.testing.assert_close(text(pixels), theirs, atol=1e-5, rtol=0)
    linear = FederatedCLIPModel(base, 3, labels=LABELS, normalize_embeds=True, device="cpu")
    weight, bias = zeroshot_head(base, LABELS, [TEMPLATE])
    linear.model.classifier.weight.data, linear.model.classifier.bias.data = torch.tensor(weight), torch.tensor(bias)
    torch.testing.assert_close(linear(pixels), theirs, atol=1e-5, rtol=0)
    if family == "siglip":
        assert np.all(bias == float(text.model.logit_bias)) and float(text.model.logit_bias) != 0


def test_a_tokenizer_that_pads_on_the_left_reads_the_prompts_as_training_and_serving_do(bases, tmp_path):
    """Gemma's tokenizer (SigLIP 2's) may pad on the left; SigLIP reads the last position, and serving's `tokenizers`
    pads on the right: the prompts are padded on the right whatever the checkpoint's tokenizer says, so the text
    head scores the same."""
    folder = tmp_path / "siglip-left"
    shutil.copytree(bases["siglip"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))
    assert AutoTokenizer.from_pretrained(str(folder)).padding_side == "left"
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    right, left = (FederatedCLIPModel(str(base), 3, labels=LABELS, head="text", device="cpu")(pixels)
                   for base in (bases["siglip"], folder))
    torch.testing.assert_close(left, right, atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_two_rounds_in_process_on_each_family_and_each_head(bases, family, tmp_path):
    """The in-process round (the code the NVFlare job runs) on the family's base: a linear head with LoRA on the image
    tower under DP-SGD (per-sample gradients through SigLIP's attention-pooling head), and the text head with LoRA on
    both towers (SigLIP's text head named as a target too); the global adapter has the skeleton's keys (what
    the server computes from the config alone) and moved."""
    data = write_digits(tmp_path / "data", 2, 40, 0)
    dp = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "sampling": "reproducible"}
    for head, targets, modules in (("linear", ["vision", "classifier"], None),
                                   ("text", ["vision", "text"], ["q_proj", "v_proj"] + ["head"] * (family == "siglip"))):
        settings = JobSettings(model=bases[family], num_rounds=2, head=head, data=str(data[0].parent / "{site}"),
                               target_components=targets, target_modules=modules, r=4, lora_alpha=8,
                               dp=dp if head == "linear" else None,
                               labels=["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                       "nine"] if head == "text" else None)
        fed = Federation(settings, sites=["site-1", "site-2"])
        start = {k: v.copy() for k, v in fed.global_adapter.items()}
        history = fed.run()
        assert len(history) == 2 and all(np.isfinite(list(r.train_loss.values())).all() for r in history), history
        shapes = adapter_shapes(bases[family], 10, settings.lora_config(), include_text=head == "text")
        assert {k: v.shape for k, v in fed.global_adapter.items()} == shapes
        assert any(not np.array_equal(fed.global_adapter[k], start[k]) for k in shapes if "lora_B" in k)
        if family == "siglip":  # the attention-pooling image head takes no LoRA, whatever the names
            assert not [k for k in shapes if ".vision_model.head." in k]


def _train_and_save(base: str, ws: Path, head: str) -> Path:
    labels = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    fed = FederatedCLIPModel(base, 10, labels=labels if head == "text" else None, head=head, device="cpu")
    wrapper = CLIPLoRAWrapper(fed, LoRAConfig(r=4, lora_alpha=8, target_components=["vision", "classifier"]
                                              if head == "linear" else ["vision"]))
    wrapper.apply_lora_to_federated_model()
    torch.manual_seed(0)
    train_local(wrapper.model, load_digits_dataset(preprocessing_for(base)), epochs=3, batch_size=32, lr=1e-2, seed=0)
    save_adapter_dir(ws / "server/simulate_job/app_server/adapter/best", fed.get_parameters(),
                     wrapper.peft_model.peft_config["default"], model_metadata(fed, {"round": 1}))
    return ws


@pytest.mark.parametrize("family, head, int8", [("siglip", "text", False), ("metaclip_2", "linear", True)])
def test_the_export_of_each_family_is_verified_and_served_by_its_own_scoring(bases, family, head, int8, tmp_path):
    """python -m exporters.onnx on an adapter of the family trained 3 epochs on the digits: the image tower (a SigLIP
    text head baked in with its logit_bias), the text tower (--with-text), fp16 variants and, with --quantize int8,
    the image tower's int8 verified (its gate needs a trained model's margins: after 10 steps a random tiny base's
    int8 agreed on 97% of the top-1s), a Triton repository. The random text tower's int8 fails its gate (its class
    embeddings lie too close together) and is left out, the export saying so and exiting 1, as it does for any
    variant that fails. predict --labels (tokenizers + ONNX Runtime, no torch) scores as the family does: SigLIP
    each class's own sigmoid (a label added leaves the others' probabilities as they were), MetaCLIP 2 a softmax."""
    ws = _train_and_save(bases[family], tmp_path / "ws", head)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = export_main([str(ws), *(["--quantize", "int8"] if int8 else []), "--fp16", "--with-text",
                            "--verify-samples", "256", "--triton", str(ws / "triton")])
    report = json.loads((ws / "onnx/export_report.json").read_text())
    assert report["family"] == family
    if int8:
        assert code == 1 and set(report["files"]) == {"fp32", "int8", "fp16", "text", "text_fp16"}, out.getvalue()
        assert re.search(r"text_int8 .*NOT WRITTEN: job_labels: top-1 agreement", out.getvalue()), out.getvalue()
    else:
        assert code == 0 and set(report["files"]) == {"fp32", "fp16", "text", "text_fp16"}, out.getvalue()
    own = ImageClassifier(ws / "onnx")  # the model's own head: a SigLIP text head, baked in, keeps its sigmoids
    assert report["scoring"] == own.scoring == ("sigmoid" if head == "text" else "softmax")
    text_spec = json.loads((ws / "onnx/text.json").read_text())
    assert text_spec["scoring"] == ("sigmoid" if family == "siglip" else "softmax")
    assert text_spec["pad_to_max_length"] == text_spec["lowercase"] == (family == "siglip")
    assert (ws / "triton/clip_lora_text/text.json").is_file() and (ws / "triton/clip_lora_fp32/config.pbtxt").is_file()

    images = [(np.random.RandomState(i).rand(32, 32, 3) * 255).astype(np.uint8) for i in range(4)]
    served = ImageClassifier(ws / "onnx", labels=LABELS).probabilities(images)
    rebuilt = rebuild(ws / "server/simulate_job/app_server/adapter/best", include_text=True)
    model = rebuilt.unmerged.eval()  # PyTorch: the trained image tower with its LoRA layers, the text tower
    pixels = torch.stack([rebuilt.preprocessing(im) for im in images])
    with torch.no_grad():
        classes = model.embed_labels(AutoTokenizer.from_pretrained(bases[family]), LABELS, [TEMPLATE])
        image = model.image_embeds(pixels)
        logits = model.score(image / image.norm(dim=-1, keepdim=True), classes).numpy()
    expected = 1 / (1 + np.exp(-logits)) if family == "siglip" else np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(served, expected, atol=1e-4)
    more = ImageClassifier(ws / "onnx", labels=LABELS + ["truck"]).probabilities(images)
    if family == "siglip":
        np.testing.assert_allclose(more[:, :3], served, atol=1e-6)
    else:
        np.testing.assert_allclose(more.sum(1), 1, atol=1e-5)


def test_a_base_of_an_unsupported_family_is_refused_naming_its_type_and_the_supported_ones(bases, tmp_path):
    """config.json of another model_type: refused where the base is first read (the server's skeleton, a site's
    model), naming its model_type and the supported ones; SigLIP 2's NaFlex checkpoints (model_type siglip2) with the
    reason and what to use instead."""
    for model_type, reason in (("blip", "not supported"), ("siglip2", "NaFlex")):
        folder = tmp_path / model_type
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
        for build in (lambda: adapter_skeleton(str(folder), 2, LoRAConfig()), lambda: FederatedCLIPModel(str(folder), 2)):
            with pytest.raises(FamilyError, match=f"'{model_type}' model.*{reason}.*'clip'.*'siglip'.*'metaclip_2'"):
                build()
    assert issubclass(FamilyError, ModelNotFoundError)
    assert sample_data.FAMILIES == tuple(families.FAMILIES)  # the random-base writer knows them all
    wrapper = quick_clip_lora("tiny-clip", 2, 2)  # the exporter told to use such a base: exit 2 and the reason
    ws = tmp_path / "ws"
    save_adapter_dir(ws / "server/simulate_job/app_server/adapter/best", wrapper.model.get_parameters(),
                     wrapper.peft_model.peft_config["default"], model_metadata(wrapper.model, {"round": 1}))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        assert export_main([str(ws), "--model", str(tmp_path / "siglip2")]) == 2
    assert "'siglip2' model, which is not supported: SigLIP 2's NaFlex" in out.getvalue(), out.getvalue()


def test_a_siglip_base_without_its_tokenizer_json_is_refused_under_the_text_head(bases, tmp_path):
    """A SigLIP (1) checkpoint ships its tokenizer as a SentencePiece model only: the text head (and serving) read
    tokenizer.json, so it is refused at set-up, saying so and what to do; a linear head needs no tokenizer."""
    folder = tmp_path / "siglip"
    shutil.copytree(bases["siglip"], folder)
    (folder / "tokenizer.json").unlink()
    (folder / "spiece.model").write_bytes(b"sentencepiece")
    with pytest.raises(HeadError, match="only a SentencePiece model \\(spiece.model\\), no tokenizer.json.*"
                                        "use a linear head"):
        FederatedCLIPModel(str(folder), 2, labels=["cat", "dog"], head="text")
    assert FederatedCLIPModel(str(folder), 2).model.family.name == "siglip"
