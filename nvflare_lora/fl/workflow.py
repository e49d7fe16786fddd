"""ScatterAndGather that continues a job from the persistor's saved round (server restart).

NVFlare 2.9 no longer snapshots components (ServerEngine.persist_components is a no-op), so a
restarted server cannot pick up a running job by itself. Resubmit the job with the persistor's
`resume_from` pointing at the last saved global adapter: this workflow then skips the rounds that
adapter already holds, so `num_rounds` keeps meaning the job's total.
"""

from __future__ import annotations

from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather


class ResumableScatterAndGather(ScatterAndGather):
    """ScatterAndGather (same arguments) that starts after the rounds already in a resumed adapter."""

    def start_controller(self, fl_ctx: FLContext) -> None:
        super().start_controller(fl_ctx)
        done = getattr(self.persistor, "completed_rounds", 0) if self.persistor else 0
        if done > self._start_round:
            total = self._start_round + self._num_rounds
            self._start_round, self._num_rounds = done, max(0, total - done)
            fl_ctx.set_prop(AppConstants.START_ROUND, self._start_round, private=True, sticky=True)
            fl_ctx.set_prop(AppConstants.NUM_ROUNDS, self._num_rounds, private=True, sticky=False)
            self.log_info(fl_ctx, f"resuming at round {done}: {self._num_rounds} round(s) to go of {total}")
