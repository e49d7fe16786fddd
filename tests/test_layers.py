"""The package's layers and its one error family, read from the source files (ast): general tools at the bottom,
and every refusal of bad input an NVFlareLoRAError (itself a ValueError, so callers that catch ValueError still do)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

from nvflare_lora.errors import NVFlareLoRAError

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(list((ROOT / "nvflare_lora").rglob("*.py")) + list((ROOT / "exporters").rglob("*.py")))


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def name_of(node) -> str:
    """The last part of a name or an attribute (`ValueError`, `codec.CompressionError` -> `CompressionError`)."""
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


# ---- one error family ------------------------------------------------------------------------------------------
# The builtins a refusal of bad input used to be. What else the package raises keeps its own meaning: RuntimeError
# for a call in the wrong order, OSError and its kin for the file system, ModuleNotFoundError for a missing extra.
GENERIC = {"ValueError", "TypeError", "KeyError", "Exception"}


def test_no_module_of_the_package_or_the_exporter_raises_a_bare_builtin_error_for_bad_input():
    bare = []
    for f in SOURCES:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None and isinstance(
                    node.exc.func if isinstance(node.exc, ast.Call) else node.exc, ast.Name) \
                    and name_of(node.exc) in GENERIC:
                bare.append(f"{f.relative_to(ROOT)}:{node.lineno}: raise {name_of(node.exc)}")
    assert not bare, ("raise a subclass of nvflare_lora.errors.NVFlareLoRAError (the module's own error class) "
                      "instead:\n" + "\n".join(bare))


# Exception classes whose name says they are not a refusal of bad input, and why.
NOT_BAD_INPUT = {
    "Aborted": "training stopped because the abort signal said so (a RuntimeError): nothing the user gave is wrong",
}


def defined_exception_classes():
    """(module, class name, file:line) of every class whose bases end in Error or Exception."""
    for f in SOURCES:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ClassDef) and any(name_of(b).endswith(("Error", "Exception")) for b in node.bases):
                yield module_name(f), node.name, f"{f.relative_to(ROOT)}:{node.lineno}"


def test_every_error_class_of_the_package_and_the_exporter_is_an_nvflare_lora_error_and_a_value_error():
    found = list(defined_exception_classes())
    assert {"CompressionError", "DataError", "LoRAConfigError", "AggregationError", "VerificationError"} <= \
        {name for _, name, _ in found}, "the walk missed classes it must see"
    outside = []
    for module, name, where in found:
        cls = getattr(importlib.import_module(module), name)
        if name in NOT_BAD_INPUT:
            assert not issubclass(cls, NVFlareLoRAError), f"{where}: {name} is listed as not bad input, yet is one"
        elif not (issubclass(cls, NVFlareLoRAError) and issubclass(cls, ValueError)):
            outside.append(f"{where}: {name} derives from {[b.__name__ for b in cls.__mro__[1:-1]]}")
    assert not outside, "derive these from nvflare_lora.errors.NVFlareLoRAError:\n" + "\n".join(outside)


def test_a_verification_failure_is_an_nvflare_lora_error_but_not_an_export_error_so_it_keeps_its_exit_status():
    from exporters.onnx.errors import ExportError, VerificationError

    assert issubclass(VerificationError, NVFlareLoRAError) and not issubclass(VerificationError, ExportError)
    assert (VerificationError.exit_code, ExportError.exit_code) == (1, 2)


# ---- general tools at the bottom -------------------------------------------------------------------------------
def test_the_file_tools_import_nothing_of_the_package_and_only_the_standard_library():
    tree = ast.parse((ROOT / "nvflare_lora" / "files.py").read_text())
    imported = [(node.lineno, node.level, node.module or "") if isinstance(node, ast.ImportFrom)
                else (node.lineno, 0, alias.name)
                for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in ([None] if isinstance(node, ast.ImportFrom) else node.names)]
    not_stdlib = [f"nvflare_lora/files.py:{line}: {'.' * level}{name}" for line, level, name in imported
                  if level or name.split(".")[0] not in sys.stdlib_module_names and name != "__future__"]
    assert not not_stdlib, not_stdlib
    loaded = subprocess.run([sys.executable, "-c", "import sys, nvflare_lora.files; print(sorted(m for m in "
                             "sys.modules if m.split('.')[0] in ('nvflare_lora', 'numpy', 'torch')))"],
                            capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    assert loaded == str(["nvflare_lora", "nvflare_lora.files"]), loaded  # the package's __init__ is lazy (PEP 562)


# ---- benchmarks and tests each with their own helpers ----------------------------------------------------------
# What both use is in nvflare_lora/testing/, what only tests use in tests/support/, what only benchmarks use in
# benchmarks/_*.py; a benchmark script runs from any folder with nothing but its own folder on sys.path.
BENCHMARKS = ROOT / "benchmarks"
TEST_MODULES = {"tests", "support", "conftest"} | {p.stem for p in (ROOT / "tests").glob("*.py")}


def absolute_imports(path: Path):
    """(line, first part of the module name) of every absolute import in a file (ast)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name.split(".")[0]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            yield node.lineno, node.module.split(".")[0]


def test_no_benchmark_edits_sys_path_or_imports_a_test_or_another_benchmark_script():
    scripts = {p.stem for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_")}
    assert {"quality", "privacy", "site", "gpu_check", "params", "federation"} <= scripts, scripts
    bad = []
    for f in sorted(BENCHMARKS.glob("*.py")):
        rel, text = f.relative_to(ROOT), f.read_text()
        if "sys.path" in text:
            bad.append(f"{rel}: mentions sys.path")
        for loader in ("spec_from_file_location", "run_path", "SourceFileLoader"):  # an import by file path
            if loader in text:
                bad.append(f"{rel}: loads a module by its file ({loader})")
        for line, top in absolute_imports(f):
            if top in scripts - {f.stem}:
                bad.append(f"{rel}:{line}: imports the benchmark script {top}.py (move what both use to a "
                           f"benchmarks/_*.py module)")
            if top in TEST_MODULES:
                bad.append(f"{rel}:{line}: imports {top} from tests/ (move what both use to nvflare_lora/testing/)")
    assert not bad, "\n".join(bad)


def test_the_package_and_the_exporter_import_no_test_or_benchmark_module():
    outside = TEST_MODULES | {p.stem for p in BENCHMARKS.glob("*.py")}
    bad = [f"{f.relative_to(ROOT)}:{line}: imports {top}" for f in SOURCES for line, top in absolute_imports(f)
           if top in outside]
    assert not bad, "\n".join(bad)
