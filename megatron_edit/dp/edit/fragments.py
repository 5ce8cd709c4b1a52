"""Staggered fragments (`--sync-fragments F`): EDiT's modules split into F groups that synchronize at different
iterations of the H local steps, so a slow link carries about 1/F of the model at a time (Streaming DiLoCo's idea,
arXiv 2501.18512, on EDiT's module units).

Fragment f syncs every H local steps, f x H / F steps after fragment 0 (fragment 0 keeps today's schedule). The
groups are balanced by parameter count, not contiguous: a tiny model's embedding and output layer outweigh several
transformer layers. Modules that hold one tied weight on two pipeline stages (the word embedding and the last
stage's output layer) go to one fragment, so both copies sync at the same iteration with the same decisions.
"""
from typing import Dict, List, Optional, Sequence, Tuple


def plan_fragments(units: Sequence[Tuple[str, int, Optional[str]]], fragments: int) -> Dict[str, int]:
    """{unit name: fragment} for the whole model's units (name, parameter count, the name of the unit it is tied to
    or None). Longest processing time first: the heaviest group of tied units goes to the lightest fragment so far
    (ties broken by name and fragment index), so every rank gets the same plan from the same units in any order."""
    groups: Dict[str, List[str]] = {}
    sizes: Dict[str, int] = {}
    for name, numel, tied_to in units:
        key = tied_to or name
        groups.setdefault(key, []).append(name)
        sizes[key] = sizes.get(key, 0) + numel
    order = sorted(groups, key=lambda key: (-sizes[key], key))
    load = [0] * fragments
    plan = {}
    for key in order:
        lightest = min(range(fragments), key=lambda f: (load[f], f))
        load[lightest] += sizes[key]
        for name in groups[key]:
            plan[name] = lightest
    return plan

