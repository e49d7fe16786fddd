"""ScatterAndGather that continues a job from the persistor's saved round, and stops the job when a site
reports that it must not train (its base differs from the server's).

NVFlare 2.9 no longer snapshots components (ServerEngine.persist_components is a no-op), so a
restarted server cannot pick up a running job by itself. Resubmit the job with the persistor's
`resume_from` pointing at the last saved global adapter: this workflow then skips the rounds that
adapter already holds, so `num_rounds` keeps meaning the job's total.

The guard lives here, in the workflow every job has, not in an optional widget: a site that must not train (its
base fingerprint differs from the announced one, or its HE key from the job's) replies with the FATAL_HEADER. The
workflow leaves that site out for the rest of the job, naming it and its reason, and stops the job with those
reasons only when fewer than min_clients sites are left: no one site can stop a job the others can finish.
"""

from __future__ import annotations

from typing import Dict, Optional

from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather

from ...facts import JobFacts
from ..protocol import FATAL_HEADER


class ResumableScatterAndGather(ScatterAndGather):
    """ScatterAndGather (same arguments) that starts after the rounds already in a resumed adapter and stops
    the job on a site's fatal reply."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._left_out = {}  # site -> why it may not train (its fatal reply): out for the rest of the job

    def start_controller(self, fl_ctx: FLContext) -> None:
        super().start_controller(fl_ctx)
        disagreement = shared_settings_disagree({"persistor": self.persistor, "shareable_generator": self.shareable_gen,
                                                 "aggregator": self.aggregator})
        if disagreement:
            self.log_error(fl_ctx, disagreement)
            self.system_panic(disagreement, fl_ctx)
            return
        done = getattr(self.persistor, "completed_rounds", 0) if self.persistor else 0
        if done > self._start_round:
            total = self._start_round + self._num_rounds
            self._start_round, self._num_rounds = done, max(0, total - done)
            fl_ctx.set_prop(AppConstants.START_ROUND, self._start_round, private=True, sticky=True)
            fl_ctx.set_prop(AppConstants.NUM_ROUNDS, self._num_rounds, private=True, sticky=False)
            self.log_info(fl_ctx, f"resuming at round {done}: {self._num_rounds} round(s) to go of {total}")

    def _accept_train_result(self, client_name: str, result: Shareable, fl_ctx: FLContext,
                             is_unknown_task: bool = False) -> bool:
        reason = result.get_header(FATAL_HEADER) if result is not None else None
        if not reason:
            return super()._accept_train_result(client_name, result, fl_ctx, is_unknown_task=is_unknown_task)
        left_out = self._left_out
        left_out[client_name] = reason
        try:
            sites = {c.name for c in fl_ctx.get_engine().get_clients()}
        except AttributeError:
            sites = set(left_out)
        remaining = len(sites - set(left_out))
        if remaining < self._min_clients:
            why = "; ".join(f"{site}: {r}" for site, r in sorted(left_out.items()))
            self.log_error(fl_ctx, f"stopping the job: {remaining} site(s) left, min_clients {self._min_clients}: {why}")
            self.system_panic(why, fl_ctx)
        else:
            self.log_error(fl_ctx, f"{client_name} is left out of this job: {reason} ({remaining} site(s) go on)")
        return False


def shared_settings_disagree(components: Dict[str, object]) -> Optional[str]:
    """Why the job's components cannot run together, or None: NVFlare builds each from its own arguments in the job
    config, so a job edited by hand can give the persistor one r and the aggregator another (the persistor's
    adapter and the aggregator's update spec would then differ in every round). Each of ours that takes the rule
    (persistor, shareable generator, aggregator) holds its facts; each must agree with the first on r, lora_alpha,
    aggregation, site_ranks and the secure mode (JobFacts.rule_differences)."""
    held = [(name, c.facts) for name, c in components.items() if isinstance(getattr(c, "facts", None), JobFacts)]
    problems = [f"{setting} is {mine!r} in the {held[0][0]}'s arguments but {theirs!r} in the {other}'s"
                for other, their_facts in held[1:] for setting, mine, theirs in held[0][1].rule_differences(their_facts)]
    if not problems:
        return None
    return ("the job's components disagree: " + "; ".join(problems) + ". Write the job with `python jobs/clip_lora/"
            "job.py --export --export-dir DIR` (or the Recipe), which gives each component the same value, or edit them all")
