"""The layer-swap planner (megatron_edit/swap/planner.py): its schedule model on cases worked by hand, its choice
against every (resident, prefetch) pair, and the one-line refusal when not even one layer fits."""
import random

import pytest

from megatron_edit.errors import UsageError
from megatron_edit.swap.planner import LayerCosts, plan, simulate


def uniform(layers: int, transfer: float, forward: float, backward: float, grad: float = 0.0) -> LayerCosts:
    """Layers of one byte each over a 1 byte/s link: transfer, compute and gradient times in seconds."""
    return LayerCosts([transfer] * layers, [grad] * layers, [forward] * layers, [backward] * layers, 1.0, 1.0)


def test_exposed_time_on_cases_worked_by_hand():
    costs = uniform(4, transfer=1.0, forward=1.0, backward=2.0)
    # One slot, no prefetch: all four layers wait for their weights in the forward, 2-0 in the backward (3 is
    # still there).
    assert simulate(costs, 1, 0) == pytest.approx(7.0)
    # Two slots, no prefetch: the backward finds 3 and 2 from the forward.
    assert simulate(costs, 2, 0) == pytest.approx(6.0)
    # Two slots, one ahead: only the first fetch (1 s) has nothing to hide behind.
    assert simulate(costs, 2, 1) == pytest.approx(1.0)
    # Compute shorter than a transfer: one slot ahead still exposes the difference after the first fetch,
    # 0.5 s per later fetch (3 in the forward, 2 in the backward).
    fast = uniform(4, transfer=1.0, forward=0.5, backward=0.5)
    assert simulate(fast, 2, 1) == pytest.approx(1.0 + 5 * 0.5)
    # Every layer resident and fetched at once: the four fetches (4 s) against the compute before each is needed.
    assert simulate(fast, 4, 3) == pytest.approx(4.0 - 1.5)
    # Gradients out: the last layer's backward (layer 0's) is followed by its gradient copy.
    assert simulate(uniform(4, 1.0, 1.0, 2.0, grad=0.5), 4, 3) == pytest.approx(1.0 + 0.5)


def brute_force(costs: LayerCosts, budget: float, max_resident: int) -> tuple:
    by_size = sorted(costs.weight_bytes, reverse=True)
    pairs = [(simulate(costs, r, d), r, d) for r in range(1, min(max_resident, costs.num_layers) + 1)
             if sum(by_size[:r]) <= budget for d in range(r)]
    least = min(exposed for exposed, _, _ in pairs)
    return min((r, d) for exposed, r, d in pairs if exposed <= least + 1e-12 + 1e-9 * least)


def test_the_plan_is_the_best_of_every_resident_count_and_prefetch():
    checked = 0
    for case in range(400):
        rng = random.Random(case)
        layers = rng.randint(1, 8)
        costs = LayerCosts([rng.randint(1, 5) for _ in range(layers)], [rng.randint(0, 3) for _ in range(layers)],
                           [rng.uniform(0.1, 3) for _ in range(layers)], [rng.uniform(0.1, 5) for _ in range(layers)],
                           rng.uniform(0.5, 3), rng.uniform(0.5, 3))
        budget, max_resident = rng.randint(5, 30), rng.randint(1, layers + 1)
        if max(costs.weight_bytes) > budget:
            continue
        chosen = plan(costs, budget, max_resident)
        assert (chosen.resident, chosen.prefetch) == brute_force(costs, budget, max_resident), case
        assert chosen.device_bytes <= budget and chosen.resident <= max_resident
        checked += 1
    assert checked > 300


def test_plan_spends_slots_only_where_they_hide_transfers():
    # Compute far longer than transfers: one layer computing and one arriving are enough.
    slow = plan(uniform(8, transfer=1.0, forward=10.0, backward=20.0), device_budget_bytes=8, max_resident=8)
    assert (slow.resident, slow.prefetch, slow.exposed_seconds) == (2, 1, pytest.approx(1.0))  # the first fetch
    assert "swap plan: 2 of 8 layers resident, prefetch 1 ahead" in slow.describe(uniform(8, 1.0, 10.0, 20.0))
    # Transfers longer than compute: the budget's every slot is used, and some transfer stays exposed.
    fast = plan(uniform(8, transfer=4.0, forward=1.0, backward=1.0), device_budget_bytes=3 * 4.0, max_resident=8)
    assert fast.resident == 3 and fast.exposed_seconds > 0


def test_a_budget_below_one_layer_is_refused_in_one_line():
    with pytest.raises(UsageError) as refused:
        plan(uniform(4, transfer=2 * 2**20, forward=1.0, backward=1.0), device_budget_bytes=2**20, max_resident=4)
    message = str(refused.value)
    assert message.startswith("error: --swap-layers: no plan fits: the largest layer needs 2.0 MiB on the device "
                              "and 1.0 MiB are left for layer weights") and "\n" not in message


@pytest.mark.slow
def test_plan_layer_swap_tool_prints_the_plan_and_when_swapping_pays(tmp_path, capsys):
    from tools import plan_layer_swap

    llama_8b = ["--num-layers", "32", "--hidden-size", "4096", "--num-attention-heads", "32", "--num-query-groups", "8",
                "--seq-length", "4096", "--sustained-tflops", "400", "--host-to-device-gbps", "25",
                "--layer-memory-gib", "3", "--output-dir", str(tmp_path)]
    plan_layer_swap.main(llama_8b + ["--micro-batch-size", "4"])  # a layer computes longer than it transfers
    printed = capsys.readouterr().out
    assert "per layer: 335.0 MiB of 16-bit weights" in printed
    assert "swap plan: 2 of 32 layers resident, prefetch 1 ahead" in printed
    assert (tmp_path / "plan_layer_swap.csv").read_text().count("\n") == 1 + 9  # resident 1..9 fit in 3 GiB
    plan_layer_swap.main(llama_8b + ["--micro-batch-size", "1"])  # it does not: the link is the bottleneck
    printed = capsys.readouterr().out
    assert "swap plan: 3 of 32 layers resident, prefetch 1 ahead" in printed  # more slots would not help
    assert "expected exposed transfer 500.87 ms per forward-backward pass over 411.29 ms" in printed
