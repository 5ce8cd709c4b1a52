"""ATOM-style layer swapping (`--swap-layers`): transformer layers' weights in host memory, streamed to the device.

    layers.py   LayerSwapper: homes on the host, device copies while a layer computes, prefetch, gradients out
    planner.py  how many layers to keep resident and how far ahead to fetch (a schedule model, pure math)
"""
