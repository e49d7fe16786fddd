"""Let an NVFlare workspace build nvflare_lora components: `python -m nvflare_lora.allow WORKSPACE [...]`.

NVFlare 2.9 builds only job components whose class path is on the site's `class_allow_list`
(local/resources.json; the built-in default lists NVFlare's own classes). A job that uses an installed
package instead of custom/ code needs that package on the list. This adds the prefix "nvflare_lora."
to WORKSPACE/local/resources.json, keeping everything already there (starting from NVFlare's default
list when the file has none). WORKSPACE is a simulator workspace (-w) or a provisioned startup kit
(server or site folder: the one holding local/ and startup/).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

from .files import atomic_write

PREFIX = "nvflare_lora."  # a trailing dot: every class under the package


def allow(workspace: str | Path, prefix: str = PREFIX) -> Path:
    local = Path(workspace) / "local"
    local.mkdir(parents=True, exist_ok=True)
    path = local / "resources.json"
    resources = {}
    if path.is_file():
        resources = json.loads(path.read_text())
    elif (local / "resources.json.default").is_file():  # provisioned kits ship the defaults here
        resources = json.loads((local / "resources.json.default").read_text())
    allow_list = list(resources.get("class_allow_list", DEFAULT_CLASS_ALLOW_LIST))
    if prefix not in allow_list and "*" not in allow_list:
        allow_list.append(prefix)
    resources["class_allow_list"] = allow_list
    return atomic_write(path, json.dumps(resources, indent=2) + "\n")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nvflare_lora.allow", description=__doc__.splitlines()[0],
                                epilog="\n".join(__doc__.splitlines()[2:]).strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workspaces", nargs="+", metavar="WORKSPACE",
                   help="a simulator workspace (-w) or a provisioned startup kit (the folder holding local/)")
    return p


def main(argv=None) -> int:
    for ws in parser().parse_args(argv).workspaces:
        print(f"allowed '{PREFIX}' components in {allow(ws)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
