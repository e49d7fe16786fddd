"""The shape of the code, as docs/architecture.md states it: layers without cycles, one owner of each default,
one place that reads the secure setting, and docs that name only what exists."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import subprocess
from pathlib import Path

import pytest

from nvflare_lora import settings as st

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nvflare_lora"


# ---- layers --------------------------------------------------------------------------------------------------
def documented_layers() -> dict:
    """{module or package (without "nvflare_lora."): layer number} from docs/architecture.md's Layers table."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text[text.index("## Layers"):]
    layers = {}
    for number, cell in re.findall(r"^\| (\d) \w+ \| ([^|]+) \|", table, re.M):
        for name in re.findall(r"`([\w.]+)`", cell):
            layers[name] = int(number)
    return layers


def package_imports(root: Path, package: str) -> dict:
    """{module: {(imported module of the package, line, inside a function)}}, read from the files (ast)."""
    modules = {}
    for f in root.rglob("*.py"):
        rel = f.relative_to(root.parent).with_suffix("")
        modules[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f
    edges = {m: set() for m in modules}
    for name, f in modules.items():
        tree = ast.parse(f.read_text())
        in_function = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = name.split(".")[: len(name.split(".")) - node.level + (f.name == "__init__.py")]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith(package):
                    edges[name].add((t, node.lineno, id(node) in in_function))
    return edges


def layer_of(module: str, layers: dict):
    parts = module.split(".")[1:]
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in layers:
            return layers[".".join(parts[:i])]
    return None


def test_every_module_sits_in_a_documented_layer_and_imports_no_higher_one_and_no_cycle():
    layers = documented_layers()
    edges = package_imports(PACKAGE, "nvflare_lora")
    unplaced = sorted(m for m in edges if m != "nvflare_lora" and layer_of(m, layers) is None)
    assert not unplaced, f"modules missing from docs/architecture.md's Layers table: {unplaced}"
    upward = [f"{m} (layer {layer_of(m, layers)}) imports {t} (layer {layer_of(t, layers)}) at line {line}"
              for m, targets in edges.items() for t, line, _ in targets
              if m != "nvflare_lora" and t != "nvflare_lora" and layer_of(t, layers) > layer_of(m, layers)]
    assert not upward, "\n".join(upward)
    graph = {m: {t for t, _, _ in targets} for m, targets in edges.items()}
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for t in graph.get(m, ()):
            if state.get(t) == "open":
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles}"


def top_level_imports(f: Path) -> list:
    """(module, names) of every import at a module's top level that is not of the package (ast)."""
    out = []
    for node in ast.parse(f.read_text()).body:
        if isinstance(node, ast.Import):
            out += [(a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            out.append((node.module, tuple(a.name for a in node.names)))
    return out


def import_closure(roots) -> set:
    """The package's modules that `roots` import, transitively (roots included)."""
    edges = package_imports(PACKAGE, "nvflare_lora")
    closure, todo = set(), list(roots)
    while todo:
        m = todo.pop()
        if m not in closure:
            closure.add(m)
            todo += [t for t, _, _ in edges.get(m, ())]
    return closure


def third_party(closure, packages, allowed=()) -> list:
    """'module imports X' for each top-level import of one of `packages` by a module of the closure, but `allowed`
    ((module, imported module, names))."""
    found = []
    for m in sorted(closure):
        f = PACKAGE.parent / (m.replace(".", "/") + ".py")
        f = f if f.is_file() else f.with_suffix("") / "__init__.py"
        for module, names in top_level_imports(f):
            if module.split(".")[0] in packages and (m, module, names) not in allowed:
                found.append(f"{m} imports {module} {names}")
    return found


def test_the_nvflare_server_imports_neither_transformers_models_nor_peft():
    """The server never builds the base: its components (and what they import, transitively) describe it from its
    config (base_model, families: transformers' configuration classes only) and never import the network, peft or the site's training."""
    edges = package_imports(PACKAGE, "nvflare_lora")
    closure = import_closure(m for m in edges if m.startswith(("nvflare_lora.fl.server.", "nvflare_lora.fl.filters.")))
    assert not closure & {"nvflare_lora.models", "nvflare_lora.lora_model", "nvflare_lora.dp_sgd",
                          "nvflare_lora.training", "nvflare_lora.data", "nvflare_lora.site"}, sorted(closure)
    heavy = third_party(closure, {"peft", "transformers"}, {
        ("nvflare_lora.base_model", "transformers", ("CLIPConfig",)),
        ("nvflare_lora.families", "transformers", ("CLIPConfig", "MetaClip2Config", "SiglipConfig"))})
    assert not heavy, heavy


def test_the_job_schema_and_the_recipe_import_no_torch():
    """Writing, reading and checking a job (settings, jobfolder, the Recipe, job.py) needs no torch, transformers or
    peft: the schema's checks are numpy's (a job.py or a Recipe starts in about 1 CPU-s, not 4)."""
    closure = import_closure(["nvflare_lora.settings", "nvflare_lora.jobfolder", "nvflare_lora.recipe"])
    heavy = third_party(closure, {"torch", "transformers", "peft"})
    assert not heavy, heavy


def test_the_package_imports_itself_at_the_top_of_modules():
    inside = [f"{m}:{line} imports {t}" for m, targets in package_imports(PACKAGE, "nvflare_lora").items()
              for t, line, in_function in targets if in_function]
    assert not inside, "\n".join(inside)


def test_an_import_inside_a_function_says_which_optional_dependency_or_lighter_path_needs_it():
    """Third-party imports stand at the top too, unless a comment on the line (or the one above) says why not."""
    unexplained = []
    for f in list(PACKAGE.rglob("*.py")) + list((ROOT / "exporters").rglob("*.py")):
        lines = f.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    here, above = lines[node.lineno - 1], lines[node.lineno - 2] if node.lineno > 1 else ""
                    if "#" not in here and not above.strip().startswith("#") and "#" not in above:
                        unexplained.append(f"{f.relative_to(ROOT)}:{node.lineno}: {here.strip()}")
    assert not unexplained, "\n".join(unexplained)


def test_outside_fl_and_testing_only_the_documented_modules_import_nvflare():
    documented = {"nvflare_lora/allow.py", "nvflare_lora/recipe.py", "nvflare_lora/secure.py"}
    found = set()
    for f in PACKAGE.rglob("*.py"):
        rel = str(f.relative_to(ROOT))
        if rel.startswith(("nvflare_lora/fl/", "nvflare_lora/testing/")):
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(n == "nvflare" or n.startswith("nvflare.") for n in names):
                found.add(rel)
    assert found == documented, found ^ documented
    assert all(f"`{Path(m).name}`" in (ROOT / "docs" / "architecture.md").read_text() for m in documented)


def test_the_exporter_imports_the_library_and_never_the_nvflare_components_or_test_helpers():
    bad = []
    for f in (ROOT / "exporters").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("nvflare_lora.fl",
                                                                                   "nvflare_lora.testing")):
                bad.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.module}")
    assert not bad, bad


# ---- the secure mode is chosen once ---------------------------------------------------------------------------
CHOOSERS = {"nvflare_lora/site.py", "nvflare_lora/round.py", "nvflare_lora/facts.py",
            "nvflare_lora/checkpoint.py",  # only the encrypted checkpoint's file name, adapter_model.encrypted.safetensors
            "nvflare_lora/fl/site/executor.py", "nvflare_lora/fl/server/aggregator.py",
            "nvflare_lora/fl/server/persistor.py", "nvflare_lora/fl/server/shareable_generator.py"}


def test_only_the_secure_module_the_schema_and_the_places_that_choose_the_mode_name_the_setting():
    """`git grep` for the setting and the old flags: only secure.py, settings.py and the places that pass the
    setting to secure_mode (facts.py carries it in the announcement) name it; nothing tests is_encrypted."""
    out = subprocess.run(["git", "grep", "-n", r"secure_aggregation\|\.encrypted\b\|is_encrypted", "--",
                          "nvflare_lora", "exporters"], cwd=ROOT, capture_output=True, text=True).stdout
    files = {line.split(":", 1)[0] for line in out.splitlines()}
    assert files - {"nvflare_lora/secure.py", "nvflare_lora/settings.py"} <= CHOOSERS, sorted(files)
    tests_of_the_flag = [line for line in out.splitlines()
                         if not line.startswith(("nvflare_lora/secure.py", "nvflare_lora/settings.py"))
                         and re.search(r"==\s*[\"']he[\"']|\w\.encrypted\b(?!\.)|is_encrypted", line)]
    assert not tests_of_the_flag, tests_of_the_flag


# ---- one owner of each default ---------------------------------------------------------------------------------
def defaults(call) -> dict:
    return {n: p.default for n, p in inspect.signature(call).parameters.items()
            if p.default is not inspect.Parameter.empty}


def library_defaults():
    """(section, library class or function, {section field: what the library calls it}) for every section."""
    from nvflare_lora.aggregation import Robustness
    from nvflare_lora.aggregation.server import ServerAggregation
    from nvflare_lora.config import LoRAConfig
    from nvflare_lora.data import SiteLoader, site_datasets
    from nvflare_lora.facts import JobFacts
    from nvflare_lora.fl.filters.compressor import AdapterCompressor
    from nvflare_lora.head import Head
    from nvflare_lora.lora_model import FederatedCLIPModel
    from nvflare_lora.training import train_local

    lora = LoRAConfig()
    head = Head()
    robust = Robustness()
    fed = defaults(FederatedCLIPModel.__init__)
    return [
        (st.ModelSection, "FederatedCLIPModel", {"model": fed["model_name"], "num_classes": fed["num_classes"],
                                                 "labels": fed["labels"]}),
        (st.LoRASection, "LoRAConfig", {"r": lora.r, "lora_alpha": lora.lora_alpha, "lora_dropout": lora.lora_dropout,
                                        "target_modules": lora.target_modules, "seed": lora.seed}),
        (st.HeadSection, "Head", {"head": head.kind, "head_init": head.init}),
        (st.HeadSection, "FederatedCLIPModel", {"head": fed["head"], "prompt_templates": fed["templates"]}),
        (st.AggregationSection, "Robustness", {n: getattr(robust, n) for n in
                                               ("estimator", "clip_multiple", "trim_fraction", "weighting",
                                                "max_weight_ratio", "min_agreement")}),
        (st.AggregationSection, "JobFacts", {"aggregation": defaults(JobFacts)["aggregation"]}),
        (st.SecureSection, "JobFacts", {"secure_aggregation": defaults(JobFacts)["secure_aggregation"]}),
        (st.PrivacySection, "JobFacts", {"site_clip_norm": defaults(JobFacts)["site_clip_norm"]}),
        (st.PrivacySection, "ServerAggregation", {"client_dp": defaults(ServerAggregation.__init__)["client_dp"]}),
        (st.CompressionSection, "AdapterCompressor", {"compression": defaults(AdapterCompressor.__init__)["mode"]}),
        (st.DataSection, "site_datasets", {"max_bad_images": defaults(site_datasets)["max_bad_images"]}),
        (st.DataSection, "SiteLoader", {"num_workers": defaults(SiteLoader.__init__)["num_workers"]}),
        (st.TrainingSection, "FederatedCLIPModel", {"lr": fed["learning_rate"], "weight_decay": fed["weight_decay"],
                                                    "max_grad_norm": fed["max_grad_norm"], "device": fed["device"]}),
        (st.TrainingSection, "train_local", {"local_epochs": defaults(train_local)["epochs"],
                                             "max_steps": defaults(train_local)["max_steps"],
                                             "batch_size": defaults(train_local)["batch_size"],
                                             "lr": defaults(train_local)["lr"],
                                             "weight_decay": defaults(train_local)["weight_decay"],
                                             "max_grad_norm": defaults(train_local)["max_grad_norm"],
                                             "train_seed": defaults(train_local)["seed"]}),
    ]


LIBRARY_NAMES = {"FederatedCLIPModel": {"lr": "learning_rate", "head": "head", "prompt_templates": "templates"},
                 "train_local": {"local_epochs": "epochs", "train_seed": "seed"},
                 "AdapterCompressor": {"compression": "mode"}}


def test_every_library_class_built_with_no_arguments_has_its_sections_defaults_or_a_stated_reason():
    differ = []
    for section, library, values in library_defaults():
        own = section()
        for field, value in values.items():
            if getattr(own, field) != value:
                differ.append((library, LIBRARY_NAMES.get(library, {}).get(field, field), getattr(own, field), value))
    unexplained = [d for d in differ if d[:2] not in st.LIBRARY_DEFAULTS_THAT_DIFFER]
    assert not unexplained, f"(library, field, section's default, library's default): {unexplained}"
    stale = set(st.LIBRARY_DEFAULTS_THAT_DIFFER) - {d[:2] for d in differ}
    assert not stale, f"LIBRARY_DEFAULTS_THAT_DIFFER lists defaults that agree now: {stale}"
    # the section of the head default for the LoRA components: the linear head's default is LoRAConfig's
    from nvflare_lora.config import LoRAConfig

    assert st.LoRASection().components("linear") == LoRAConfig().target_components


def test_a_section_is_what_its_library_class_takes_and_checks_its_own_fields_naming_itself():
    from nvflare_lora.aggregation import Robustness
    from nvflare_lora.head import Head

    s = st.JobSettings(r=8, estimator="median", head_init="zeroshot", initial_adapter="x")
    assert s.section(st.AggregationSection).robustness() == s.robustness() == \
        Robustness(estimator="median", clip_multiple=2.0, trim_fraction=0.25, max_weight_ratio=2.0, min_agreement=0.5)
    assert s.section(st.LoRASection).lora_config() == s.lora_config()
    assert s.section(st.HeadSection).head_spec() == Head(init="zeroshot", templates=("a photo of a {}.",))
    for section, kw, message in ((st.LoRASection, dict(r="8"), r"^lora: r must be an integer, got '8'"),
                                 (st.LoRASection, dict(r=0), r"^lora: LoRA rank r must be a positive integer"),
                                 (st.AggregationSection, dict(estimator="mode"), r"^aggregation: estimator must be"),
                                 (st.DataSection, dict(val_fraction=1.5), r"^data: val_fraction must be in \(0, 1\)"),
                                 (st.TrainingSection, dict(batch_size=2.5), r"^training: batch_size must be an integer"),
                                 (st.PrivacySection, dict(dp=[1]), r"^privacy: dp must be a mapping or null"),
                                 (st.HeadSection, dict(prompt_templates=["no slot"]), r"^head: prompt_templates must"),
                                 (st.RoundsSection, dict(cross_site_eval="yes"), r"^rounds: cross_site_eval must be "
                                                                                r"true or false")):
        with pytest.raises(st.SettingsError, match=message):
            section(**kw)
        with pytest.raises(st.SettingsError, match=message):  # the same words in the whole job's settings
            st.JobSettings(**kw)
    with pytest.raises(st.SettingsError, match="min_clients .3. exceeds num_sites .2."):  # where two sections meet
        st.JobSettings(min_clients=3, num_sites=2)


# ---- the docs name what exists ---------------------------------------------------------------------------------
DOTTED = re.compile(r"\b((?:nvflare_lora|exporters)(?:\.[A-Za-z_]\w*)+)")
PATHS = re.compile(r"\b((?:nvflare_lora|exporters|benchmarks|tests|jobs|deploy|docs)/[\w/.*-]*[\w*])")
FILE_NAMES = (".json", ".md", ".conf", ".yml", ".txt", ".onnx", ".safetensors", ".sig")  # nvflare_lora.json is a file
WRITTEN = ("benchmarks/out/",)  # what the benchmarks write (git-ignored), named as where to look


def resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def texts():
    for f in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]:
        yield f, f.read_text()
    for f in sorted(list(PACKAGE.rglob("*.py")) + list((ROOT / "exporters").rglob("*.py"))):
        tree = ast.parse(f.read_text())
        docs = [ast.get_docstring(n) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        comments = [line.split("#", 1)[1] for line in f.read_text().splitlines() if "#" in line]
        yield f, "\n".join([d for d in docs if d] + comments)


def test_every_module_and_file_the_docs_and_docstrings_name_exists():
    missing = []
    for f, text in texts():
        for dotted in set(DOTTED.findall(text)):
            dotted = dotted.rstrip(".")
            if dotted.endswith(FILE_NAMES):
                continue
            if not resolves(dotted) and not (ROOT / dotted.replace(".", "/")).with_suffix(".py").exists():
                missing.append(f"{f.relative_to(ROOT)}: {dotted}")
        for path in set(PATHS.findall(text)):
            if "*" in path or path.startswith(WRITTEN):
                continue
            if not (ROOT / path).exists() and not (ROOT / path).with_suffix(".py").exists():
                missing.append(f"{f.relative_to(ROOT)}: {path}")
    assert not missing, "\n".join(sorted(missing))
