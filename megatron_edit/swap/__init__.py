"""ATOM-style layer swapping: transformer layers' weights in host memory, streamed to the device layer by layer.

    planner.py  how many layers to keep resident and how far ahead to fetch (a schedule model, pure math)
"""
