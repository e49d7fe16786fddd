"""The core library, with real transformers and PEFT models (the tiny preset), no mocks."""

import json
import re

import numpy as np
import pytest
import torch

from nvflare_lora import (CLIPLoRAWrapper, FederatedCLIPModel, LoRAConfig, LoRAConfigManager, LoRAModelManager,
                          ModelNotFoundError, adapter_shapes, quick_clip_lora)
from nvflare_lora.adapter import AdapterMismatchError
from nvflare_lora.checkpoint import CheckpointError, locate_checkpoint
from nvflare_lora.data import load_digits_dataset, site_split
from nvflare_lora.models import save_preset
from nvflare_lora.training import train_local


@pytest.fixture(scope="module")
def digits():
    fed = FederatedCLIPModel("tiny-clip", 10)
    return load_digits_dataset(fed.preprocess)


def _batch(n=16, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def _perturb_adapter(fed, scale=0.05, seed=1):
    rng = np.random.default_rng(seed)
    fed.set_parameters({k: v + scale * rng.standard_normal(v.shape).astype(np.float32)
                        for k, v in fed.get_parameters().items()})


def test_wrapped_parameters_are_adapter_only():
    w = quick_clip_lora("tiny-clip", num_classes=10, lora_r=4)
    params = w.model.get_parameters()
    assert params, "adapter must not be empty"
    for k in params:
        assert ".lora_A." in k or ".lora_B." in k or ".classifier." in k, k
    assert any("lora_A" in k for k in params) and "base_model.model.classifier.weight" in params
    # only q and v projections of the image tower, at rank 4
    lora_keys = [k for k in params if "lora_" in k]
    assert all(("q_proj" in k or "v_proj" in k) and "vision_model" in k for k in lora_keys)
    assert all(params[k].shape[0] == 4 for k in lora_keys if "lora_A" in k)
    # the trainable tensors are exactly the exchanged ones
    assert w.model.parameter_counts()["trainable"] == sum(v.size for v in params.values())


def test_set_get_round_trip_exact_and_strict():
    fed = quick_clip_lora("tiny-clip", 10, 4).model
    rng = np.random.default_rng(0)
    new = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in fed.get_parameters().items()}
    fed.set_parameters(new)
    got = fed.get_parameters()
    assert all(np.array_equal(got[k], new[k]) for k in new)

    before = fed.get_parameters()
    k0 = sorted(new)[0]
    bad = dict(new)
    bad["base_model.model.vision_model.embeddings.patch_embedding.weight"] = np.zeros((64, 3, 8, 8), np.float32)
    with pytest.raises(AdapterMismatchError, match="unexpected 1 key"):
        fed.set_parameters(bad)
    missing = {k: v for k, v in new.items() if k != k0}
    with pytest.raises(AdapterMismatchError, match="missing 1 key"):
        fed.set_parameters(missing)
    wrong = dict(new)
    wrong[k0] = np.zeros((3, 3), np.float32)
    with pytest.raises(AdapterMismatchError, match=k0.replace(".", r"\.")):
        fed.set_parameters(wrong)
    nan = {k: v * 0 for k, v in new.items()}
    nan[k0] = np.full(new[k0].shape, np.nan, np.float32)
    with pytest.raises(AdapterMismatchError, match="NaN or Inf"):
        fed.set_parameters(nan)
    # nothing was loaded by any refused call
    after = fed.get_parameters()
    assert all(np.array_equal(after[k], before[k]) for k in before)


def test_disabled_lora_equals_base_and_merge_equals_unmerged():
    fed = FederatedCLIPModel("tiny-clip", 10)
    x = _batch()
    base_out = fed(x).clone()
    w = CLIPLoRAWrapper(fed, LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.0))
    w.apply_lora_to_federated_model()
    _perturb_adapter(fed)
    lora_out = fed(x).clone()
    assert not torch.allclose(lora_out, base_out, atol=1e-4), "a perturbed adapter must change the output"
    w.disable_lora_layers()
    assert torch.allclose(fed(x), base_out, atol=1e-6)
    w.enable_lora_layers()
    assert torch.allclose(fed(x), lora_out, atol=1e-6)
    merged = w.merge_and_unload()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    merged.eval()
    with torch.no_grad():
        assert (merged(x) - lora_out).abs().max().item() < 1e-5


def test_gradient_checkpointing_gives_same_gradients():
    x, y = _batch(8), torch.arange(8) % 10

    def grads(checkpointing):
        fed = FederatedCLIPModel("tiny-clip", 10)
        w = CLIPLoRAWrapper(fed, LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.0))
        w.apply_lora_to_federated_model()
        _perturb_adapter(fed)
        if checkpointing:
            w.enable_gradient_checkpointing()
        fed.model.train()
        loss = torch.nn.functional.cross_entropy(fed.model(x), y)
        loss.backward()
        return {n: p.grad.clone() for n, p in fed.model.named_parameters() if p.requires_grad}

    a, b = grads(False), grads(True)
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_quick_clip_lora_is_used_like_a_federated_clip_model_as_the_seed_documents(digits, tmp_path):
    """The seed's README: model = quick_clip_lora(...), then model.get_parameters() / set_parameters /
    train_step / evaluate, and the same object goes to LoRAModelManager and the wrapper methods."""
    model = quick_clip_lora(model_name="tiny-clip", num_classes=10, lora_r=16)
    params = model.get_parameters()
    assert params.keys() == model.model.get_parameters().keys() and all("lora_" in k or "classifier" in k for k in params)
    data, labels = digits.batch(range(64))
    before = model.evaluate(data, labels)
    losses = [model.train_step(data, labels) for _ in range(20)]
    after = model.evaluate(data, labels)
    assert losses[-1] < losses[0] and after["loss"] < before["loss"]
    trained = model.get_parameters()
    model.set_parameters(params)
    assert model.evaluate(data, labels) == before
    model.set_parameters(trained)
    assert model(data[:3]).shape == (3, 10) and model.preprocess.size == 32 and model.is_lora
    path = LoRAModelManager(tmp_path).save_model(model, "seed")
    again = quick_clip_lora("tiny-clip", 10, 16)
    LoRAModelManager(tmp_path).load_model("seed", again)
    assert again.evaluate(data, labels) == after and (path / "adapter_model.safetensors").is_file()
    model.disable_lora_layers()
    model.enable_lora_layers()
    assert model.evaluate(data, labels) == after
    with pytest.raises(AttributeError, match="no_such_thing"):
        model.no_such_thing


def test_model_manager_round_trip_and_plain_peft_load(tmp_path):
    from peft import PeftModel

    from nvflare_lora.models import build_classifier

    w = quick_clip_lora("tiny-clip", 10, 4)
    _perturb_adapter(w.model)
    x = _batch()
    out = w.model(x).clone()
    mgr = LoRAModelManager(tmp_path)
    path = mgr.save_model(w, "run1", metrics={"accuracy": 0.5})
    assert (path / "adapter_model.safetensors").is_file() and (path / "adapter_config.json").is_file()
    info = mgr.get_model_info("run1")
    assert info["base_model"] == "tiny-clip" and info["labels"] == [str(i) for i in range(10)]
    assert info["adapter_bytes"] == sum(v.nbytes for v in w.model.get_parameters().values())
    assert info["preprocessing"]["size"] == 32 and "preset_sha256" in info["base_fingerprint"]
    assert mgr.list_models() == ["run1"]

    w2 = quick_clip_lora("tiny-clip", 10, 4)
    assert not torch.allclose(w2.model(x), out)
    mgr.load_model("run1", w2)
    assert torch.equal(w2.model(x), out)

    base, _ = build_classifier("tiny-clip", 10)
    peft_model = PeftModel.from_pretrained(base, str(path)).eval()
    with torch.no_grad():
        assert torch.allclose(peft_model(x), out, atol=1e-6)


def test_model_manager_refuses_other_rank_and_corrupt_file(tmp_path):
    w = quick_clip_lora("tiny-clip", 10, 4)
    mgr = LoRAModelManager(tmp_path)
    path = mgr.save_model(w, "r4")
    w8 = quick_clip_lora("tiny-clip", 10, 8)
    with pytest.raises(AdapterMismatchError, match=r"shape \(4, 64\), the model expects \(8, 64\)"):
        mgr.load_model("r4", w8)
    (path / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        mgr.load_model("r4", w)
    with pytest.raises(FileNotFoundError, match="no adapter named 'nope'"):
        mgr.load_model("nope", w)


def test_model_manager_refuses_adapter_of_another_base(tmp_path):
    d = save_preset("tiny-clip", tmp_path / "base")
    # same shapes, other weights: a different base
    from safetensors.torch import load_file, save_file

    sd = load_file(str(d / "model.safetensors"))
    sd["visual_projection.weight"] = sd["visual_projection.weight"] * 2
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    w_other = quick_clip_lora(str(d), 10, 4)
    mgr = LoRAModelManager(tmp_path / "adapters")
    mgr.save_model(w_other, "other")
    w = quick_clip_lora("tiny-clip", 10, 4)
    with pytest.raises(CheckpointError, match="another base.*weights_sha256"):
        mgr.load_model("other", w)


def test_local_directory_model_loads_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = save_preset("tiny-clip", tmp_path / "clip")
    (d / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32},
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}))
    a = FederatedCLIPModel("tiny-clip", 10)
    b = FederatedCLIPModel(str(d), 10)
    x = _batch()
    assert torch.equal(a(x), b(x)), "the saved directory must give the preset's exact base"
    assert b.preprocess.size == 40 and b.preprocess.crop_size == 32 and b.preprocess.mean == (0.5, 0.5, 0.5)
    img = (np.random.default_rng(0).random((50, 60, 3)) * 255).astype(np.uint8)
    assert tuple(b.preprocess(img).shape) == (3, 32, 32)


def test_unknown_model_names_the_three_ways(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as e:
        FederatedCLIPModel("no-such-owner/no-such-clip", 10)
    msg = str(e.value)
    assert "presets" in msg and "local directory" in msg and "hub id" in msg
    assert "tiny-clip" in msg and "save_pretrained" in msg


def test_directory_with_only_pickled_weights_is_refused(tmp_path):
    d = save_preset("tiny-clip", tmp_path / "clip")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(ModelNotFoundError, match="pickled weights are not loaded"):
        FederatedCLIPModel(str(d), 10)


@pytest.mark.parametrize("kwargs, match", [
    ({"r": 0}, "positive integer"),
    ({"r": -2}, "positive integer"),
    ({"lora_alpha": 0}, "lora_alpha must be > 0"),
    ({"lora_dropout": 1.0}, r"\[0, 1\)"),
    ({"lora_dropout": -0.1}, r"\[0, 1\)"),
    ({"target_components": ["vision", "decoder"]}, "unknown LoRA target component 'decoder'"),
    ({"bias": "some"}, "bias must be 'none'"),
    ({"bias": "all"}, "bias must be 'none', got 'all'.*server never loads"),
    ({"bias": "lora_only"}, "bias must be 'none', got 'lora_only'"),
    ({"save_only_trainable": False}, "save_only_trainable must be True.*frozen base never leaves a site"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**kwargs)


def test_config_truth_holds_on_assignment_too():
    """The original module's README sets `lora_config.save_only_trainable = True` after construction."""
    cfg = LoRAConfig.for_clip_model(r=16)
    cfg.save_only_trainable = True  # as the seed README does: fine, and what happens anyway
    with pytest.raises(ValueError, match="save_only_trainable must be True"):
        cfg.save_only_trainable = False
    with pytest.raises(ValueError, match="bias must be 'none'"):
        cfg.bias = "all"
    assert cfg.save_only_trainable is True and cfg.bias == "none"


def test_unknown_target_module_lists_valid_names():
    fed = FederatedCLIPModel("tiny-clip", 10)
    with pytest.raises(ValueError, match=r"\['q_proj_x'\] do not exist.*valid names are \[.*'fc1'.*'q_proj'"):
        CLIPLoRAWrapper(fed, LoRAConfig(target_modules=["q_proj_x"])).apply_lora_to_federated_model()


def test_config_presets_aliases_and_serialisation(tmp_path):
    assert (LoRAConfig.for_clip_model("small").r, LoRAConfig.for_clip_model("small").lora_alpha) == (8, 16)
    assert (LoRAConfig.for_clip_model("medium").r, LoRAConfig.for_clip_model("large").lora_alpha) == (16, 64)
    assert LoRAConfig.for_clip_model(r=4, lora_alpha=4).r == 4
    head = LoRAConfig.for_classification_head(r=4)
    assert head.target_modules == ["visual_projection"] and head.train_head
    assert LoRAConfig(target_components=["encoder", "classifier"]).target_components == ["vision", "classifier"]
    c = LoRAConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj"], target_components=["encoder"])
    assert LoRAConfig.from_yaml(c.to_yaml()) == c and LoRAConfig.from_json(c.to_json()) == c
    with pytest.raises(ValueError, match="unknown LoRA config keys"):
        LoRAConfig.from_dict({"rank": 4})
    mgr = LoRAConfigManager(tmp_path)
    mgr.save_config(c, "small-qk")
    assert mgr.load_config("small-qk") == c and mgr.list_configs() == ["small-qk"]


def test_head_preset_and_wider_targets_change_the_adapter():
    fed = FederatedCLIPModel("tiny-clip", 10)
    CLIPLoRAWrapper(fed, LoRAConfig.for_classification_head(r=4)).apply_lora_to_federated_model()
    keys = fed.get_parameters()
    assert {k for k in keys if "lora_" in k} == {"base_model.model.visual_projection.lora_A.weight",
                                                  "base_model.model.visual_projection.lora_B.weight"}
    wide = adapter_shapes("tiny-clip", 10, LoRAConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]))
    qv = adapter_shapes("tiny-clip", 10, LoRAConfig(r=4))
    assert len([k for k in wide if "lora_A" in k]) == 3 * len([k for k in qv if "lora_A" in k])


def test_skeleton_shapes_match_real_model_and_init_is_shared():
    lora = LoRAConfig(r=8, lora_alpha=16)
    shapes = adapter_shapes("tiny-clip", 10, lora)
    a = FederatedCLIPModel("tiny-clip", 10)
    CLIPLoRAWrapper(a, lora).apply_lora_to_federated_model()
    b = FederatedCLIPModel("tiny-clip", 10)
    CLIPLoRAWrapper(b, lora).apply_lora_to_federated_model()
    pa, pb = a.get_parameters(), b.get_parameters()
    assert {k: v.shape for k, v in pa.items()} == shapes
    assert all(np.array_equal(pa[k], pb[k]) for k in pa), "every party must start from the same adapter"
    assert all(not pa[k].any() for k in pa if "lora_B" in k)


@pytest.mark.parametrize("case", ["tiny-qv", "tiny-text-all", "vitb32-head-only-tower", "siglip-all", "metaclip2-qv"])
def test_the_adapter_from_the_config_alone_is_what_peft_makes_of_the_built_model(case, tmp_path):
    """adapter_skeleton (what the server uses: the base's config, no network, no peft) against PEFT on the model
    built on the meta device: the same keys in the same order, the same shapes, and an adapter_config.json that
    PEFT reads back as the config it makes itself."""
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPConfig, MetaClip2Config, SiglipConfig

    from nvflare_lora.skeleton import adapter_config, adapter_skeleton
    from nvflare_lora.base_model import linear_layers, load_clip_config, resolve_model
    from nvflare_lora.lora_model import adapter_state, peft_config
    from nvflare_lora.models import CLIPImageClassifier

    model, lora, include_text = {
        "tiny-qv": ("tiny-clip", LoRAConfig(r=4, lora_alpha=8), False),
        "tiny-text-all": ("tiny-clip", LoRAConfig(r=2, target_components=["vision", "text", "classifier"],
                                                  target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1",
                                                                  "fc2"]), True),
        "vitb32-head-only-tower": (str(tmp_path / "vitb32"), LoRAConfig(r=8, target_components=["vision"]), False),
        # SigLIP: no projection layers (its text head is the text tower's), its attention-pooling image head takes no
        # LoRA (its out_proj and MLP are left out although "out_proj" and "fc1" are named)
        "siglip-all": (str(tmp_path / "siglip"), LoRAConfig(r=2, target_components=["vision", "text", "classifier"],
                                                            target_modules=["q_proj", "out_proj", "fc1", "head"]), True),
        "metaclip2-qv": (str(tmp_path / "metaclip2"), LoRAConfig(r=4, target_components=["vision", "text"]), True),
    }[case]
    if case.startswith("vitb32"):
        CLIPConfig().save_pretrained(str(tmp_path / "vitb32"))  # ViT-B/32's shapes; the config is all it reads
    small = dict(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  vocab_size=100), vision_config=dict(hidden_size=32, intermediate_size=48,
                                                                      num_hidden_layers=2, num_attention_heads=2,
                                                                      image_size=32, patch_size=8))
    if case.startswith("siglip"):
        SiglipConfig(**small).save_pretrained(str(tmp_path / "siglip"))
    if case.startswith("metaclip2"):
        MetaClip2Config(**small, projection_dim=24).save_pretrained(str(tmp_path / "metaclip2"))
    shapes, config = adapter_skeleton(model, 7, lora, include_text)
    cfg = load_clip_config(resolve_model(model))
    with torch.device("meta"):
        built = CLIPImageClassifier(cfg, 7, include_text=include_text or "text" in lora.towers)
    assert linear_layers(cfg, built.include_text) == {
        n: (m.in_features, m.out_features) for n, m in built.named_modules() if n in built.lora_layers()}
    assert set(built.lora_layers()) == {n for n, m in built.named_modules() if isinstance(m, torch.nn.Linear)
                                        and n != "classifier" and not n.startswith("vision_model.head.")}
    built.name_or_path = model  # as build_classifier names it
    with torch.device("meta"):
        peft_model = get_peft_model(built, peft_config(lora, built, model))
    made = adapter_state(peft_model)
    assert list(shapes) == list(made) and shapes == {k: tuple(v.shape) for k, v in made.items()}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    theirs = peft_model.peft_config["default"].to_dict()
    ours = LoraConfig.from_pretrained(str(tmp_path)).to_dict()
    assert {k: v for k, v in ours.items() if k != "inference_mode"} == \
        {k: v for k, v in theirs.items() if k != "inference_mode"}
    assert config == adapter_config({k: theirs[k] for k in config if k not in adapter_config({})})


def test_training_on_digits_beats_chance_by_far(digits):
    fed = quick_clip_lora("tiny-clip", 10, 8).model
    tr, va = site_split(digits, "site-1", 1, "iid")
    before = fed.evaluate(va)["accuracy"]
    calls = []
    stats = train_local(fed, tr, epochs=20, max_steps=300, batch_size=32, lr=3e-3, on_step=lambda s, l: calls.append(s))
    after = fed.evaluate(va)["accuracy"]
    assert stats["steps"] == 300 and calls[-1] == 300
    assert after > 0.6 and after > before + 0.3, (before, after)


def test_training_abort_is_checked_between_steps(digits):
    from nvflare_lora.training import Aborted

    fed = quick_clip_lora("tiny-clip", 10, 4).model
    n = []
    with pytest.raises(Aborted, match="after 3 steps"):
        train_local(fed, digits, epochs=1, batch_size=8, should_abort=lambda: len(n) >= 3,
                    on_step=lambda s, l: n.append(s))


def test_bundled_digits_are_sklearns_without_importing_it_or_torch():
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from nvflare_lora.sample_data import digits_arrays

    images, labels = digits_arrays()
    d = load_digits()
    assert np.array_equal(images, d.images) and np.array_equal(labels, d.target)
    # nor torch: the sample-data writer (python -m nvflare_lora.sample_data digits|elpv|mnist) starts in ~0.3 CPU-s
    code = ("import sys, nvflare_lora.sample_data as d; d.digits_arrays(); "
            "print('sklearn' in sys.modules, 'torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False False"


def test_a_preset_is_identified_by_what_generates_it_and_told_apart_from_a_directory(tmp_path, monkeypatch):
    """The server fingerprints the preset without building it (preset_sha256: config, seed, torch and transformers
    versions); a site on another torch, or with the preset saved as a directory, is told apart, naming both."""
    from nvflare_lora import base_model
    from nvflare_lora.base_model import base_fingerprint, fingerprint_difference

    server = base_fingerprint("tiny-clip")
    assert set(server) == {"model", "kind", "config_sha256", "preset_sha256"} and server == base_fingerprint("tiny-clip")
    from importlib.metadata import version

    monkeypatch.setattr(base_model, "version", lambda pkg: version(pkg).split("+")[0] + ("+cu126" if pkg == "torch" else ""))
    assert base_fingerprint("tiny-clip") == server, "a CUDA build generates the preset on the CPU alike"
    monkeypatch.setattr(base_model, "version", lambda pkg: "0.0.1" if pkg == "torch" else version(pkg))
    other_torch = base_fingerprint("tiny-clip")
    monkeypatch.undo()
    assert re.search(r"preset_sha256 \w{12}\.\.\. here vs \w{12}\.\.\. on the server",
                     fingerprint_difference(server, other_torch) or "")
    directory = base_fingerprint(str(save_preset("tiny-clip", tmp_path / "base")))
    assert directory["config_sha256"] == server["config_sha256"]  # the same shapes, so only the weights tell
    assert re.search(r"weights_sha256 \w{12}\.\.\. here \(a dir\) vs preset_sha256 \w{12}\.\.\. on the server "
                     r"\(a preset\)", fingerprint_difference(server, directory) or "")
    assert fingerprint_difference(server, base_fingerprint("tiny-clip")) is None


def test_weights_hash_cache_is_used_and_invalidated_by_a_changed_file(tmp_path):
    import os

    from nvflare_lora.base_model import resolve_model, weights_sha256

    source = resolve_model(str(save_preset("tiny-clip", tmp_path / "base")))
    cache = tmp_path / "site" / ".nvflare_lora_cache" / "weights_sha256.json"
    plain = weights_sha256(source)
    assert weights_sha256(source, cache) == plain and list(json.loads(cache.read_text()).values()) == [plain]
    stamp = next(iter(json.loads(cache.read_text())))
    cache.write_text(json.dumps({stamp: "remembered"}))
    assert weights_sha256(source, cache) == "remembered", "a hit must not read the weights again"
    weights = source.weight_files()[0]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert weights_sha256(source, cache) == weights_sha256(source) != plain


# ---- checkpoints: metadata and the one locator (persistor resume, exporter) ------------------------
def test_checkpoint_metadata_is_one_schema_that_reads_back_as_written(tmp_path):
    """model_metadata gives a CheckpointMeta; the fields a writer adds must be CheckpointMeta's (a misspelt
    one is refused, not written), and what is saved reads back as the same CheckpointMeta."""
    from nvflare_lora.checkpoint import CheckpointMeta, read_adapter_dir, save_adapter_dir
    from nvflare_lora.data import split_record
    from nvflare_lora.managers import model_metadata

    w = quick_clip_lora("tiny-clip", 10, 4)
    split = {"site-1": split_record("site-1", "digits", True, 2, "iid", 0.5, 0, 0.2)}
    meta = model_metadata(w.model, {"round": 3, "metrics": {"val_accuracy": 0.25}, "val_split": split})
    assert isinstance(meta, CheckpointMeta) and meta.base_model == "tiny-clip" and meta.labels == [str(i) for i in range(10)]
    with pytest.raises(TypeError, match="rnd"):
        model_metadata(w.model, {"rnd": 3})
    path = save_adapter_dir(tmp_path / "best", w.model.get_parameters(), w.peft_model.peft_config["default"], meta)
    _, _, saved = read_adapter_dir(path)
    assert saved["num_classes"] == 10 and saved["adapter_parameters"] == sum(v.size for v in w.model.get_parameters().values())
    assert CheckpointMeta.from_dict(saved) == CheckpointMeta.from_dict(json.loads(json.dumps(meta.to_dict())))
    assert CheckpointMeta.from_dict(saved).val_split == split


def _fake_checkpoint(directory):
    directory.mkdir(parents=True)
    (directory / "nvflare_lora.json").write_text("{}")
    (directory / "adapter_model.safetensors").write_bytes(b"")
    return directory


def test_locate_prefers_best_and_never_falls_back_silently(tmp_path):
    app = tmp_path / "ws/server/simulate_job/app_server"
    latest = _fake_checkpoint(app / "adapter/latest")
    assert locate_checkpoint(tmp_path / "ws", "latest").path == latest
    fallback = locate_checkpoint(tmp_path / "ws")  # no best yet: latest, said out loud
    assert fallback.path == latest and "no 'best' checkpoint" in fallback.note
    with pytest.raises(CheckpointError, match="no checkpoint named 'best'"):
        locate_checkpoint(tmp_path / "ws", "best")
    best = _fake_checkpoint(app / "adapter/best")
    assert locate_checkpoint(tmp_path / "ws").path == best and locate_checkpoint(tmp_path / "ws").note is None
    assert locate_checkpoint(app).path == best  # the server's app dir works too
    assert locate_checkpoint(best).path == best  # and the checkpoint itself


def test_locate_skips_half_written_dirs_prefers_the_server_and_refuses_ambiguity(tmp_path):
    _fake_checkpoint(tmp_path / "ws/server/app_server/adapter/.best.tmp-123")
    server = _fake_checkpoint(tmp_path / "ws/server/app_server/adapter/best")
    _fake_checkpoint(tmp_path / "ws/site-1/app_site-1/adapter/best")
    assert locate_checkpoint(tmp_path / "ws").path == server
    _fake_checkpoint(tmp_path / "jobs/a/best")
    _fake_checkpoint(tmp_path / "jobs/b/best")
    with pytest.raises(CheckpointError, match="2 checkpoints named 'best'"):
        locate_checkpoint(tmp_path / "jobs")
    only = _fake_checkpoint(tmp_path / "adapters/digits")  # a LoRAModelManager root with one adapter
    found = locate_checkpoint(tmp_path / "adapters")
    assert found.path == only and "only checkpoint" in found.note
