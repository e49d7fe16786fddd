"""A site's real data path: image folders as users have them, unreadable files, DataLoader workers, seeded
augmentation, and CLIP's zero-shot head; the unit rules first, then sites of the in-process federation
(nvflare_lora.round) on image folders.
Images are real: elpv-dataset's solar-cell photos, re-saved in the modes and formats users have."""

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nvflare_lora.data import (SiteLoader, TooManyBadImages, load_csv, load_dataset,
                               load_image_folder)
from nvflare_lora.base_model import _TINY_CONFIG, preprocessing_for
from nvflare_lora.preprocessing import Augmentation, open_image
from nvflare_lora.sample_data import elpv_files, write_random_base

PP = preprocessing_for("tiny-clip")


def _cells(n, start=0):
    return [Image.open(p).copy() for p, _ in elpv_files()[start:start + n]]


def _truncated_png(path: Path, image: Image.Image) -> Path:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # opens (header intact), does not decode
    return path


def make_folder(root: Path, start: int = 0, extra_good: int = 0) -> dict:
    """Class folders a/ (nested, mixed extensions), b/ (palette, RGBA, 16-bit, CMYK), c/ (EXIF-rotated, one
    truncated PNG), d/ (no images); a hidden folder and a text file that are not images. Returns what it wrote."""
    cells = _cells(12 + extra_good, start)
    for name in "abcd":
        (root / name).mkdir(parents=True)
    (root / "a" / "x" / "y").mkdir(parents=True)
    cells[0].convert("RGB").save(root / "a" / "x" / "y" / "deep.png")
    cells[1].convert("RGB").save(root / "a" / "x" / "UPPER.JPG")
    cells[2].save(root / "a" / "gray.jpeg")
    cells[3].save(root / "a" / "cell.bmp")
    for i, im in enumerate(cells[12:]):
        im.save(root / "a" / "x" / f"more{i}.png")
    pal = cells[4].convert("RGB").convert("P", palette=Image.ADAPTIVE)
    pal.info["transparency"] = 0
    pal.save(root / "b" / "palette.png")
    cells[5].convert("RGBA").save(root / "b" / "rgba.png")
    Image.fromarray((np.asarray(cells[6], np.uint16) * 257)).save(root / "b" / "sixteen.png")  # mode I;16
    (root / "b" / "sub").mkdir()
    cells[7].convert("CMYK").save(root / "b" / "sub" / "cmyk.jpg")
    wide = cells[8].convert("RGB").resize((60, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    wide.save(root / "c" / "rotated.jpg", exif=exif)
    cells[9].save(root / "c" / "tif.TIFF")
    _truncated_png(root / "c" / "broken.png", cells[10])
    (root / "a" / ".thumbs").mkdir()
    cells[11].save(root / "a" / ".thumbs" / "hidden.png")
    (root / "d" / "README.txt").write_text("no images here")
    return {"readable": 10 + extra_good, "broken": str(root / "c" / "broken.png")}


def test_an_image_folder_is_read_as_users_expect(tmp_path):
    made = make_folder(tmp_path / "data")
    ds = load_image_folder(tmp_path / "data", PP, max_bad_images=0.1)  # 1 of 11 may be bad
    assert ds.classes == ["a", "b", "c", "d"]
    assert any("'d'" in n and "no images" in n for n in ds.notes)  # the empty class stays, with a warning
    names = sorted(Path(str(p)).name for p, _ in ds.items)
    assert names == sorted(["deep.png", "UPPER.JPG", "gray.jpeg", "cell.bmp", "palette.png", "rgba.png",
                            "sixteen.png", "cmyk.jpg", "rotated.jpg", "tif.TIFF", "broken.png"])
    assert len(ds.bad) == 0  # broken.png opens: only decoding finds it

    # decoding: EXIF applied, 16-bit scaled (not clipped to white), every mode to RGB
    assert open_image(tmp_path / "data" / "c" / "rotated.jpg").size == (30, 60)
    sixteen = np.asarray(open_image(tmp_path / "data" / "b" / "sixteen.png"))
    assert sixteen.shape[2] == 3 and np.abs(sixteen[..., 0].astype(int) - np.asarray(_cells(1, 6)[0])).max() <= 1
    for name in ("palette.png", "rgba.png", "sub/cmyk.jpg"):
        assert open_image(tmp_path / "data" / "b" / name).mode == "RGB"

    # through real DataLoader workers: every readable image once, the truncated one named and left out
    loader = SiteLoader(ds, batch_size=4, shuffle=True, num_workers=2)
    seen = sum(len(y) for _, y in loader.batches(seed=1))
    assert seen == made["readable"]
    assert list(ds.bad.files) == [made["broken"]] and "broken.png" in ds.bad.summary()
    assert len(loader) == -(-made["readable"] // 4)  # later passes no longer ask for it
    assert sum(len(y) for _, y in loader.batches(seed=2)) == made["readable"]


def test_more_bad_images_than_max_bad_images_stop_the_site_with_the_share_and_the_folder(tmp_path):
    make_folder(tmp_path / "data")
    (tmp_path / "data" / "a" / "notes.png").write_text("not an image")  # fails when listed
    with pytest.raises(TooManyBadImages, match=r"1 of 12 images \(8\.3%\) in .*data cannot be read.*notes\.png"):
        load_image_folder(tmp_path / "data", PP, max_bad_images=0.05)
    ds = load_image_folder(tmp_path / "data", PP, max_bad_images=0.1)  # 1 of 12 bad: allowed
    assert "notes.png" in ds.bad.summary()
    with pytest.raises(TooManyBadImages, match=r"2 of 12 images \(16\.7%\).*max_bad_images=10\.0%.*broken\.png"):
        list(SiteLoader(ds, 4, num_workers=1).batches())  # decoding finds the second


def test_augmentation_is_seeded_whatever_the_workers(tmp_path):
    make_folder(tmp_path / "data")
    ds = load_image_folder(tmp_path / "data", PP, max_bad_images=0.1)
    ds.augment = Augmentation()

    def run(seed, workers, epoch=0):
        return [(x.clone(), y.clone()) for x, y in SiteLoader(ds, 4, shuffle=True, num_workers=workers).batches(seed, epoch)]

    run(0, 0)  # finds broken.png: later passes leave it out
    a, b, c = run(7, 0), run(7, 2), run(8, 0)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, c))
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, run(7, 0, epoch=1)))
    # evaluation passes are not augmented: the model's own preprocessing
    x, _ = next(iter(SiteLoader(ds, 1)))
    assert torch.equal(x[0], PP(ds.items[0][0]))


def test_bad_data_fails_at_set_up_naming_the_path_and_the_fix(tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"empty holds no images .* expected .*empty/<class_name>/<image files>"):
        load_dataset(str(tmp_path / "empty"), PP)
    make_folder(tmp_path / "data")
    with pytest.raises(ValueError, match=r"class folders \['d'\] that are not in the job's labels \['a', 'b', 'c'\]"):
        load_dataset(str(tmp_path / "data"), PP, classes=["a", "b", "c"])
    csv = tmp_path / "list.csv"
    csv.write_text("path,label\ndata/a/gray.jpeg,a\ndata/a/gone.png,a\n")
    with pytest.raises(FileNotFoundError, match=r"names 1 file\(s\) that do not exist.*gone\.png.*read from"):
        load_csv(csv, PP)
    csv.write_text("path,label\ndata/a/gray.jpeg,a\ndata/c/broken.png,c\n")
    ds = load_csv(csv, PP, max_bad_images=0.5)  # same rules as folders: a corrupt file is a bad image
    assert sum(len(y) for _, y in SiteLoader(ds, 2).batches()) == 1 and len(ds.bad) == 1
    with pytest.raises(ValueError, match=r"max_bad_images must be a share in \[0, 1\)"):
        load_dataset(str(tmp_path / "data"), PP, max_bad_images=1.5)


# ---- zero-shot head ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """The tiny-clip shapes as a local directory with a tokenizer built offline (random weights)."""
    return str(write_random_base(tmp_path_factory.mktemp("base") / "tiny", 0, **_TINY_CONFIG))


def test_zeroshot_head_gives_clips_logits_per_image(tiny_base):
    from transformers import CLIPModel

    from nvflare_lora import FederatedCLIPModel
    from nvflare_lora.models import load_tokenizer
    from nvflare_lora.zeroshot import zeroshot_head

    labels = ["functional", "defective", "cat"]
    weight, bias = zeroshot_head(tiny_base, labels, ["a photo of a {}."])
    fed = FederatedCLIPModel(tiny_base, 3, labels=labels, normalize_embeds=True)
    fed.model.classifier.weight.data, fed.model.classifier.bias.data = torch.from_numpy(weight), torch.from_numpy(bias)
    tok = load_tokenizer(tiny_base)(["a photo of a functional.", "a photo of a defective.", "a photo of a cat."],
                                    padding=True, truncation=True, max_length=16, return_tensors="pt")
    x = torch.stack([PP(im) for im in _cells(6)])
    with torch.no_grad():
        reference = CLIPModel.from_pretrained(tiny_base).eval()(pixel_values=x, **tok).logits_per_image
    assert torch.allclose(fed(x), reference, atol=1e-5, rtol=0), (fed(x) - reference).abs().max()


def test_initial_adapter_is_checked_against_the_jobs_base_and_head(tiny_base, tmp_path):
    from nvflare_lora.config import LoRAConfig
    from nvflare_lora.fl.server.persistor import AdapterPersistor
    from nvflare_lora.recipe import RecipeError, settings
    from nvflare_lora.zeroshot import write_initial_adapter

    path = write_initial_adapter(tmp_path / "init", tiny_base, ["x", "y"], LoRAConfig(r=4, lora_alpha=8))
    ok = AdapterPersistor(model=tiny_base, num_classes=2, labels=["x", "y"], r=4, lora_alpha=8, lora_dropout=0.1,
                          head_init="zeroshot", initial_adapter=str(path))
    ok._ensure_skeleton()
    state, meta = ok._read_adapter_file(path, "initial_adapter", None, need_fingerprint=True)
    assert ok.announcement()["head"] == {"init": "zeroshot", "normalize_embeds": True, "templates": ["a photo of a {}."]}
    assert not state["base_model.model.classifier.bias"].any() and state["base_model.model.classifier.weight"].any()
    other = AdapterPersistor(model=tiny_base, num_classes=2, labels=["x", "y"], r=4, lora_alpha=8, lora_dropout=0.1,
                             head_init="zeroshot", prompt_templates=["a {}."], initial_adapter=str(path))
    other._ensure_skeleton()
    with pytest.raises(ValueError, match=r"its head is .*a photo of a.*this job declares .*'a \{\}\.'"):
        other._read_adapter_file(path, "initial_adapter", None, need_fingerprint=True)
    preset = AdapterPersistor(model="tiny-clip", num_classes=2, labels=["x", "y"], r=4, lora_alpha=8,
                              lora_dropout=0.1, initial_adapter=str(path))
    preset._ensure_skeleton()
    with pytest.raises(ValueError, match=r"was made for another base: .*weights_sha256"):
        preset._read_adapter_file(path, "initial_adapter", None, need_fingerprint=True)
    with pytest.raises(ValueError, match=r"needs the initial adapter .*python -m nvflare_lora.zeroshot JOB_DIR"):
        AdapterPersistor(model=tiny_base, head_init="zeroshot")
    with pytest.raises(RecipeError, match=r"head_init must be one of 'seeded', 'zeroshot'"):
        settings(head_init="clip")


def test_zeroshot_needs_a_tokenizer_and_says_how_to_get_one(tmp_path):
    from nvflare_lora.models import save_preset
    from nvflare_lora.zeroshot import ZeroShotError, zeroshot_head

    with pytest.raises(ZeroShotError, match=r"built-in preset without a tokenizer.*save_pretrained"):
        zeroshot_head("tiny-clip", ["a", "b"])
    bare = save_preset("tiny-clip", tmp_path / "bare")
    with pytest.raises(ZeroShotError, match=rf"base {re.escape(str(bare.resolve()))} has no tokenizer"):
        zeroshot_head(str(bare), ["a", "b"])


# ---- sites on image folders, in the in-process federation -------------------------------------------
def test_image_folders_with_a_corrupt_file_train_and_a_site_over_max_bad_images_stops(tmp_path):
    """site-1: nested classes, mixed formats and modes, one truncated PNG, an empty class: it trains on every
    readable image, names the bad file and counts it, and its rounds complete. site-2: two of its 13 images
    unreadable: it refuses to start, with the share and the folder."""
    from nvflare_lora.facts import JobFacts
    from nvflare_lora.round import Federation
    from nvflare_lora.settings import settings
    from nvflare_lora.site import Site

    root = tmp_path / "images"
    made = make_folder(root / "site-1", extra_good=8)
    make_folder(root / "site-2", start=40)
    for i in range(2):
        (root / "site-2" / "a" / f"junk{i}.png").write_bytes(b"\x89PNG broken")
    job = settings(num_classes=4, labels=["a", "b", "c", "d"], num_rounds=2, min_clients=1, batch_size=4,
                   local_epochs=1, max_bad_images=0.1, num_workers=1)
    own = {site: {"data": str(root / site)} for site in ("site-1", "site-2")}  # each site's own folder

    fed = Federation(job, sites=["site-1"], site_settings=own)
    fed.run()
    site = fed.sites[0]
    assert any("class 'd' has no images" in note for note in site.notes)
    assert list(site.bad_images.files) == [made["broken"]]
    assert re.search(r"1 of 19 images in .*site-1 unreadable, skipped: .*broken\.png \(", site.bad_images.summary())
    assert [len(r.steps) for r in fed.history] == [1, 1] and not any(r.refused for r in fed.history)
    trained = site.train(len(fed.history))["samples"]  # one epoch: every training image it can read
    for result in fed.history:
        assert result.val_count["site-1"] + trained == made["readable"], "every readable image used, once"

    with pytest.raises(TooManyBadImages, match=r"2 of 13 images \(15\.4%\) in .*site-2 cannot be read, more than "
                                               r"max_bad_images=10\.0%: .*junk"):
        Site("site-2", JobFacts.from_settings(job), job.replace(**own["site-2"]))
