"""What travels with the adapter tensors: the DXO meta keys and headers between server and sites.

Server -> site, with every task: ANNOUNCE_KEY, the job's facts (nvflare_lora.facts.JobFacts.announcement).
Site -> server, with every update: its metrics, bad images and DP spend. Filters add COMPRESSION_META_KEY.
"""

from __future__ import annotations

import json

import numpy as np

from ..errors import NVFlareLoRAError
from ..secure import SHAPES_KEY

ANNOUNCE_KEY = "nvflare_lora"          # server -> site: {"model", "fingerprint", "lora_config", "num_classes", "labels",
#                                        "aggregation", "site_ranks", "head", the secure mode, "site_clip_norm"}
# In an encrypted (HE) job no key marks the ciphertexts: a ciphertext travels as a uint8 array, a clear tensor as
# float32 (nvflare_lora.secure), and the global model's meta carries every tensor's shape (secure.SHAPES_KEY).
TRAIN_LOSS_KEY = "nvflare_lora_train_loss"    # site -> server: mean local training loss this round
VAL_COUNT_KEY = "nvflare_lora_val_count"      # site -> server: size of the validation split behind INITIAL_METRICS
EPSILON_KEY = "nvflare_lora_epsilon"          # site -> server: the site's DP-SGD epsilon spent so far (at its delta)
VAL_SPLIT_KEY = "nvflare_lora_val_split"       # site -> server: how the site split its data (data.split_record)
BAD_IMAGES_KEY = "nvflare_lora_bad_images"    # site -> server: unreadable images of this site skipped so far
FATAL_HEADER = "nvflare_lora_fatal"           # site -> server (reply header): why this site cannot take part
DISTRUST_KEY = "nvflare_lora_distrust"        # site -> server (HE): why it did not train from the global adapter sent
REFUSED_PROP = "nvflare_lora_refused"         # server fl_ctx, set by the aggregator: why it refused a contribution
RESUMED_CLIENT_DP_PROP = "nvflare_lora_resumed_client_dp"  # server fl_ctx, set by the persistor on resume: the
#                                                            client_dp accountant's history the checkpoint holds
AGGREGATION_INFO_PROP = "nvflare_lora_aggregation"  # server fl_ctx and aggregate meta: what the round's aggregation did

COMPRESSION_META_KEY = "nvflare_lora_compression"  # set by compression filters: {"mode", "raw_bytes", ...}


class ProtocolError(NVFlareLoRAError):
    """A task or a global model without what the other side's component puts there: the job pairs components that
    do not belong together (the message names the one to use)."""


def global_shapes(model) -> dict:
    """Every tensor's shape of a global model (a ModelLearnable): from its meta where its tensors may be ciphertexts
    (the persistor puts them there under HE: nvflare_lora.secure.SHAPES_KEY), else from the tensors."""
    shapes = ((model or {}).get("meta") or {}).get(SHAPES_KEY)
    if shapes:
        return {k: tuple(v) for k, v in shapes.items()}
    return {k: tuple(np.shape(v)) for k, v in ((model or {}).get("weights") or {}).items()}


def payload_bytes(obj) -> int:
    """Bytes of a DXO's data as it travels: arrays by nbytes, nested dicts walked, the rest as JSON."""
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, dict):
        return int(sum(len(str(k)) + payload_bytes(v) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)) and any(isinstance(v, (np.ndarray, dict)) for v in obj):
        return int(sum(payload_bytes(v) for v in obj))
    if isinstance(obj, (bytes, bytearray)):
        return len(obj)
    return len(json.dumps(obj, default=str))
