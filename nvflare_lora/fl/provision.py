"""A provisioning builder for encrypted projects: NVFlare's HEBuilder plus the key's fingerprint, and a way to keep the
key when a site is added (deploy/README.md). Named in deploy/project.yml; needs TenSEAL (the he extra)."""

from __future__ import annotations

import json
from pathlib import Path

from nvflare.lighter.impl.he import HEBuilder

from ..secure import KEY_FILE, key_fingerprint, load_context


class HEKeyBuilder(HEBuilder):
    """NVFlare's HEBuilder (same arguments and files: server_context.tenseal, client_context.tenseal), plus the key's
    fingerprint in the server's kit (nvflare_lora.secure.KEY_FILE, signed with the kit by SignatureBuilder, which runs
    after it): the server announces it and a site whose key differs refuses at set-up, naming both.

    existing_context: a site's startup/client_context.tenseal from an earlier provisioning of this project: its key is
    used instead of a new one, so that a site added later (the project provisioned again with the same state folder,
    deploy/README.md) holds the key the running sites hold. HEBuilder alone makes a new key at every provisioning."""

    def __init__(self, existing_context: str = "", **kwargs):
        super().__init__(**kwargs)
        self.existing_context = existing_context

    def initialize(self, project, ctx):
        if not self.existing_context:
            return super().initialize(project, ctx)
        path = Path(self.existing_context).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"HEKeyBuilder existing_context {path} does not exist: give a site's "
                                    f"startup/client_context.tenseal from this project's earlier provisioning")
        self._context = load_context(path.read_bytes(), str(path), secret=True)

    def build(self, project, ctx):
        super().build(project, ctx)
        server = project.get_server()
        if server:
            record = {"key_fingerprint": key_fingerprint(self._context), "scheme": "CKKS",
                      "written_by": "nvflare_lora.fl.provision.HEKeyBuilder"}
            (Path(ctx.get_kit_dir(server)) / KEY_FILE).write_text(json.dumps(record, indent=2) + "\n")
