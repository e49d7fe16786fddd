"""A faulty site: a real CLIPLoRAExecutor that corrupts its own update in chosen rounds (a job names it
nvflare_lora.testing.faults.FaultyExecutor: simulator.make_job(faults=...)), and the in-process round's channel
that does the same (fault_channel), for the server's validation and robustness tests and benchmarks/robustness.py."""

import os

import numpy as np
from nvflare.apis.dxo import MetaKey, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.shareable import make_reply
from nvflare.app_common.app_constant import AppConstants

from nvflare_lora.errors import NVFlareLoRAError
from nvflare_lora.fl.site.executor import CLIPLoRAExecutor
from nvflare_lora.testing.attacks import ATTACKS, attack_channel


def corrupt(data: dict, fault: str) -> dict:
    data = dict(data)
    k = sorted(data)[0]
    if fault == "extra_key":
        data["base_model.model.vision_model.embeddings.patch_embedding.weight"] = np.zeros((64, 3, 8, 8), np.float32)
    elif fault == "missing_key":
        del data[k]
    elif fault == "wrong_shape":
        data[k] = np.zeros((3, 3), np.float32)
    elif fault == "nan":
        data[k] = data[k].copy()
        data[k].flat[0] = np.nan
    elif fault == "inf":
        data[k] = data[k].copy()
        data[k].flat[-1] = np.inf
    elif fault == "huge":
        data = {key: v * np.float32(1e6) for key, v in data.items()}
    elif fault == "x1e4":  # finite, well-formed, 10^4 times too large (a learning-rate bug, or an attack)
        data = {key: v * np.float32(1e4) for key, v in data.items()}
    elif fault == "sign_flip":  # the site's own update, pointing the other way
        data = {key: -v for key, v in data.items()}
    elif fault == "float64":
        data[k] = data[k].astype(np.float64)
    else:
        raise NVFlareLoRAError(f"unknown fault {fault!r}")
    return data


STEP_FAULTS = {"steps1e9": 10**9}  # the update as trained, with an inflated NUM_STEPS_CURRENT_ROUND


def fault_channel(faults: dict, rnd: int):
    """The in-process round's channel (nvflare_lora.round.Channel) that does to round `rnd`'s updates what
    FaultyExecutor does to its replies: faults {site: {round: fault}} ("*": every round) is a fault of
    corrupt(), an inflated step count (STEP_FAULTS), or "nothing" (no reply)."""
    def send(site, update, steps):
        fault = faults.get(site, {}).get(rnd, faults.get(site, {}).get("*"))
        if fault is None:
            return update, steps
        if fault == "nothing":
            return None
        if fault in STEP_FAULTS:
            return update, STEP_FAULTS[fault]
        return corrupt(update, fault), steps
    return send


class FaultyExecutor(CLIPLoRAExecutor):
    """faults: {"site-3": {"0": "extra_key", "1": "nan"}} ("*": every round); "nothing" sends an error reply
    instead, "die" kills the site's process before it replies; under HE an attack of
    nvflare_lora.testing.attacks (wrong_level, x100, ...) done with the site's own key."""

    def __init__(self, faults: dict = None, **kwargs):
        super().__init__(**kwargs)
        self.faults = faults or {}
        self._sent = {}  # what the site sent before (the replay attacks)

    def execute(self, task_name, shareable, fl_ctx, abort_signal):
        rnd = shareable.get_header(AppConstants.CURRENT_ROUND, None)
        reply = super().execute(task_name, shareable, fl_ctx, abort_signal)
        site_faults = self.faults.get(fl_ctx.get_identity_name(), {})
        fault = site_faults.get(str(rnd), site_faults.get("*"))
        if task_name == self.train_task_name and fault == "die":
            os._exit(1)  # the site's process dies in the middle of the round, after training
        if task_name != self.train_task_name or not fault:
            return reply
        if fault == "nothing":
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        dxo = from_shareable(reply)
        if fault in ATTACKS:  # encrypted: the attack, done with this site's key
            site = fl_ctx.get_identity_name()
            send = attack_channel(fault, site, int(rnd), self.site.mode.context, self._sent)
            dxo.data, steps = send(site, dxo.data, dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND))
            dxo.set_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, steps)
            return dxo.update_shareable(reply)
        if fault in STEP_FAULTS:
            dxo.set_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, STEP_FAULTS[fault])
            return dxo.update_shareable(reply)
        dxo.data = corrupt(dxo.data, fault)
        return dxo.update_shareable(reply)
