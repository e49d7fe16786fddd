"""docs/own-data.md's "When it fails" table, row by row: each mistake made as the guide names it, and the message
the guide quotes is the one the code gives (the guide's `...` stand for the parts that name the user's paths).
The guide's own blocks run in tests/test_readme.py (conftest.own_data_run)."""

import os
import re
import shutil
import subprocess
import sys

import pytest
from PIL import Image
from support.readme import OWN_DATA, REPO, section

from nvflare_lora.base_model import _TINY_CONFIG
from nvflare_lora.errors import NVFlareLoRAError
from nvflare_lora.facts import JobFacts
from nvflare_lora.jobfolder import read_job
from nvflare_lora.sample_data import write_random_base
from nvflare_lora.settings import settings
from nvflare_lora.site import Site

JOB_PY = REPO / "jobs" / "clip_lora" / "job.py"


def failure_rows() -> dict:
    """The table's rows: first cell (the mistake) -> the quoted message of the last cell, as a regex."""
    rows = {}
    for line in section(OWN_DATA, "When it fails").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("mistake", "---") and "`" in cells[2]:
            quote = re.search(r"`([^`]+)`", cells[2]).group(1)
            rows[cells[0]] = ".*".join(re.escape(part) for part in re.split(r"\s*\.\.\.\s*", quote))
    return rows


ROWS = failure_rows()


def row(start: str) -> str:
    found = [message for mistake, message in ROWS.items() if mistake.startswith(start)]
    assert len(found) == 1, f"docs/own-data.md's failure table has no single row starting {start!r}: {list(ROWS)}"
    return found[0]


def job_py(tmp_path, *sets) -> subprocess.CompletedProcess:
    args = [a for s in sets for a in ("--set", s)]
    return subprocess.run([sys.executable, str(JOB_PY), "--export", "--export-dir", str(tmp_path / "out"), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny CLIP checkpoint directory as save_pretrained writes one, with its tokenizer."""
    return write_random_base(tmp_path_factory.mktemp("base") / "tiny", 0, **_TINY_CONFIG)


@pytest.fixture
def no_tokenizer(base, tmp_path):
    """The checkpoint saved without its tokenizer (weights, config, preprocessing only)."""
    base = shutil.copytree(base, tmp_path / "no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        (base / name).unlink(missing_ok=True)
    return base


def write_images(root, classes, flat=False):
    for c in classes:
        folder = root if flat else root / c
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(3):
            Image.new("RGB", (32, 32), (40 * i, 90, 160)).save(folder / f"{c}_{i}.png")
    return root


def test_a_checkpoint_without_tokenizer_is_refused_by_the_zeroshot_command_and_by_a_text_head_site(
        tmp_path, no_tokenizer):
    message = row("`--set head=text`")
    made = job_py(tmp_path, f"model={no_tokenizer}", 'labels=["functional","defective"]',
                  "head_init=zeroshot", "initial_adapter=initial_adapter")
    assert made.returncode == 0, made.stderr
    zs = subprocess.run([sys.executable, "-m", "nvflare_lora.zeroshot", str(tmp_path / "out" / "clip_lora")],
                        capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert zs.returncode == 2 and re.search(message, zs.stderr), zs.stderr
    assert not (tmp_path / "out" / "clip_lora" / "app" / "config" / "initial_adapter").exists()
    job = settings(model=str(no_tokenizer), head="text", num_classes=2, labels=["functional", "defective"],
                   data=str(write_images(tmp_path / "images", ["functional", "defective"])))
    with pytest.raises(NVFlareLoRAError, match=message):
        Site("site-1", JobFacts.from_settings(job), job)


def test_labels_alone_give_the_number_of_classes(tmp_path):
    """The guides set labels once: num_classes is their number unless it is set too (then the two must agree)."""
    made = job_py(tmp_path, 'labels=["functional","defective","cracked"]')
    assert made.returncode == 0, made.stderr
    _, job = read_job(tmp_path / "out" / "clip_lora")
    assert job.num_classes == 3 and job.labels == ["functional", "defective", "cracked"]
    assert settings(labels=["a", "b"]).num_classes == 2 and settings().num_classes == 10


@pytest.mark.parametrize("mistake,sets", [
    ("one class", ['labels=["defective"]']),
    ("`labels` and `num_classes` disagree", ['labels=["functional","defective","cracked"]', "num_classes=2"])])
def test_a_job_with_one_class_or_labels_that_disagree_is_refused_by_job_py(tmp_path, mistake, sets):
    made = job_py(tmp_path, *sets)
    assert made.returncode == 2 and re.search(row(mistake), made.stderr), made.stderr
    assert made.stderr.count("\n") == 1 and not (tmp_path / "out").exists()


def test_under_the_text_head_a_site_folder_with_one_class_stops_that_site(tmp_path, base):
    one = write_images(tmp_path / "one", ["defective"])
    job = settings(model=str(base), head="text", num_classes=2, labels=["functional", "defective"], data=str(one))
    with pytest.raises(NVFlareLoRAError, match=row("under `head=text`")):
        Site("site-1", JobFacts.from_settings(job), job)


def test_a_folder_without_class_folders_or_with_a_class_not_in_the_labels_stops_the_site(tmp_path):
    labels = ["functional", "defective"]
    flat = write_images(tmp_path / "flat", labels, flat=True)
    job = settings(num_classes=2, labels=labels, data=str(flat))
    with pytest.raises(NVFlareLoRAError, match=row("a folder with images but no class sub-folders")):
        Site("site-1", JobFacts.from_settings(job), job)
    extra = write_images(tmp_path / "extra", labels + ["cracked"])
    job = job.replace(data=str(extra))
    with pytest.raises(NVFlareLoRAError, match=r"cracked.*functional.*defective|functional.*defective.*cracked"):
        Site("site-1", JobFacts.from_settings(job), job)
