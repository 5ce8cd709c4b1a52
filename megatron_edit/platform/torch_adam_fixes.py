"""megatron-core 0.16 paths that fail with torch's own Adam (no Apex or Transformer Engine, as on CPU).

torch's Adam keeps a per-parameter "step" in its state. Loading the distributed optimizer's `fully_reshardable`
checkpoint sets that step from the saved param groups, then copies every per-parameter tensor it loaded into every
key of the parameter's state, "step" included, which it never loaded: a KeyError. The fix hides "step" from that
copy and puts it back.
"""
import functools

from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE, DistributedOptimizer

_installed = {"done": False}


def install() -> None:
    """Patch once per process; nothing to do where megatron-core uses a fused Adam."""
    if _installed["done"] or HAVE_APEX_OR_TE:
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
