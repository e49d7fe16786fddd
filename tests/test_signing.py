"""Signed checkpoints and exports with real NVFlare-provisioned kits (nvflare_lora.signing, nvflare_lora.checkpoint,
exporters/onnx): what each reader refuses, attack by attack. The kits are two projects provisioned by `nvflare
provision` (deploy/project.yml, as the POC test provisions it; no process is started here). The same checks against
the running POC's own signed checkpoints: tests/test_poc.py."""

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from exporters.onnx.__main__ import main as export_main
from exporters.onnx.predict import REPORT_SIGNATURE_FILE, ImageClassifier
from exporters.onnx.predict import main as predict_main
from nvflare_lora import LoRAModelManager, quick_clip_lora
from nvflare_lora.checkpoint import (MANIFEST_FILE, SIGNATURE_FILE, CheckpointError, open_checkpoint,
                                     save_adapter_dir, verify_checkpoint)
from nvflare_lora.managers import model_metadata
from nvflare_lora.signing import SignatureError, Signer, TrustRoot, kit_above
from nvflare_lora.testing.simulator import ROOT
from support.poc import provision


@pytest.fixture(scope="module")
def projects(tmp_path_factory):
    """Two provisioned projects: ours (server and site-1) and another one, made the same way."""
    ours = provision(tmp_path_factory.mktemp("ours"), ["site-1"])
    other = provision(tmp_path_factory.mktemp("other"), ["site-1"])
    return ours, other


@pytest.fixture(scope="module")
def wrapper():
    return quick_clip_lora("tiny-clip", 10, 4)


def _save(wrapper, directory, signer=None):
    peft_config = wrapper.peft_model.peft_config["default"]
    return save_adapter_dir(directory, wrapper.model.get_parameters(), peft_config, model_metadata(wrapper.model),
                            signer=signer)


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_a_server_signed_checkpoint_verifies_against_the_project_and_nothing_else(projects, wrapper, tmp_path):
    ours, other = projects
    ckpt = _save(wrapper, tmp_path / "best", Signer.from_kit(ours.server))
    record = json.loads((ckpt / SIGNATURE_FILE).read_text())
    assert record["signer"] == "localhost" and record["scheme"] == "rsa-pss-sha256"
    # any kit of the project, or its rootCA.pem, is the trust root
    for root in (ours.site("site-1"), ours.admin_kit / "startup" / "rootCA.pem"):
        opened = open_checkpoint(ckpt, TrustRoot(root))
        assert opened.verified == "signed by 'localhost' of project 'clip_lora_federation'"
        assert set(opened.state) == set(wrapper.model.get_parameters())
    # another project's root did not issue the signer's certificate
    with pytest.raises(CheckpointError, match="whose certificate was not issued by project"):
        open_checkpoint(ckpt, TrustRoot(other.site("site-1")))
    # a signature read without a trust root would go unchecked: refused, saying how to give one
    with pytest.raises(CheckpointError, match=r"is signed \(by 'localhost'\).*--trust ROOT"):
        open_checkpoint(ckpt)
    assert "its signature NOT checked" in open_checkpoint(ckpt, allow_unverified=True).verified


def test_each_tampering_of_a_signed_checkpoint_is_refused_with_its_reason(projects, wrapper, tmp_path):
    """lora_alpha changed (in nvflare_lora.json, in adapter_config.json), a tensor swapped, the manifest removed,
    the manifest re-hashed after a change, the signature removed, a file added, and a checkpoint re-signed with
    another project's kit: each refused by the reader (open_checkpoint: resume, cross-site evaluation,
    LoRAModelManager and the exporter read through it; the persistor and the exporter: test_export.py, the POC)."""
    ours, other = projects
    trust = TrustRoot(ours.admin_kit)
    good = _save(wrapper, tmp_path / "good", Signer.from_kit(ours.server))

    def tampered(name, change):
        ckpt = shutil.copytree(good, tmp_path / name)
        change(ckpt)
        return ckpt

    def swap_tensors(ckpt):
        state = load_file(str(ckpt / "adapter_model.safetensors"))
        a, b = sorted(k for k in state if ".lora_A." in k)[:2]
        state[a], state[b] = state[b], state[a]
        save_file(state, str(ckpt / "adapter_model.safetensors"))

    def rehash(ckpt):  # the attacker edits lora_alpha and writes a matching manifest: only the signature stops it
        meta = json.loads((ckpt / "nvflare_lora.json").read_text())
        meta["lora_config"]["lora_alpha"] = 64.0
        (ckpt / "nvflare_lora.json").write_text(json.dumps(meta))
        manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
        manifest["files"]["nvflare_lora.json"] = hashlib.sha256((ckpt / "nvflare_lora.json").read_bytes()).hexdigest()
        (ckpt / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))

    def resign_other(ckpt):
        (ckpt / SIGNATURE_FILE).write_text(json.dumps(Signer.from_kit(other.server).sign(
            (ckpt / MANIFEST_FILE).read_bytes())))

    meta_alpha = lambda c: _edit_json(c / "nvflare_lora.json",  # noqa: E731
                                      lora_config={**json.loads((c / "nvflare_lora.json").read_text())["lora_config"],
                                                   "lora_alpha": 64.0})
    cases = {
        "alpha_meta": (meta_alpha, "nvflare_lora.json does not match the sha256 in its manifest"),
        "alpha_peft": (lambda c: _edit_json(c / "adapter_config.json", lora_alpha=64),
                       "adapter_config.json does not match the sha256 in its manifest"),
        "swapped": (swap_tensors, "does not match the sha256 in its manifest"),
        "no_manifest": (lambda c: (c / MANIFEST_FILE).unlink(), "has no manifest"),
        "rehashed": (rehash, "does not match the content: it was changed after it was signed"),
        "unsigned": (lambda c: (c / SIGNATURE_FILE).unlink(), "is not signed"),
        "added": (lambda c: (c / "adapter_model.bin").write_bytes(b"x"), "adapter_model.bin is not listed"),
        "other_project": (resign_other, "was not issued by project 'clip_lora_federation'"),
    }
    for name, (change, reason) in cases.items():
        ckpt = tampered(name, change)
        with pytest.raises(CheckpointError, match=reason):
            open_checkpoint(ckpt, trust)
    # the swap names the tensor (nvflare_lora.json's tensor manifest); allow_unverified passes a missing manifest or
    # signature, never a contradiction
    with pytest.raises(CheckpointError, match=r"tensor '.*lora_A.*' does not match the sha256"):
        open_checkpoint(tmp_path / "swapped", trust, allow_unverified=True)
    assert "NOT verified" in open_checkpoint(tmp_path / "no_manifest", trust, allow_unverified=True).verified
    assert "NOT signed" in open_checkpoint(tmp_path / "unsigned", trust, allow_unverified=True).verified
    with pytest.raises(CheckpointError, match="changed after it was signed"):
        open_checkpoint(tmp_path / "rehashed", trust, allow_unverified=True)
    # PeftModel users' check: the command, with the project's root; exit 1 and the reason for a tampered one
    run = lambda *a: subprocess.run([sys.executable, "-m", "nvflare_lora.checkpoint", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True, cwd=tmp_path)
    ok = run(good, "--trust", ours.admin_kit / "startup" / "rootCA.pem")
    assert ok.returncode == 0 and "signed by 'localhost' of project" in ok.stdout, ok.stderr
    bad = run(tmp_path / "alpha_peft", "--trust", ours.admin_kit)
    assert bad.returncode == 1 and "adapter_config.json does not match" in bad.stderr


def test_a_checkpoint_inside_a_kit_is_checked_against_that_kit_and_the_manager_takes_a_trust_root(projects, wrapper,
                                                                                                   tmp_path):
    """A provisioned server keeps its jobs under its kit folder: readers find the trust root there without being
    told (LoRAModelManager, verify_checkpoint, the exporter), so an unsigned checkpoint there is refused."""
    ours, _ = projects
    root = ours.server / "jobs-of-the-server"
    manager = LoRAModelManager(root)
    manager.save_model(wrapper, "unsigned")
    assert kit_above(root / "unsigned") == ours.server
    with pytest.raises(CheckpointError, match="is not signed"):
        manager.load_model("unsigned", wrapper)
    assert "NOT signed" in verify_checkpoint(root / "unsigned", allow_unverified=True)
    _save(wrapper, root / "signed", Signer.from_kit(ours.server))
    assert manager.load_model("signed", wrapper)["num_classes"] == 10
    outside = LoRAModelManager(tmp_path / "adapters")
    shutil.copytree(root / "signed", tmp_path / "adapters" / "signed")
    with pytest.raises(CheckpointError, match="--trust ROOT"):
        outside.load_model("signed", wrapper)
    assert outside.load_model("signed", wrapper, trust=ours.site("site-1"))["num_classes"] == 10


def test_a_bad_key_or_trust_root_is_named(projects, tmp_path):
    ours, _ = projects
    with pytest.raises(SignatureError, match="cannot be read"):
        TrustRoot(tmp_path / "missing.pem")
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(SignatureError, match="is not a PEM certificate"):
        TrustRoot(tmp_path / "bad.pem")
    with pytest.raises(SignatureError, match="holds no participant key and certificate"):
        Signer.from_kit(tmp_path)
    kit = shutil.copytree(ours.site("site-1") / "startup", tmp_path / "kit" / "startup")
    shutil.copy(ours.server / "startup" / "server.crt", kit / "client.crt")  # another participant's certificate
    with pytest.raises(SignatureError, match="is not the RSA key of"):
        Signer.from_kit(tmp_path / "kit")


def test_a_signed_export_serves_with_trust_and_an_edited_rehashed_report_is_refused(projects, wrapper, tmp_path,
                                                                                   capsys):
    """The exporter signs export_report.json with a site's kit (--sign); `predict --trust ROOT` serves it, and
    refuses: the report edited and a file re-hashed into it, an unsigned export, another project's root."""
    from exporters.onnx.triton import write_repository

    ours, other = projects
    ckpt = _save(wrapper, tmp_path / "run" / "best", Signer.from_kit(ours.server))
    out = tmp_path / "onnx"
    assert export_main([str(ckpt), "--out", str(out), "--verify-samples", "8", "--trust", str(ours.admin_kit),
                        "--sign", str(ours.site("site-1"))]) == 0, capsys.readouterr().err[-2000:]
    said = capsys.readouterr().out
    assert "checkpoint verified: signed by 'localhost' of project 'clip_lora_federation'" in said, said
    report = json.loads((out / "export_report.json").read_text())
    assert report["signed_by"] == "site-1" and report["source_verified"].startswith("signed by 'localhost'")
    photos = tmp_path / "photos"
    photos.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photos / "a.png")
    assert predict_main([str(out), str(photos), "--trust", str(ours.admin_kit / "startup" / "rootCA.pem")]) == 0
    assert ImageClassifier(out, trust=ours.server).verified == "signed by 'site-1' of project 'clip_lora_federation'"
    # the attack: labels.json changed and its new sha256 written into the report
    edited = shutil.copytree(out, tmp_path / "edited")
    (edited / "labels.json").write_text(json.dumps([f"x{i}" for i in range(10)]))
    _edit_json(edited / "export_report.json", sha256={**report["sha256"], "labels.json": hashlib.sha256(
        (edited / "labels.json").read_bytes()).hexdigest()})
    capsys.readouterr()
    assert predict_main([str(edited), str(photos), "--trust", str(ours.admin_kit)]) == 2
    assert "does not match the content: it was changed after it was signed" in capsys.readouterr().err
    assert ImageClassifier(edited).labels[0] == "x0", "without --trust the sha256 alone are checked, as documented"
    unsigned = shutil.copytree(out, tmp_path / "unsigned")
    (unsigned / REPORT_SIGNATURE_FILE).unlink()
    assert predict_main([str(unsigned), str(photos), "--trust", str(ours.admin_kit)]) == 2
    assert "is not signed" in capsys.readouterr().err
    assert predict_main([str(out), str(photos), "--trust", str(other.admin_kit)]) == 2
    assert "was not issued by project" in capsys.readouterr().err
    # an unlisted external-data file next to the model is refused; Triton copies the checked bytes
    (edited / "model.onnx.data").write_bytes(b"x")
    with pytest.raises(ValueError, match="external data is not listed"):
        ImageClassifier(edited)
    repo = write_repository(out, tmp_path / "triton")
    assert (repo / "clip_lora_fp32" / "1" / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()
    # the exporter refuses a checkpoint without the project's signature when given the project's root
    (ckpt / SIGNATURE_FILE).unlink()
    assert export_main([str(ckpt), "--out", str(tmp_path / "o2"), "--trust", str(ours.admin_kit)]) == 2
    assert "is not signed" in capsys.readouterr().err and not (tmp_path / "o2").exists()


def test_signing_needs_only_cryptography_not_nvflare_or_torch():
    loaded = subprocess.run([sys.executable, "-c", "import sys, nvflare_lora.signing; print(sorted({m.split('.')[0] "
                             "for m in sys.modules} & {'nvflare', 'torch', 'numpy'}))"],
                            capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    assert loaded == "[]", loaded
