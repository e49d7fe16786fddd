"""The production path end to end on localhost: provisioned mTLS kits, real server and site processes.

deploy/README.md, step by step, its commands as written (support.poc.run_guide_line, with the guide's variables
set to this test's paths): deploy/project.yml is provisioned for localhost (free ports, its 3 sites), every kit is
allow-listed and given deploy/authorization.json (no job may bring code), each site is pointed at its own folder of
real elpv images without editing the job (site-1 by NVFLARE_LORA_DATA, site-2 by local/nvflare_lora_site.json), the
admin writes the job with `job.py --export --set ...` (shortened by a few more --set), submits, follows and
downloads it with deploy/submit.py, exports the download with --data, --trust and --sign, and serves it with
--trust over HTTP. The Recipe's own submission (`job.py --env prod`) resumes that job for one more round; the
encrypted job, and a job that brings code (refused), go through deploy/submit.py too. Everything the test starts
is stopped by pid at the end, also when it fails. Each job here costs its server and site processes (about half a
minute of CPU), so each path is run once.
"""

import json
import shlex
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from nvflare_lora.testing.simulator import ROOT, make_job
from support.poc import LocalFederation, guide_line, process_env, provision, run_guide_line, write_site_config

SUBMIT = ROOT / "deploy" / "submit.py"  # the guide's submit command, run as documented

pytestmark = pytest.mark.poc

SITES = ["site-1", "site-2", "site-3"]  # deploy/project.yml's three sites
ROUNDS = 2
DP = {"max_grad_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5}  # the clear job trains with DP-SGD
SITE2_BUDGET = {"max_epsilon": 1000.0, "delta": 1e-5}


BASE = "tiny-clip"  # the guide's $BASE
LABELS = ["functional", "defective"]  # the guide's job's labels: elpv's classes
JOB_EXPORT, SUBMIT_LINE = "python jobs/clip_lora/job.py --export", "python deploy/submit.py"
# the guide's job, shortened for the test (appended --set win over the guide's), with DP-SGD at the sites
SHORT = {"num_rounds": ROUNDS, "local_epochs": 1, "max_steps": 5,
         "cross_site_eval": "false",  # the simulator tests cover it; here it would only add time
         "wait_time_after_min_received": 5, "dp": json.dumps(DP)}


def guide_env(federation, **more) -> dict:
    """The guide's variables as the admin's machine has them here."""
    return process_env(federation.home, {"ADMIN_KIT": str(federation.kits.admin_kit), "BASE": BASE,
                                         **{k: str(v) for k, v in more.items()}})


def guide_job_settings() -> list:
    """The --set pairs of the guide's job command, $BASE as this test sets it."""
    words = shlex.split(guide_line(JOB_EXPORT).replace("$BASE", BASE))
    return [words[i + 1] for i, w in enumerate(words) if w == "--set"]


def as_sets(settings: dict) -> list:
    return [f"{k}={v}" for k, v in settings.items()]


def write_elpv_folders(root: Path, num_sites: int):
    """Real elpv solar-cell photos (functional / defective class folders), one folder per site: the sites' own data."""
    from nvflare_lora.sample_data import write_elpv

    return write_elpv(root, num_sites, per_site=60)


class Site2Budget:
    """site-2 sets its own privacy ceiling for a job (its DP spend goes into its kit's local/ ledger; a site with a
    ceiling takes no job without DP, so it is lifted again afterwards, for the encrypted job below)."""

    def __init__(self, federation):
        self.config = federation.kits.site("site-2")
        self.before = json.loads((self.config / "local" / "nvflare_lora_site.json").read_text())

    def __enter__(self):
        write_site_config(self.config, {**self.before, "privacy_budget": SITE2_BUDGET})

    def __exit__(self, *exc):
        write_site_config(self.config, self.before)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("poc")
    kits = provision(root, SITES)
    for kit in [kits.server] + [kits.site(s) for s in SITES]:
        shutil.copy(ROOT / "deploy" / "authorization.json", kit / "local" / "authorization.json")
    data1, *others = write_elpv_folders(root / "data", len(SITES))
    for site, data in zip(SITES[1:], others):
        write_site_config(kits.site(site), {"data": str(data)})
    fed = LocalFederation(kits, root / "logs", root / "home")
    try:
        fed.start(site_env={"site-1": {"NVFLARE_LORA_DATA": str(data1)}})
        yield fed
    finally:
        pids = fed.stop()
        left = fed.still_running()
        assert pids and not left, f"processes still running after stop: {left}"


def submit_recipe(federation, tmp: Path, **changes):
    """The guide's job as `python jobs/clip_lora/job.py --env prod --startup-kit ADMIN_KIT --set ...` submits it (the
    Recipe over mTLS, followed to the end and downloaded), site-2 with its privacy ceiling: (job id, download, what
    job.py said)."""
    cmd = [sys.executable, str(ROOT / "jobs" / "clip_lora" / "job.py"), "--env", "prod",
           "--startup-kit", str(federation.kits.admin_kit)]
    cmd += [a for pair in guide_job_settings() + as_sets({**SHORT, **changes}) for a in ("--set", pair)]
    with Site2Budget(federation):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp,
                              env=process_env(federation.home))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + federation.log_tails()
    said = proc.stdout.splitlines()
    job_id, downloaded = said[-1].split("job ", 1)[1].split(" done; results in ", 1)
    return job_id, Path(downloaded), said


@pytest.fixture(scope="module")
def finished_job(federation):
    """deploy/README.md's step 7 as written: the admin writes the job with `job.py --export --set ...` (here with
    SHORT's settings appended) and submits, follows and downloads it with deploy/submit.py, site-2 with its
    privacy ceiling: (job id, download, what submit.py said)."""
    root = federation.kits.project
    env = guide_env(federation)
    made = run_guide_line(JOB_EXPORT, root, env, extra=" " + " ".join(f"--set {shlex.quote(p)}" for p in as_sets(SHORT)))
    assert made.returncode == 0, made.stdout + made.stderr
    with Site2Budget(federation):
        proc = run_guide_line(SUBMIT_LINE, root, env, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + federation.log_tails()
    said = proc.stdout.splitlines()
    job_id, downloaded = submitted(said)
    downloaded = root / downloaded
    assert downloaded == root / "results" / job_id, said
    return job_id, downloaded, said


@pytest.fixture(scope="module")
def resumed_job(federation, finished_job, tmp_path_factory):
    """The guide's job resumed from its download's latest checkpoint (signed by the server, which checks it) for one
    more round, submitted by the Recipe (`job.py --env prod`): `resume_from` and num_rounds ROUNDS + 1, as a server
    restart resubmits a job (docs/guide.md, Failures)."""
    latest = _one(finished_job[1].rglob("adapter/latest"), "latest checkpoint")
    return submit_recipe(federation, tmp_path_factory.mktemp("resumed"), num_rounds=ROUNDS + 1, resume_from=str(latest))


def submit(federation, job: Path, results: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """python deploy/submit.py ADMIN_KIT JOB --download RESULTS, with the admin's kit."""
    return subprocess.run([sys.executable, str(SUBMIT), str(federation.kits.admin_kit), str(job),
                           "--download", str(results), "--timeout", str(timeout)],
                          capture_output=True, text=True, timeout=timeout + 60, env=process_env(federation.home))


def submitted(said):
    """(job id, download path) from what deploy/submit.py printed."""
    job_id = _one((l.split(" as job ")[1] for l in said if l.startswith("submitted ")), "job id")
    return job_id, Path(_one((l[len("downloaded to "):] for l in said if l.startswith("downloaded to ")), "download"))


def _one(paths, what):
    paths = list(paths)
    assert len(paths) == 1, f"expected one {what}, found {paths}"
    return paths[0]


def test_job_completes_with_adapter_checkpoints_in_the_download(federation, finished_job):
    from nvflare_lora.checkpoint import read_adapter_dir
    from nvflare_lora.signing import TrustRoot

    _, downloaded, _ = finished_job
    latest = _one(downloaded.rglob("adapter/latest"), "latest checkpoint")
    state, _, meta = read_adapter_dir(latest, TrustRoot(federation.kits.admin_kit))  # signed by the server's kit
    assert meta["round"] == ROUNDS - 1 and meta["base_model"] == "tiny-clip"
    assert all(np.isfinite(v).all() for v in state.values())
    assert (latest.parent / "best" / "nvflare_lora.json").is_file()


def test_only_adapter_diffs_from_both_sites_crossed_the_wire(finished_job):
    _, downloaded, _ = finished_job
    comm = json.loads(_one(downloaded.rglob("communication.json"), "communication.json").read_text())
    assert len(comm["rounds"]) == ROUNDS
    for r in comm["rounds"]:
        assert sorted(r["upload"]) == SITES
        assert {up["data_kind"] for up in r["upload"].values()} == {"WEIGHT_DIFF"}
        assert {down["data_kind"] for down in r["download"].values()} == {"WEIGHTS"}


def test_each_site_trained_on_its_own_folder(federation, finished_job):
    job_id, _, _ = finished_job
    for site in SITES:
        log = federation.kits.site(site) / job_id / "log.txt"
        text = log.read_text()
        assert "train /" in text and f"data/{site}'" in text, f"{site} did not load data/{site}:\n{text[-2000:]}"


def test_dp_samples_from_each_sites_own_secret_and_site_2_keeps_its_ledger(federation, finished_job):
    """Under NVFlare, DP-SGD's sampling secret is made once in each site's kit (local/, mode 0600) and each site's
    accountant says its sampling was private; site-2, which set its own privacy_budget, keeps a ledger in its kit of
    every round this job trained on its data, under the job's id (tests/test_privacy.py: across jobs)."""
    import stat

    from nvflare_lora.privacy import LEDGER_FILE, SAMPLING_SECRET_FILE

    job_id, _, _ = finished_job
    secrets = []
    for site in SITES:
        local = federation.kits.site(site) / "local"
        key = local / SAMPLING_SECRET_FILE
        assert key.is_file() and stat.S_IMODE(key.stat().st_mode) == 0o600, f"{site}: no sampling secret in {local}"
        secrets.append(key.read_bytes())
        report = json.loads(_one((federation.kits.site(site) / job_id).rglob("dp_accountant.json"),
                                 "accountant").read_text())
        assert report["sampling"] == "secret" and report["private"] and len(report["history"]) == ROUNDS
    assert secrets[0] != secrets[1], "each site its own secret"
    ledger = json.loads((federation.kits.site("site-2") / "local" / LEDGER_FILE).read_text())
    (entry,) = ledger["datasets"].values()
    assert [job for *_, job in entry["history"]] == [job_id] * ROUNDS
    assert not (federation.kits.site("site-1") / "local" / LEDGER_FILE).exists(), "no ceiling set, no ledger"


def test_the_servers_checkpoints_are_signed_and_each_tampering_is_refused_by_resume_and_the_exporter(
        federation, finished_job, tmp_path, capsys):
    """The server signed its checkpoints with its kit's key (nvflare_lora.checkpoint.SIGNATURE_FILE). Copies of the
    downloaded latest/ with lora_alpha changed, the manifest removed, two tensors swapped, or re-signed by another
    project's server are refused by resume (the persistor's resume, with the server kit's root CA as a provisioned
    server has it; a resumed job is not submitted for each: tests/test_signing.py has the rest of the attacks) and by
    the exporter (`--trust` the admin's kit), each with its reason."""
    from nvflare.apis.fl_context import FLContext
    from safetensors.numpy import load_file, save_file

    from exporters.onnx.__main__ import main as export_main
    from nvflare_lora.checkpoint import MANIFEST_FILE, SIGNATURE_FILE
    from nvflare_lora.fl.server.persistor import AdapterPersistor
    from nvflare_lora.signing import Signer, TrustRoot

    _, downloaded, _ = finished_job
    latest = _one(downloaded.rglob("adapter/latest"), "latest checkpoint")
    assert json.loads((latest / SIGNATURE_FILE).read_text())["signer"] == "localhost"
    other = provision(tmp_path / "other", ["site-1"])  # another project, provisioned the same way

    def alpha(c):
        meta = json.loads((c / "nvflare_lora.json").read_text())
        meta["lora_config"]["lora_alpha"] *= 4
        (c / "nvflare_lora.json").write_text(json.dumps(meta))

    def swap(c):
        state = load_file(str(c / "adapter_model.safetensors"))
        a, b = sorted(k for k in state if ".lora_B." in k)[:2]
        state[a], state[b] = state[b], state[a]
        save_file(state, str(c / "adapter_model.safetensors"))

    cases = {"alpha": (alpha, "nvflare_lora.json does not match the sha256 in its manifest"),
             "no_manifest": (lambda c: (c / MANIFEST_FILE).unlink(), "has no manifest"),
             "swapped": (swap, "does not match the sha256 in its manifest"),
             "other_project": (lambda c: (c / SIGNATURE_FILE).write_text(json.dumps(Signer.from_kit(
                 other.server).sign((c / MANIFEST_FILE).read_bytes()))), "was not issued by project")}
    for name, (change, reason) in cases.items():
        ckpt = shutil.copytree(latest, tmp_path / name / "latest")
        change(ckpt)
        persistor = AdapterPersistor(resume_from=str(ckpt))
        persistor._trust = TrustRoot(federation.kits.server)  # what load_model sets in a provisioned server
        with pytest.raises(ValueError, match=reason):
            persistor._load_resume(FLContext())
        capsys.readouterr()
        assert export_main([str(ckpt), "--out", str(tmp_path / name / "onnx"),
                            "--trust", str(federation.kits.admin_kit)]) == 2, name
        err = capsys.readouterr().err
        assert reason in err, (name, err[-2000:])
        assert not (tmp_path / name / "onnx").exists()


def test_a_resumed_job_continues_site_2s_ledger(federation, finished_job, resumed_job):
    """Resume continues the site-owned privacy ledger (tests/test_privacy.py: in process, with the refusal past the
    ceiling): site-2's ledger in its kit holds the first job's ROUNDS rounds and then the resumed job's one, under each
    job's id, and the resumed job ran only the missing round."""
    from nvflare_lora.privacy import LEDGER_FILE

    first, (second, downloaded, _) = finished_job[0], resumed_job
    comm = json.loads(_one(downloaded.rglob("communication.json"), "communication.json").read_text())
    assert [r["round"] for r in comm["rounds"]] == [ROUNDS], "only the missing round ran"
    ledger = json.loads((federation.kits.site("site-2") / "local" / LEDGER_FILE).read_text())
    (entry,) = ledger["datasets"].values()
    assert [job for *_, job in entry["history"]] == [first] * ROUNDS + [second]


def test_the_guides_export_verifies_on_data_signs_and_its_service_trusts_only_that(federation, finished_job, capsys):
    """deploy/README.md's steps 8 and 9 as written, on the admin's machine: the download exported with --data (a
    site's image folder standing in for the admin's images), --trust and --sign the admin's kit; the service started
    with --trust rootCA.pem answers a real image over HTTP; `predict --trust` refuses the export once labels.json is
    edited and re-hashed into the report."""
    import hashlib

    from exporters.onnx.predict import main as predict_main

    job_id, _, _ = finished_job
    root, data = federation.kits.project, federation.kits.project / "data" / "site-1"
    env = guide_env(federation, JOB_ID=job_id, DATA=data)
    made = run_guide_line("python -m exporters.onnx ", root, env)
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    assert "checkpoint verified: signed by 'localhost' of project" in made.stdout, made.stdout
    out = root / "model_onnx"
    report = json.loads((out / "export_report.json").read_text())
    assert str(data) in report["verification"]["data"] and not report["failed"], report["verification"]
    assert report["signed_by"].startswith(federation.kits.admin), report["signed_by"]
    assert run_guide_line("cp ", root, env).returncode == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve = subprocess.Popen(["bash", "-c", "exec " + guide_line("python -m exporters.onnx.serve")], cwd=root,
                             env={**env, "PORT": str(port)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = serve.stdout.readline()
        assert f"on http://127.0.0.1:{port}" in first, first + serve.stderr.read()[-2000:]
        image = sorted((data / "defective").glob("*.png"))[0].read_bytes()
        with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=image),
                                    timeout=60) as answer:
            top = json.loads(answer.read())["top"]
        assert {t["label"] for t in top} == set(LABELS), top
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as answer:
            health = json.loads(answer.read())
        assert "signed" in json.dumps(health), health
    finally:
        serve.terminate()
        serve.wait(timeout=30)
    root_ca = root / "rootCA.pem"
    (out / "labels.json").write_text(json.dumps(json.loads((out / "labels.json").read_text())[::-1]))
    report["sha256"]["labels.json"] = hashlib.sha256((out / "labels.json").read_bytes()).hexdigest()
    (out / "export_report.json").write_text(json.dumps(report))
    capsys.readouterr()
    assert predict_main([str(out), str(data / "defective"), "--trust", str(root_ca)]) == 2
    assert "changed after it was signed" in capsys.readouterr().err


def test_the_admin_sees_each_round_and_the_end(he_job):
    """deploy/submit.py, as the guide runs it (here with the encrypted job): the job's id, each round's line
    from the server's live log, the end, and where it downloaded the result."""
    job_id, downloaded, said = he_job
    rounds = [line for line in said if line.startswith("[nvflare_lora] round")]
    assert [line.split(":")[0] for line in rounds] == [f"[nvflare_lora] round {r}/{HE_ROUNDS}"
                                                       for r in range(1, HE_ROUNDS + 1)], said
    assert f"job {job_id}: FINISHED:COMPLETED" in said and f"downloaded to {downloaded}" in said
    # round 1 was reported while the job ran (read from the server's live log), not only from the download
    assert said.index(rounds[0]) < said.index(f"job {job_id}: FINISHED:COMPLETED"), said


def test_the_recipe_runs_on_the_provisioned_system_with_prodenv(resumed_job):
    """`python jobs/clip_lora/job.py --env prod --startup-kit ADMIN_KIT`: the Recipe submitted over mTLS (the resumed
    job of this module), its result downloaded where it says."""
    job_id, result, said = resumed_job
    assert said[-1] == f"job {job_id} done; results in {result}" and result.is_dir(), said
    comm = json.loads(_one(result.rglob("communication.json"), "communication.json").read_text())
    assert [sorted(r["upload"]) for r in comm["rounds"]] == [SITES]


def test_a_job_that_brings_code_is_refused(federation, finished_job, tmp_path):
    """The policy that the plugin's job runs under really forbids uploaded code (the negative control)."""
    job = make_job(tmp_path / "clip_lora_byoc", num_rounds=1, cross_site_eval=False)
    (job / "app" / "custom").mkdir()
    (job / "app" / "custom" / "anything.py").write_text("print('uploaded code')\n")
    proc = submit(federation, job, tmp_path / "results", timeout=120)
    assert proc.returncode == 1 and "FINISHED:COMPLETED" not in proc.stdout, proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()
    server_log = (federation.kits.server / "log.txt").read_text()
    assert "BYOC not permitted" in server_log, server_log[-3000:]


# ---- secure_aggregation "he": the kits' CKKS contexts (deploy/project.yml's HEKeyBuilder) ---------------------
OPEN = dict(clip_multiple=None, max_weight_ratio=None, min_agreement=None)  # bounds that need clear updates


HE_ROUNDS = 3
HE_JOB = dict(num_rounds=HE_ROUNDS, num_sites=len(SITES), min_clients=len(SITES), local_epochs=1, max_steps=5,
              labels=LABELS, num_classes=len(LABELS), **OPEN)  # every round waits for all three sites
# every site's update of round 1 is malformed (a key missing), so the aggregator refuses them all: the encrypted
# global adapter must stay as it is, still ciphertexts, and round 2 go on from it (the in-process round: the same)
REFUSED_ROUND = 1
# and in round 2 site-2 sends a valid ciphertext one level down (its own x 1.0: nvflare_lora.testing.attacks), which
# stopped the job in the sum before: the aggregator refuses it, naming it, and the job ends as if it never arrived
ATTACK_ROUND = 2
HE_FAULTS = {"site-1": {str(REFUSED_ROUND): "missing_key"},
             "site-2": {str(REFUSED_ROUND): "missing_key", str(ATTACK_ROUND): "wrong_level"},
             "site-3": {str(REFUSED_ROUND): "missing_key"}}


@pytest.fixture(scope="module")
def he_job(federation, finished_job, tmp_path_factory):
    """A short encrypted job (with cross-site evaluation) on the provisioned system, submitted, followed and
    downloaded by deploy/submit.py: (job id, download, what submit.py said)."""
    tmp = tmp_path_factory.mktemp("he")
    job = make_job(tmp / "clip_lora_he", faults=HE_FAULTS, wait_time_after_min_received=5, secure_aggregation="he",
                   **HE_JOB)
    proc = submit(federation, job, tmp / "results")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + federation.log_tails()
    said = proc.stdout.splitlines()  # deploy/submit.py's account (test_the_admin_sees_each_round_and_the_end)
    job_id, downloaded = submitted(said)
    assert downloaded.parent == tmp / "results"
    return job_id, downloaded, said


def test_an_encrypted_job_equals_the_clear_one_and_the_server_holds_no_clear_adapter(federation, he_job, tmp_path,
                                                                                      capsys):
    """The global adapter the HE job produces, decrypted with a site's key, equals what the same job gives in clear
    (the in-process round on the same sites' folders: the job's code without NVFlare) within CKKS's rounding, as
    it grows through AdamW's per-coordinate steps when sites train from a decrypted adapter (measured 2e-7 after 2
    rounds, 1.1e-5 after 3; bound 1e-4, far below what a lost or misweighted update gives), also through a round
    whose updates were all refused (round 1: the global adapter stays, still
    encrypted, and round 2 trains from it) and through site-2's attack in round 2 (a ciphertext one level down:
    refused, named, the job goes on as without it); the server's workspace holds only ciphertexts of the sent tensors
    (every safetensors file scanned); cross-site evaluation ran on the encrypted checkpoints; the export from a
    site's key verifies, and without the key it is refused."""
    from safetensors.numpy import load_file

    from nvflare_lora.checkpoint import ENCRYPTED_ADAPTER_FILE, read_adapter_dir
    from nvflare_lora.secure import decrypt_checkpoint
    from nvflare_lora.signing import TrustRoot
    from nvflare_lora.round import Federation
    from nvflare_lora.settings import settings
    from nvflare_lora.testing.faults import fault_channel

    _, he, _ = he_job
    key = federation.kits.site("site-1") / "startup" / "client_context.tenseal"
    assert key.is_file() and (federation.kits.server / "startup" / "server_context.tenseal").is_file()
    folders = {s: str(federation.kits.project / "data" / s) for s in SITES}  # each site's own folder
    clear = Federation(settings(**HE_JOB), sites=SITES, site_settings={s: {"data": f} for s, f in folders.items()})
    faults = {s: {int(r): "nothing" if fault == "wrong_level" else fault for r, fault in by_round.items()}
              for s, by_round in HE_FAULTS.items()}  # the refused attack: as if that update never arrived
    for rnd in range(HE_ROUNDS):
        clear.run_round(channel=fault_channel(faults, rnd))
    assert sorted(clear.history[REFUSED_ROUND].refused) == SITES
    comm = json.loads(_one(he.rglob("communication.json"), "communication.json").read_text())
    refused = {r["round"]: r["refused"] for r in comm["rounds"]}
    assert sorted(refused.get(REFUSED_ROUND, {})) == SITES, refused
    assert list(refused.get(ATTACK_ROUND, {})) == ["site-2"], refused
    assert "is not a freshly encrypted ciphertext of this job's context (level 1 primes" in \
        refused[ATTACK_ROUND]["site-2"], refused
    assert sorted(comm["rounds"][ATTACK_ROUND]["sites"]) == ["site-1", "site-3"], "the others' updates counted"
    # a round with no accepted update records that, not the last round's aggregation left in the workflow's context
    assert comm["rounds"][REFUSED_ROUND]["aggregation"]["site_names"] == [], comm["rounds"][REFUSED_ROUND]
    # the run's summary names each site left out and when, as the in-process round records it
    assert {s: r["rounds"] for s, r in comm["left_out"].items()} == \
        {s: r["rounds"] for s, r in clear.left_out().items()}, comm["left_out"]
    state, _, meta = read_adapter_dir(_one(he.rglob("adapter/latest"), "latest"), TrustRoot(federation.kits.admin_kit))
    assert meta["encrypted"]["scheme"] == "CKKS"
    got = decrypt_checkpoint(state, meta, key, he)
    assert set(got) == set(clear.global_adapter)
    worst = max(float(np.abs(got[k] - clear.global_adapter[k]).max()) for k in got)
    print(f"max |HE - clear| = {worst:.2e}")
    assert worst < 1e-4
    sent = set(meta["encrypted"]["keys"])
    assert sent and all(".lora_B." in k or ".lora_A." in k or "classifier" in k for k in sent)
    # the server's workspace as its job store keeps it (the download) and the server's kit: ciphertexts only
    files = list(he.rglob("*.safetensors"))
    assert files and all(f.name == ENCRYPTED_ADAPTER_FILE for f in files), files
    for f in files + list(federation.kits.server.rglob("*.safetensors")):
        tensors = load_file(str(f))
        assert f.name == ENCRYPTED_ADAPTER_FILE and all(tensors[k].dtype == np.uint8 for k in sent), \
            f"{f} holds a sent tensor in clear"
    cross = json.loads(_one(he.rglob("cross_val_results.json"), "cross-site results").read_text())
    assert sorted(cross) == SITES and all(len(models) == 2 for models in cross.values()), cross
    # without a site's key the exporter refuses; with it, it exports (its main, in this process: the command line
    # runs in a process of its own in README.md's export, tests/test_readme.py)
    from exporters.onnx.__main__ import main as export_main

    capsys.readouterr()
    code = export_main([str(he), "--out", str(tmp_path / "no_key"), "--trust", str(federation.kits.admin_kit)])
    err = capsys.readouterr().err
    assert code == 2 and "--he-context" in err, err[-2000:]
    # the key's fingerprint (HEKeyBuilder, in the server's kit) went with the job and into the checkpoint; a context
    # from another provisioning is refused naming both
    from nvflare_lora.secure import key_fingerprint, load_context, make_context

    own = key_fingerprint(load_context(key.read_bytes(), str(key), secret=True))
    assert meta["encrypted"]["key_fingerprint"] == own
    other = tmp_path / "other_client_context.tenseal"
    other.write_bytes(make_context().serialize(save_secret_key=True))
    with pytest.raises(Exception, match=f"encrypted under the key with fingerprint {own}; .* holds another"):
        decrypt_checkpoint(state, meta, other, he)
    code = export_main([str(he), "--out", str(tmp_path / "onnx"), "--verify-samples", "32", "--he-context", str(key),
                        "--trust", str(federation.kits.admin_kit)])
    assert code == 0, capsys.readouterr().err[-3000:]
    assert not json.loads((tmp_path / "onnx" / "export_report.json").read_text())["failed"]
