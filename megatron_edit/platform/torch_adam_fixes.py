"""megatron-core 0.16 paths that fail with torch's own Adam (no Apex or Transformer Engine, as on CPU).

A fresh distributed optimizer cannot describe its state (to build the template a checkpoint loads into) before it
has any: torch's Adam has no step count yet. megatron-core's own remedy, a zero-gradient step, is taken first; all
it touches is overwritten by the load.

torch's Adam keeps a per-parameter "step" in its state. Loading the distributed optimizer's `fully_reshardable`
checkpoint sets that step from the saved param groups, then copies every per-parameter tensor it loaded into every
key of the parameter's state, "step" included, which it never loaded: a KeyError. The fix hides "step" from that
copy and puts it back.

That step, set from the param groups, is one tensor shared by every parameter's state; torch's Adam increments each
parameter's step in place, so after one step the bias corrections of all but one parameter were off and a resumed
run drifted from the uninterrupted one from its second step on. `after_load` gives each parameter its own copy.
"""
import functools

from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE, DistributedOptimizer

from megatron_edit.optimizers import inner_optimizers
from megatron_edit.platform import mcore_internals

_installed = {"done": False}


def prepare_to_load(optimizer) -> None:
    """Make the distributed optimizers in `optimizer` ready to load a fully_reshardable checkpoint."""
    if HAVE_APEX_OR_TE:
        return
    _install()
    for inner in inner_optimizers(optimizer):
        if isinstance(inner, DistributedOptimizer) and not inner.optimizer.state:
            mcore_internals.init_state_for_load(inner)


def after_load(optimizer) -> None:
    """Undo what loading left shared between parameters (see the module's docstring)."""
    if HAVE_APEX_OR_TE:
        return
    for inner in inner_optimizers(optimizer):
        if isinstance(inner, DistributedOptimizer):
            for state in inner.optimizer.state.values():
                if "step" in state:
                    state["step"] = state["step"].clone()


def _install() -> None:
    """Patch once per process."""
    if _installed["done"]:
        return
    original = DistributedOptimizer._set_main_param_and_optimizer_states

    @functools.wraps(original)
    def set_states_keeping_step(self, model_param, tensors):
        if "step" in tensors or self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None)
        try:
            original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states_keeping_step
    _installed["done"] = True
