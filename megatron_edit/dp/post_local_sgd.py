"""`--dp-mode post-local-sgd`: Post-Local-SGD (Lin et al., arXiv 1808.07217), a baseline for EDiT.

Synchronous data parallelism for W iterations, then local steps; at the end of every H-th local step (and after
the last iteration) the replicas' parameters are averaged over the sync group, the whole model at once, with
nothing overlapping it and no outer optimizer. DiLoCo (diloco.py) keeps this schedule and replaces the average by
an outer step.
"""
import time
from typing import Dict, List

import torch
import torch.distributed as dist

from megatron_edit.dp.base import StepPlan
from megatron_edit.dp.local_sgd.params import FlatParams, MainParams
from megatron_edit.dp.local_sgd.mode import LocalSGDDataParallel
from megatron_edit.dp.local_sgd.sharded_state import from_model_space, model_space_tensors
from megatron_edit.logging import print_rank_last


class PostLocalSGDDataParallel(LocalSGDDataParallel):
    name = "post-local-sgd"
    exchanges_pseudo_gradients = False

    def build_optimizer(self, model_chunks, optimizer_config):
        optimizer = super().build_optimizer(model_chunks, optimizer_config)
        main_params = MainParams(optimizer)
        self.views = [self._whole_model_view(index, [p for p in chunk.parameters() if p.requires_grad], main_params)
                      for index, chunk in enumerate(model_chunks)]
        self._begin_local_steps()  # until the replicas part, what they agree on is the model itself (reset at W)
        return optimizer

    def _begin_local_steps(self) -> None:
        """Replicas are about to part: remember what they agree on (the last sync's average from then on)."""
        self.averages = [view.read_full(self.groups.shard) for view in self.views]

    def _whole_model_view(self, index: int, params, main_params: MainParams) -> FlatParams:
        return FlatParams(params, main_params)

    def after_step(self, plan: StepPlan) -> None:
        super().after_step(plan)
        if plan.iteration == self.schedule.warmup_iters:
            self._begin_local_steps()
        if plan.sync_after:
            self._sync_now(plan.iteration)

    def _final_sync(self, iteration: int) -> None:
        self._sync_now(iteration)

    def _sync_now(self, iteration: int) -> None:
        """Synchronize now, after `iteration`: every sync of this schedule, the final one included."""
        start, bytes_before = time.perf_counter(), self.counter.snapshot().get("sync", 0)
        values = self._synchronize(iteration)
        iteration = self.iteration if self.healed else iteration  # took a live replica's place in this sync
        self.local_steps_since_sync = 0
        seconds = time.perf_counter() - start
        self.blocked_sync_seconds += seconds
        values.update({"sync/exposed ms": 1000 * seconds,
                       "sync/bytes": float(self.counter.snapshot().get("sync", 0) - bytes_before)})
        self._events.append((iteration, values))
        print_rank_last(f" {self.name} sync at iteration {iteration} |"
                        + "".join(f" {key[5:]}: {value:.4g} |" for key, value in values.items()))

    @torch.no_grad()
    def _synchronize(self, iteration: int) -> Dict[str, float]:
        """Every view's contribution averaged over the replicas that met, applied once all of them completed the
        exchange (with torchft a failed sync applies nothing and the next one tries again). Returns numbers for
        the log line and tracker ("sync/..." keys)."""
        self._meet()
        sums = []
        for index, view in enumerate(self.views):
            contribution = self._contribution(view, iteration)
            if not bool(torch.isfinite(contribution).all()):
                print(f" {self.name} sync at iteration {iteration}: replica {self.replica()} (rank {dist.get_rank()}) "
                      f"sends a non-finite value of model chunk {index}", flush=True)
            self.exchange.start(index, contribution, view.tensor_replicated).wait()
            sums.append(contribution)
        contributors = self._contributors(sums[0].device)
        if not self._commit():
            return {**self.meeting, "sync/committed": 0.0}
        if not self._all_finite(sums):
            return {**self._keep_consensus(iteration), **self.meeting}
        return {**self._apply([summed.div_(contributors) for summed in sums]), **self.meeting}

    def _all_finite(self, sums: List[torch.Tensor]) -> bool:
        """Whether the exchanged sums are finite on every rank of this replica (they are the same in every
        replica, so every rank of every replica gets the same answer)."""
        finite = torch.tensor([float(all(bool(torch.isfinite(s).all()) for s in sums))], device=sums[0].device)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=self.groups.whole_replica)
        return bool(finite.item())

    def _keep_consensus(self, iteration: int) -> Dict[str, float]:
        """A replica sent a non-finite value: apply nothing, return every replica to what they agreed on at the
        last sync (the local steps since are lost), and carry no error-feedback residual of this exchange."""
        for index, (view, agreed) in enumerate(self._consensus_views()):
            view.write_full(agreed)
            self.exchange.forget(index)
        print_rank_last(f" {self.name} sync at iteration {iteration}: a replica sent a non-finite value; nothing "
                        "applied, every replica back at the last sync's model")
        return {"sync/non-finite": 1.0}

    def _contribution(self, view, iteration: int) -> torch.Tensor:
        """This replica's share of a view's sum: its parameters (none when it healed: they are the average)."""
        theta = view.read_full(self.groups.shard)
        return theta.zero_() if self.healed else theta

    def _apply(self, means: List[torch.Tensor]) -> Dict[str, float]:
        """theta <- the replicas' mean theta."""
        for index, (view, mean) in enumerate(zip(self.views, means)):
            self.averages[index] = mean
            view.write_full(mean)
        return {}

    def _consensus_views(self):
        return list(zip(self.views, self.averages))

    def _outer_vectors(self) -> Dict[str, List[torch.Tensor]]:
        return {"averages": self.averages}

    def sharded_state_dict(self, entries: dict, saved_replicas: int, loading: bool) -> dict:
        """The outer vectors in model space (sharded_state.py), besides the step counters."""
        state = super().sharded_state_dict(entries, saved_replicas, loading)
        for name, vectors in self._outer_vectors().items():
            state[name] = [model_space_tensors(name, view, None if loading else vector, entries)
                           for view, vector in zip(self.views, vectors)]
        return state

    @torch.no_grad()
    def load_sharded_state_dict(self, state: dict) -> None:
        super().load_sharded_state_dict(state)
        for name, vectors in self._outer_vectors().items():
            for view, vector, loaded in zip(self.views, vectors, state[name]):
                vector.copy_(from_model_space(view, loaded))
