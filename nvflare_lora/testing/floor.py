"""The floor of a site task: an executor that imports what CLIPLoRAExecutor needs (torch, transformers' CLIP,
peft) and answers every task at once with a valid, empty result (a zero WEIGHT_DIFF of the global adapter's
keys, one step; validation metrics of 0). Run in the default job's place (a job names it
nvflare_lora.testing.floor.FloorExecutor), it measures what NVFlare's simulator itself costs per task, so that
benchmarks/newcomer.py can say how much of a run is ours."""

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.shareable import make_reply

from nvflare_lora.fl.protocol import TRAIN_LOSS_KEY, VAL_COUNT_KEY


class FloorExecutor(Executor):
    def __init__(self, **_job_args):  # takes the job's CLIPLoRAExecutor arguments and ignores them
        super().__init__()

    def execute(self, task_name, shareable, fl_ctx, abort_signal):
        import peft  # noqa: F401  what a real site imports before its first step
        import torch  # noqa: F401
        from transformers import CLIPModel  # noqa: F401

        if task_name == "train":
            dxo = from_shareable(shareable)
            zeros = {k: np.zeros_like(v) for k, v in dxo.data.items()}
            return DXO(data_kind=DataKind.WEIGHT_DIFF, data=zeros, meta={
                MetaKey.NUM_STEPS_CURRENT_ROUND: 1, MetaKey.INITIAL_METRICS: {"val_accuracy": 0.0, "val_loss": 0.0},
                VAL_COUNT_KEY: 1, TRAIN_LOSS_KEY: 0.0}).to_shareable()
        if task_name == "validate":
            return DXO(data_kind=DataKind.METRICS, data={"val_accuracy": 0.0, "val_loss": 0.0, "count": 1}).to_shareable()
        return make_reply(ReturnCode.TASK_UNSUPPORTED)
