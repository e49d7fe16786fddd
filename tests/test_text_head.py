"""The text head: classes as words through the text tower, each site on its own classes (issue: CLIP stays CLIP)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nvflare_lora.base_model import _TINY_CONFIG
from nvflare_lora import CLIPLoRAWrapper, FederatedCLIPModel, LoRAConfig
from nvflare_lora.sample_data import digits_uint8
from nvflare_lora.sample_data import write_random_base

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# the tiny shapes with room for a prompt (the preset's 16 positions cut "a photo of a three." to "a photo of a t")
TEXT_CONFIG = {**_TINY_CONFIG, "text_config": {**_TINY_CONFIG["text_config"], "max_position_embeddings": 32}}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return str(write_random_base(tmp_path_factory.mktemp("base") / "tiny", 0, **TEXT_CONFIG))


def write_classes(root: Path, classes, per_class: int = 12, start: int = 0) -> Path:
    """root/<word>/NNNN.png: real digits (scikit-learn's) under class folders named as words."""
    images, labels = digits_uint8()
    for word in classes:
        folder = root / word
        folder.mkdir(parents=True)
        for i in np.flatnonzero(labels == WORDS.index(word))[start:start + per_class]:
            Image.fromarray(images[i]).save(folder / f"{int(i):04d}.png")
    return root


def clip_logits(clip, x, labels, templates, tokenizer):
    """CLIPModel's logits_per_image for each class's prompts (averaged over templates, as CLIP's zero-shot does)."""
    with torch.no_grad():
        image = clip.get_image_features(pixel_values=x)
        image = getattr(image, "pooler_output", image)
        image = image / image.norm(dim=-1, keepdim=True)
        classes = []
        for label in labels:
            tok = tokenizer([t.format(label) for t in templates], padding=True, return_tensors="pt")
            text = clip.get_text_features(**tok)
            text = getattr(text, "pooler_output", text)
            mean = (text / text.norm(dim=-1, keepdim=True)).mean(0)
            classes.append(mean / mean.norm())
        return (clip.logit_scale.exp() * image @ torch.stack(classes).T).numpy()


def test_text_head_scores_as_clip_does_before_and_after_text_lora_is_merged(base):
    from transformers import CLIPModel

    from nvflare_lora.data import load_digits_dataset
    from nvflare_lora.base_model import preprocessing_for
    from nvflare_lora.models import load_tokenizer

    labels, templates = ["zero", "one", "two", "cat"], ["a photo of a {}.", "{}"]
    fed = FederatedCLIPModel(base, 4, labels=labels, head="text", templates=templates)
    x, y = load_digits_dataset(preprocessing_for(base)).batch(range(0, 160, 5))
    y = y % 4
    tokenizer, clip = load_tokenizer(base), CLIPModel.from_pretrained(base).eval()
    assert np.abs(fed(x).cpu().numpy() - clip_logits(clip, x, labels, templates, tokenizer)).max() < 1e-5

    wrapper = CLIPLoRAWrapper(fed, LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_components=["vision", "text"],
                                              target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    wrapper.apply_lora_to_federated_model()
    assert not any("classifier" in k for k in fed.get_parameters())  # nothing exchanged depends on the labels
    assert any("text_model" in k for k in fed.get_parameters())
    for _ in range(5):
        fed.train_step(x, y)
    trained = fed(x).cpu().numpy()
    merged = wrapper.merge_and_unload()
    clip.load_state_dict({k: v for k, v in merged.state_dict().items() if not k.startswith("classifier")},
                         strict=False)
    truth = clip_logits(clip.eval(), x, labels, templates, tokenizer)
    assert np.abs(truth - clip_logits(CLIPModel.from_pretrained(base).eval(), x, labels, templates,
                                      tokenizer)).max() > 1e-3, "training moved both towers"
    assert np.abs(fed(x).cpu().numpy() - truth).max() < 1e-5
    assert np.abs(trained - truth).max() < 1e-4
    fed.set_labels(["bird", "seven"])  # any classes, at any time
    assert fed(x).shape == (len(x), 2)


def test_frozen_text_tower_encodes_the_classes_once(base, monkeypatch):
    fed = FederatedCLIPModel(base, 3, labels=["zero", "one", "two"], head="text")
    CLIPLoRAWrapper(fed, LoRAConfig(r=2, lora_alpha=4, target_components=["vision"])).apply_lora_to_federated_model()
    calls = []
    encode = fed.base_model.encode_text
    monkeypatch.setattr(fed.base_model, "encode_text", lambda *a: calls.append(1) or encode(*a))
    x, y = torch.rand(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    for _ in range(3):
        fed.train_step(x, y)
    fed.evaluate(x, y)
    assert calls == [1], "class embeddings computed once, not per step"


def test_text_head_bad_input_is_refused_at_set_up(base, tmp_path):
    from nvflare_lora.errors import NVFlareLoRAError
    from nvflare_lora.facts import JobFacts
    from nvflare_lora.settings import SettingsError, settings
    from nvflare_lora.site import Site

    for kw, message in ((dict(head="text", target_components=["vision", "classifier"]), "no trained layer"),
                        (dict(head="text", head_init="zeroshot", initial_adapter="x"), "starts a linear head"),
                        (dict(head="text", target_components=["vision", "text"],
                              dp={"max_grad_norm": 1.0, "noise_multiplier": 1.0}), "needs a frozen text tower"),
                        (dict(head="text", num_classes=2, labels=["cat", " "]), "empty or only whitespace"),
                        (dict(site_labels=["cat"]), "name 1 class")):
        with pytest.raises(SettingsError, match=message):
            settings(model=base, **kw)
    job = settings(model=base, head="text", num_rounds=1)
    one = write_classes(tmp_path / "one", ["seven"])
    cut = write_classes(tmp_path / "cut", ["three", "two"])
    for data, site_kw, facts_kw, message in (
            (one, {}, {}, r"site-1: the class folders .* name 1 class\(es\) \[.seven.\]"),
            (cut, {}, {"head": {"type": "text", "init": "text", "normalize_embeds": True,
                                "templates": ["a photo of the number {}."]}},
             r"site-1: the labels: 'three' and 'two' become the same tokens .* 16 positions"),
            (one, {"site_labels": ["one", "seven"]}, {"head": {"init": "seeded"}}, "only the text head can score")):
        facts = JobFacts.from_settings(job)
        model = base if "16" not in message else str(write_random_base(tmp_path / "b16", 0, **_TINY_CONFIG))
        facts = facts.with_(model=model, **facts_kw)
        with pytest.raises(NVFlareLoRAError, match=message):
            Site("site-1", facts, job.replace(data=str(data), model=model, **site_kw))
    with pytest.raises(NVFlareLoRAError, match="'tiny-clip' is a built-in preset without a tokenizer"):
        Site("site-1", JobFacts.from_settings(job).with_(model="tiny-clip"), job.replace(model="tiny-clip"))


def test_sites_with_their_own_classes_train_evaluate_and_export_in_the_simulator(base, tmp_path):
    """Two sites with different, overlapping class folders (site-1: zero one two, site-2: two three four), the
    text head with LoRA on both towers: each site trains and is evaluated on its own classes, the checkpoint's
    labels are the union they announced, cross-site evaluation scores each site on its own classes, and the
    export verifies on that union."""
    from nvflare_lora.testing.simulator import cross_site_results, make_job, run_simulator, server_app_dir

    from exporters.onnx.__main__ import main as export_main

    data = tmp_path / "data"
    write_classes(data / "site-1", ["zero", "one", "two"])
    write_classes(data / "site-2", ["two", "three", "four"], start=12)
    job = make_job(tmp_path / "text_job", model=base, head="text", target_components=["vision", "text"],
                   num_rounds=2, num_sites=2, data=str(data / "{site}"), batch_size=8, local_epochs=1,
                   prompt_templates=["a photo of the number {}."])
    ws = tmp_path / "ws"
    proc = run_simulator(job, ws, n=2, threads=2)
    log = (ws / "simulator_output.txt").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert "site-1: " in log and "classes as text: ['one', 'two', 'zero']" in log
    assert "classes as text: ['four', 'three', 'two']" in log
    meta = json.loads((server_app_dir(ws) / "adapter" / "best" / "nvflare_lora.json").read_text())
    assert meta["labels"] == ["one", "two", "zero", "four", "three"] and meta["head"]["type"] == "text"
    assert {s: split["labels"] for s, split in meta["val_split"].items()} == {
        "site-1": ["one", "two", "zero"], "site-2": ["four", "three", "two"]}
    results = cross_site_results(ws)
    assert set(results) == {"site-1", "site-2"}
    for site in results.values():
        assert all("val_accuracy" in m for m in site.values())
    out = tmp_path / "onnx"
    assert export_main([str(ws), "--out", str(out), "--verify-samples", "32", "--with-text"]) == 0
    report = json.loads((out / "export_report.json").read_text())
    assert report["labels"] == meta["labels"] and not report["failed"]
    assert re.search("text", json.dumps(report["verification"]["text"]["prompts"]))


def test_a_saved_text_head_exports_and_wise_0_is_clips_zero_shot_model(base, tmp_path):
    """LoRAModelManager saves a text-head model trained on both towers; the exporter bakes its class embeddings into
    a linear head (verified against the unmerged model), --wise 0 gives CLIP's zero-shot logits on those labels."""
    from transformers import CLIPModel

    from exporters.onnx.__main__ import main as export_main
    from exporters.onnx.session import open_session
    from nvflare_lora import LoRAModelManager
    from nvflare_lora.data import load_digits_dataset
    from nvflare_lora.base_model import preprocessing_for
    from nvflare_lora.models import load_tokenizer

    labels, templates = ["zero", "one", "two"], ["the number {}."]
    fed = FederatedCLIPModel(base, 3, labels=labels, head="text", templates=templates)
    wrapper = CLIPLoRAWrapper(fed, LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                              target_components=["vision", "text"]))
    wrapper.apply_lora_to_federated_model()
    x, y = load_digits_dataset(preprocessing_for(base)).batch(range(0, 90, 3))
    for _ in range(5):
        fed.train_step(x, y % 3)
    saved = LoRAModelManager(tmp_path / "adapters").save_model(wrapper, "text")
    out = tmp_path / "onnx"
    assert export_main([str(saved), "--out", str(out), "--wise", "0,1", "--verify-samples", "32"]) == 0
    logits = {a: open_session(out / f"wise_{a}" / "model.onnx").run(["logits"], {"pixel_values": x.numpy()})[0]
              for a in ("0", "1")}
    for a in ("0", "1"):
        assert json.loads((out / f"wise_{a}" / "labels.json").read_text()) == labels
    zero_shot = clip_logits(CLIPModel.from_pretrained(base).eval(), x, labels, templates, load_tokenizer(base))
    assert np.abs(logits["0"] - zero_shot).max() < 1e-4
    assert np.abs(logits["1"] - fed(x).cpu().numpy()).max() < 1e-4
    assert np.abs(logits["1"] - logits["0"]).max() > 1e-2


def test_dp_sgd_trains_the_text_head_with_its_frozen_text_tower(base, tmp_path):
    """DP-SGD's per-sample gradients (torch.func) run through the text head: the class embeddings are computed
    once, outside the transform, and the sites' own classes hold under Poisson sampling."""
    from nvflare_lora.round import Federation
    from nvflare_lora.settings import settings

    write_classes(tmp_path / "site-1", ["zero", "one", "two"])
    write_classes(tmp_path / "site-2", ["two", "three"], start=12)
    job = settings(model=base, head="text", num_rounds=1, num_sites=2, batch_size=8, local_epochs=1, max_steps=3,
                   data=str(tmp_path / "{site}"), dp={"max_grad_norm": 1.0, "noise_multiplier": 1.0})
    fed = Federation(job)
    before = {k: v.copy() for k, v in fed.global_adapter.items()}
    result = fed.run()[0]
    assert not result.refused and all(result.steps.values())
    assert [s.fed.labels for s in fed.sites] == [["one", "two", "zero"], ["three", "two"]]
    assert any(np.abs(fed.global_adapter[k] - before[k]).max() > 0 for k in before if "lora_B" in k)
