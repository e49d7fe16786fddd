"""This party's startup kit in a provisioned system (NVFlare's secure mode): whether there is one, the key that
signs what the server saves, and the project's root CA its checkpoints are checked against (nvflare_lora.signing).
The simulator and POC without provisioning have no kit: checkpoints there carry an unsigned manifest."""

from __future__ import annotations

from typing import Optional

from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext

from ..signing import Signer, TrustRoot


def provisioned(fl_ctx: FLContext) -> bool:
    """Whether this party runs from a provisioned startup kit (mutual TLS): NVFlare's secure mode."""
    return bool(fl_ctx.get_prop(FLContextKey.SECURE_MODE, False))


def _startup(fl_ctx: FLContext) -> str:
    return fl_ctx.get_engine().get_workspace().get_startup_kit_dir()


def kit_signer(fl_ctx: FLContext) -> Optional[Signer]:
    """This party's key and certificate in a provisioned system, else None; a kit without them: SignatureError."""
    return Signer.from_kit(_startup(fl_ctx)) if provisioned(fl_ctx) else None


def kit_trust(fl_ctx: FLContext) -> Optional[TrustRoot]:
    """The project's root CA (startup/rootCA.pem) in a provisioned system, else None."""
    return TrustRoot(_startup(fl_ctx)) if provisioned(fl_ctx) else None
