"""The local-SGD modes as recipes over the engine's parts (local_sgd/engine.py): when replicas sync (a trigger), how
(a synchronizer, and for whole-model syncs its update), and the flags' defaults the mode ships with. A new schedule
or synchronizer is a class with the part's methods plus one recipe line here; what a recipe can do (the flags it
accepts, the faults it can suffer, its checkpoint format) follows from its parts."""
import dataclasses
from typing import Callable, Optional, Tuple

from megatron_edit.dp.edit import aedit, module_sync
from megatron_edit.dp.edit.module_sync import ModuleWiseSync
from megatron_edit.dp.local_sgd import validation
from megatron_edit.dp.local_sgd.config import (EVERY_OTHER_STEP_RECIPE, SIXTEEN_STEP_FP32_RECIPE, SIXTEEN_STEP_RECIPE,
                                               RecipeDefaults)
from megatron_edit.dp.local_sgd.engine import LocalSGDDataParallel
from megatron_edit.dp.local_sgd.schedule import StepCountTrigger
from megatron_edit.dp.local_sgd.whole_model import OuterStep, ParameterAverage, WholeModelSync


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str                      # --dp-mode
    defaults: RecipeDefaults       # what its flags mean when not given
    sync: type                     # the synchronizer
    trigger: type = StepCountTrigger
    update: Optional[type] = None  # the whole-model synchronizer's update
    checks: Tuple[Callable, ...] = ()  # its parts' own flags (one UsageError line each)
    cross_replica_group = "sync"   # the byte counter's name for the group linking replicas (comm_stats)

    @property
    def exchanges_pseudo_gradients(self) -> bool:
        return (self.update or self.sync).exchanges_pseudo_gradients

    @property
    def accepts_penalty(self) -> bool:
        return self.sync.accepts_penalty

    @property
    def delays_outer_step(self) -> bool:
        return self.sync.delays_outer_step

    @property
    def syncs_on_step_count(self) -> bool:
        return self.trigger.on_step_count

    @property
    def syncs_in_fragments(self) -> bool:
        """Staggered fragments are a module-wise sync's, on a step count (a clock syncs the whole model)."""
        return self.sync.staggers_fragments and self.syncs_on_step_count

    @property
    def default_ckpt_format(self) -> str:
        """Megatron-LM's, unless replicas stand at different iterations (a clock): then a file per rank."""
        return "torch_dist" if self.syncs_on_step_count else "torch"

    @property
    def fault_kinds(self) -> frozenset:
        """The --inject-fault kinds: every local-SGD mode's, and pseudo-gradient faults where there are some."""
        return frozenset({"nan-loss", "bad-data", "hang"}) | (self.update or self.sync).fault_kinds

    def validate(self, args) -> None:
        validation.validate(args, self)
        for check in self.checks:
            check(args)

    def fault_replicas(self, args) -> int:
        """How many replicas --simulate-straggler and --inject-fault may name."""
        return args.num_replicas if args.replica_coordinator == "torchft" else args.num_model_replicas

    def check_resume(self, meta: dict, args):
        if meta["model_shard_group_size"] != args.model_shard_group_size:
            return [f"model_shard_group_size {meta['model_shard_group_size']} vs {args.model_shard_group_size} "
                    "(replicas may come and go, their sharding may not change)"]
        return []

    def options(self, args) -> dict:
        """The parts' own settings, built from the flags."""
        return {"update": self.update, **self.trigger.options(args), **self.sync.options(args)}

    def from_args(self, args, ddp_config, transformer_config) -> LocalSGDDataParallel:
        return LocalSGDDataParallel.from_args(self, args, ddp_config, transformer_config)


RECIPES = (
    Recipe("edit", EVERY_OTHER_STEP_RECIPE, ModuleWiseSync, checks=(module_sync.validate,)),
    # Its clock spaces syncs many steps apart (--aedit-sync-seconds).
    Recipe("aedit", SIXTEEN_STEP_RECIPE, ModuleWiseSync, aedit.WallClockTrigger,
           checks=(module_sync.validate, aedit.validate)),
    Recipe("diloco", SIXTEEN_STEP_RECIPE, WholeModelSync, update=OuterStep),
    # H=16 as EDiT's paper; parameters averaged in fp32 (the outer step's flags do not apply).
    Recipe("post-local-sgd", SIXTEEN_STEP_FP32_RECIPE, WholeModelSync, update=ParameterAverage),
)
