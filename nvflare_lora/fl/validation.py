"""Server-side check of every site's update before it can reach the aggregator.

Placed in the server's task_result_filters (after any decompressor), it refuses an update whose key
set, shapes or dtypes differ from the global adapter's, that holds NaN or Inf, or whose L2 norm
exceeds a bound (or clips it). A refused update raises, so NVFlare turns that result into an error
reply: it is left out of aggregation, the reason is logged with the site name and counted in
communication.json, and the round goes on with the other sites while min_clients still hold.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from ..adapter import AdapterMismatchError, check_adapter


class UpdateRefused(ValueError):
    """A site's update does not fit the global adapter or breaks a bound."""


def check_update(data: dict, shapes: dict, max_norm: Optional[float] = None, norm_action: str = "reject"):
    """Return the (possibly clipped) update, or raise UpdateRefused saying why."""
    try:
        check_adapter(data, shapes, "update")  # exact key set, shapes, finite values
    except AdapterMismatchError as e:
        raise UpdateRefused(str(e)) from None
    for k, v in data.items():
        if not isinstance(v, np.ndarray) or v.dtype != np.float32:
            raise UpdateRefused(f"update: tensor {k!r} is {getattr(v, 'dtype', type(v).__name__)}, expected float32")
    if max_norm is not None:
        norm = float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in data.values())))
        if norm > max_norm:
            if norm_action == "clip":
                scale = np.float32(max_norm / norm)
                return {k: v * scale for k, v in data.items()}, f"clipped L2 norm {norm:.4g} to {max_norm:.4g}"
            raise UpdateRefused(f"update: L2 norm {norm:.4g} exceeds max_norm {max_norm:.4g}")
    return data, None


def check_steps(steps) -> None:
    """The site's reported local steps weigh its update in the aggregator (weight x steps, then divided by
    the sum of weights): a zero, negative or non-finite count would break the weighted mean (a NaN
    aggregate, or a near-zero sum of weights that amplifies every update past any norm bound)."""
    if steps is None:
        return  # NVFlare's aggregators then count the update once
    if isinstance(steps, bool) or not isinstance(steps, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(steps)) or float(steps) <= 0:
        raise UpdateRefused(f"update: {MetaKey.NUM_STEPS_CURRENT_ROUND} is {steps!r}, expected a finite number > 0")


class AdapterUpdateValidator(DXOFilter):
    """Refuses (or clips) malformed or out-of-bound adapter updates from sites.

    Args:
        persistor_id: the AdapterPersistor (or LoRAAggregationPersistor) that knows the shapes each
            site's update must have.
        max_norm: optional bound on an update's L2 norm (over all its tensors); None: no bound.
        norm_action: "reject" (leave the update out) or "clip" (scale it down to max_norm).
        communication_log_id: the CommunicationLog that counts refusals (empty: none).
    """

    def __init__(self, persistor_id: str = "persistor", max_norm: Optional[float] = None,
                 norm_action: str = "reject", communication_log_id: str = "communication_log"):
        super().__init__(supported_data_kinds=[DataKind.WEIGHT_DIFF, DataKind.WEIGHTS],
                         data_kinds_to_filter=[DataKind.WEIGHT_DIFF, DataKind.WEIGHTS])
        if norm_action not in ("reject", "clip"):
            raise ValueError(f"norm_action must be 'reject' or 'clip', got {norm_action!r}")
        if max_norm is not None and not max_norm > 0:
            raise ValueError(f"max_norm must be > 0 or null, got {max_norm!r}")
        self.persistor_id = persistor_id
        self.max_norm = max_norm
        self.norm_action = norm_action
        self.communication_log_id = communication_log_id

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        # DXOFilter passes a DXO with no data through untouched; an empty update must be refused too.
        if shareable.get_return_code() == ReturnCode.OK:
            try:
                dxo = from_shareable(shareable)
            except Exception:
                dxo = None
            if dxo is not None and dxo.data_kind in self.data_kinds and not dxo.data:
                self.process_dxo(dxo, shareable, fl_ctx)
        return super().process(shareable, fl_ctx)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> Optional[DXO]:
        engine = fl_ctx.get_engine()
        site = fl_ctx.get_peer_context().get_identity_name("?") if fl_ctx.get_peer_context() else "?"
        # what this site must send: under LoRAAggregationPersistor, its own rank (site_ranks) and the
        # rule's keys (no lora_A under ffa); under AdapterPersistor, the global adapter's shapes
        shapes = engine.get_component(self.persistor_id).adapter_shapes(site)
        try:
            check_steps(dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND))
            data, note = check_update(dxo.data or {}, shapes, self.max_norm, self.norm_action)
        except UpdateRefused as e:
            self.log_error(fl_ctx, f"refused the update of {site}: {e}")
            log = engine.get_component(self.communication_log_id) if self.communication_log_id else None
            if log is not None:
                log.record_refusal(fl_ctx, site, str(e))
            raise
        if note:
            self.log_warning(fl_ctx, f"update of {site}: {note}")
            dxo.data = data
            return dxo
        return None  # unchanged
