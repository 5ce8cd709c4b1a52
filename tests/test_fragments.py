"""--sync-fragments: the plan (which modules sync together) and the schedule (when each fragment syncs)."""
import itertools
import random

from megatron_edit.dp.edit.fragments import plan_fragments
from megatron_edit.dp.local_sgd.schedule import SyncSchedule


def config(fragments: int, interval: int = 8, warmup: int = 3) -> SyncSchedule:
    return SyncSchedule(warmup, interval, fragments=fragments)


def loads(plan: dict, sizes: dict, fragments: int) -> list:
    return [sum(sizes[name] for name, f in plan.items() if f == fragment) for fragment in range(fragments)]


def test_plan_is_within_lpt_bound_of_the_best_partition_and_ignores_unit_order():
    rng = random.Random(0)
    for _ in range(40):
        fragments = rng.randint(2, 3)
        units = [(f"unit{i}", rng.randint(1, 100), None) for i in range(rng.randint(fragments, 7))]
        sizes = {name: numel for name, numel, _ in units}
        plan = plan_fragments(units, fragments)
        best = min(max(loads(dict(zip(sizes, choice)), sizes, fragments))
                   for choice in itertools.product(range(fragments), repeat=len(units)))
        assert max(loads(plan, sizes, fragments)) <= 4 / 3 * best  # Graham's bound for longest-processing-time
        assert plan_fragments(list(reversed(units)), fragments) == plan


def test_tied_units_share_a_fragment():
    units = [("embedding.word_embeddings", 100, None), ("decoder.layers.0", 60, None), ("decoder.layers.1", 60, None),
             ("output_layer", 100, "embedding.word_embeddings")]
    plan = plan_fragments(units, 2)
    assert plan["embedding.word_embeddings"] == plan["output_layer"] != plan["decoder.layers.0"]


def test_one_fragment_keeps_the_sync_schedule_of_every_h_local_steps():
    one = config(1)
    assert [t for t in range(1, 40) if one.is_sync_iteration(t)] == [12, 20, 28, 36]  # W=3: 8 local steps, then 8


def test_each_fragment_syncs_every_h_local_steps_at_its_own_offset():
    four = config(4)
    due = {t: four.syncing_fragments(t) for t in range(1, 40) if four.syncing_fragments(t)}
    assert due == {6: [1], 8: [2], 10: [3], 12: [0], 14: [1], 16: [2], 18: [3], 20: [0], 22: [1], 24: [2], 26: [3],
                   28: [0], 30: [1], 32: [2], 34: [3], 36: [0], 38: [1]}
