"""The `pallas-amsgrad` command's tools: `verify`, `bench` and what they share.

Nothing in the optimizer imports from here.
"""
