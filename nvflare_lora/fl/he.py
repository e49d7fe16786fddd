"""The CKKS context of this party's startup kit (an encrypted job: nvflare_lora.secure), read as NVFlare's HE filters read
it, and the key's fingerprint in the server's kit (kit_key)."""

from __future__ import annotations

import json

from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.fuel.sec.security_content_service import LoadResult, SecurityContentService

from ..secure import KEY_FILE, SecureAggregationError, load_context


def kit_context(fl_ctx: FLContext, file: str, secret: bool):
    """The context in this party's kit (`file`: client_context.tenseal at a site, server_context.tenseal at the
    server) through NVFlare's SecurityContentService: a missing or invalid file, and in secure mode an unsigned one
    or one whose signature fails, are refused (NVFlare's own rule), naming the file and where HE jobs run."""
    bad = [LoadResult.INVALID_CONTENT, LoadResult.NO_SUCH_CONTENT]
    if fl_ctx.get_prop(FLContextKey.SECURE_MODE, True):
        bad += [LoadResult.INVALID_SIGNATURE, LoadResult.NOT_SIGNED]
    try:
        data, rc = SecurityContentService.load_content(file)
    except Exception as e:  # no security content service (the simulator)
        data, rc = None, f"{type(e).__name__}: {e}"
    if data is None or rc in bad:
        raise SecureAggregationError(
            f"{fl_ctx.get_identity_name()}: this job aggregates encrypted updates (HE) but the "
            f"startup kit has no usable {file} ({rc}): provision the project with NVFlare's HEBuilder "
            f"(deploy/README.md) or `nvflare poc prepare --he`; the simulator has no HE context: run HE jobs in POC "
            f"or a provisioned system")
    return load_context(data, file, secret=secret)


def kit_key(fl_ctx: FLContext):
    """The fingerprint of the project's HE key in the server's kit (KEY_FILE, written by nvflare_lora.fl.provision.HEKeyBuilder
    at provisioning and signed with the kit), or None where the project was provisioned without it (sites then cannot
    check their key at set-up; GlobalCheck still finds a wrong one's garbage)."""
    try:
        data, rc = SecurityContentService.load_content(KEY_FILE)
    except Exception:  # no security content service (the simulator)
        return None
    if data is None or rc in (LoadResult.INVALID_CONTENT, LoadResult.NO_SUCH_CONTENT):
        return None
    if fl_ctx.get_prop(FLContextKey.SECURE_MODE, True) and rc in (LoadResult.INVALID_SIGNATURE, LoadResult.NOT_SIGNED):
        raise SecureAggregationError(f"the server's kit's {KEY_FILE} is not signed by the project ({rc}): provision "
                                     f"again (deploy/README.md)")
    try:
        return str(json.loads(data)["key_fingerprint"])
    except (ValueError, KeyError, TypeError) as e:
        raise SecureAggregationError(f"the server's kit's {KEY_FILE} is not a key fingerprint record ({e})") from None
