"""docs/cli.md: every command-line entry point's --help, from its own parser (each module's parser()).
Regenerate with `python tests/support/cli.py > docs/cli.md`; tests/test_recipe.py checks that the page is this."""

import importlib
import os
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# (the command as a user types it, the module or script that holds its parser()), in the order of a run
ENTRY_POINTS = [
    ("python -m nvflare_lora.allow", "nvflare_lora.allow"),
    ("python jobs/clip_lora/job.py", REPO / "jobs" / "clip_lora" / "job.py"),
    ("python -m nvflare_lora.settings", "nvflare_lora.settings"),
    ("python -m nvflare_lora.sample_data", "nvflare_lora.sample_data"),
    ("python -m nvflare_lora.zeroshot", "nvflare_lora.zeroshot"),
    ("python deploy/submit.py", REPO / "deploy" / "submit.py"),
    ("python -m nvflare_lora.checkpoint", "nvflare_lora.checkpoint"),
    ("python -m exporters.onnx", "exporters.onnx.__main__"),
    ("python -m exporters.onnx.predict", "exporters.onnx.predict"),
    ("python -m exporters.onnx.serve", "exporters.onnx.serve"),
    ("python -m nvflare_lora.jobfolder", "nvflare_lora.jobfolder"),
]
WIDTH = "110"  # argparse wraps to the terminal's width: a fixed one, so that the page does not depend on it


def parser_of(where):
    if isinstance(where, Path):  # a script: its parser() without running its main
        return runpy.run_path(str(where), run_name="cli_reference")["parser"]()
    return importlib.import_module(where).parser()


def reference() -> str:
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        parts = ["# Command-line reference\n",
                 "Every command of nvflare-lora with its `--help`, generated from the commands' own parsers "
                 "(`python tests/support/cli.py > docs/cli.md`; a test checks that this page is what they say). "
                 "What the job settings mean: [settings.md](settings.md). `nvflare simulator`, `nvflare provision` "
                 "and `nvflare poc` are NVFlare's own.\n"]
        for command, where in ENTRY_POINTS:
            parts.append(f"## `{command}`\n\n```text\n{parser_of(where).format_help()}```\n")
        return "\n".join(parts)
    finally:
        if columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = columns


if __name__ == "__main__":
    sys.stdout.write(reference())
