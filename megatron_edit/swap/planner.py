"""How many transformer layers to keep on the device, and how far ahead to fetch, when their weights live in host
memory and stream in layer by layer (ATOM, arXiv 2403.10504, static analysis in small).

One iteration touches the layers in the order 0..L-1 (forward) then L-1..0 (backward). A layer must be on the
device while it computes; at most `resident` layers' weights are on the device at once, the computing one
included; weights come in over one host-to-device stream, gradients go out over the other direction as each
layer's backward ends (its slot is free once they are out). A fetch starts no earlier than `prefetch` layers
ahead of the one computing (0: only when the layer is needed), and when a slot must be freed the layer needed
again farthest in the future leaves (Belady's rule: the order is known; among equals the one whose slot frees
first). Every forward fetches every layer (the optimizer step changed them all); the backward starts with the last
layers the forward left on the device.

`simulate` gives the time one iteration's transfers add to its compute; `plan` picks the plan with the least
exposed time the budget allows, the fewest resident layers and then the shortest prefetch among equals. For a
given resident count the exposed time never grows with the prefetch (which layers leave does not depend on it, and
an earlier start can only let a fetch finish sooner), so the prefetch is found by bisection; over resident counts
it can (more slots change which layers leave, and when their slots free), so each count is tried.
"""
import bisect
import dataclasses
from typing import List, Sequence

from megatron_edit.errors import require


@dataclasses.dataclass(frozen=True)
class LayerCosts:
    """Measured or assumed costs of the swapped layers, index = layer number."""
    weight_bytes: Sequence[int]       # on the device while resident (compute dtype)
    grad_bytes: Sequence[int]         # sent back to the host after each layer's backward
    forward_seconds: Sequence[float]
    backward_seconds: Sequence[float]
    host_to_device_bytes_per_s: float
    device_to_host_bytes_per_s: float

    @property
    def num_layers(self) -> int:
        return len(self.weight_bytes)


@dataclasses.dataclass(frozen=True)
class SwapPlan:
    resident: int                 # layers whose weights may be on the device at once, the computing one included
    prefetch: int                 # how many layers ahead of the computing one a fetch may start
    exposed_seconds: float        # transfer time one iteration adds to its compute
    compute_seconds: float
    device_bytes: int             # weight bytes the resident layers need at most

    def describe(self, costs: LayerCosts) -> str:
        layers = costs.num_layers
        return (f"swap plan: {self.resident} of {layers} layers resident, prefetch {self.prefetch} ahead, "
                f"{self.device_bytes / 2**20:.1f} MiB of layer weights on the device; expected exposed transfer "
                f"{1000 * self.exposed_seconds:.2f} ms per forward-backward pass over "
                f"{1000 * self.compute_seconds:.2f} ms of layer compute "
                f"(host->device {costs.host_to_device_bytes_per_s / 1e9:.2f} GB/s)")


def _accesses(layers: int) -> List[tuple]:
    """(layer, is_backward) in the order one iteration computes them."""
    return [(i, False) for i in range(layers)] + [(i, True) for i in reversed(range(layers))]


def simulate(costs: LayerCosts, resident: int, prefetch: int) -> float:
    """Exposed transfer seconds of one steady-state iteration under (resident, prefetch)."""
    layers = costs.num_layers
    order = _accesses(layers)
    uses = {i: [a for a, (layer, _) in enumerate(order) if layer == i] for i in range(layers)}

    def next_use(layer: int, after: int) -> int:
        later = uses[layer][bisect.bisect_right(uses[layer], after):]
        return later[0] if later else len(order)

    on_device = {}  # resident layer -> (time its weights are on the device, time its slot could be given up)
    starts, ends = [0.0] * len(order), [0.0] * len(order)
    h2d_free = d2h_free = 0.0
    for a, (layer, backward) in enumerate(order):
        previous_end = ends[a - 1] if a else 0.0
        if layer not in on_device:
            if prefetch:  # once the layer `prefetch` places earlier starts computing (from the start: at once)
                window = starts[a - prefetch] if a >= prefetch else 0.0
            else:
                window = previous_end
            slot_free = 0.0
            if len(on_device) >= resident:
                victim = max((i for i in on_device if next_use(i, a - 1) > a),  # among equals, the first free
                             key=lambda i: (next_use(i, a - 1), -on_device[i][1]))
                slot_free = on_device.pop(victim)[1]
            begin = max(h2d_free, window, slot_free)
            h2d_free = begin + costs.weight_bytes[layer] / costs.host_to_device_bytes_per_s
            on_device[layer] = (h2d_free, 0.0)
        starts[a] = max(previous_end, on_device[layer][0])
        ends[a] = starts[a] + (costs.backward_seconds if backward else costs.forward_seconds)[layer]
        leaves = ends[a]
        if backward:
            d2h_free = max(d2h_free, ends[a]) + costs.grad_bytes[layer] / costs.device_to_host_bytes_per_s
            leaves = d2h_free
        on_device[layer] = (on_device[layer][0], leaves)
    compute = sum(costs.forward_seconds) + sum(costs.backward_seconds)
    return max(ends[-1], d2h_free) - compute


def _smallest(low: int, high: int, good) -> int:
    """The smallest value in [low, high] for which good() holds, good being monotone and true at high."""
    while low < high:
        middle = (low + high) // 2
        if good(middle):
            high = middle
        else:
            low = middle + 1
    return low


def plan(costs: LayerCosts, device_budget_bytes: float, max_resident: int) -> SwapPlan:
    """The plan with the least exposed transfer time that fits `device_budget_bytes` of layer weights and at most
    `max_resident` layers (--swap-resident-layers); the fewest resident layers, then the shortest prefetch, among
    equals. Refuses, in one line, when not even one layer fits."""
    layers = costs.num_layers
    largest = max(costs.weight_bytes)

    def bytes_for(resident: int) -> int:
        return sum(sorted(costs.weight_bytes, reverse=True)[:resident])

    require(bytes_for(1) <= device_budget_bytes,
            f"--swap-layers: no plan fits: the largest layer needs {largest / 2**20:.1f} MiB on the device and "
            f"{device_budget_bytes / 2**20:.1f} MiB are left for layer weights; use more tensor or pipeline "
            "parallelism (smaller layers) or a device with more memory")
    fits = max(r for r in range(1, min(max_resident, layers) + 1) if bytes_for(r) <= device_budget_bytes)
    candidates = []
    for resident in range(1, fits + 1):
        least = simulate(costs, resident, resident - 1)
        prefetch = _smallest(0, resident - 1, lambda d: simulate(costs, resident, d) <= _within(least))
        candidates.append((simulate(costs, resident, prefetch), resident, prefetch))
    least = min(exposed for exposed, _, _ in candidates)
    exposed, resident, prefetch = next(c for c in candidates if c[0] <= _within(least))
    return SwapPlan(resident, prefetch, exposed, sum(costs.forward_seconds) + sum(costs.backward_seconds),
                    bytes_for(resident))


def _within(seconds: float) -> float:
    """Exposed times this close count as equal (floating-point sums in different orders)."""
    return seconds + 1e-12 + 1e-9 * seconds
