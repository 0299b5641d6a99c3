"""Trees described as tables of (shape, dtype, PartitionSpec) leaves.

Shared by the 8-device lane (tests/multidevice/) and the two-process worker.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec


def is_leaf(x) -> bool:
    """A table's leaf: a (shape, dtype, spec) tuple."""
    return isinstance(x, tuple) and isinstance(x[-1], PartitionSpec)


def host_values(table, seed: int):
    """The table's tree of normal values as host (numpy) arrays, which no
    donation can delete."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda leaf: np.asarray(jnp.asarray(rng.normal(size=leaf[0]), leaf[1])),
        table,
        is_leaf=is_leaf,
    )
