"""Provisioned NVFlare startup kits: what this package reads from them."""

from __future__ import annotations

import json
from pathlib import Path


def admin_user(admin_kit: str | Path) -> str:
    """The admin's user name, as provisioned into its kit (startup/fed_admin.json)."""
    config = Path(admin_kit) / "startup" / "fed_admin.json"
    if not config.is_file():
        raise FileNotFoundError(f"{admin_kit} is not an admin startup kit: {config} is missing")
    return json.loads(config.read_text())["admin"]["username"]
