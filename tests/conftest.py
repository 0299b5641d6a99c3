"""Hypothesis profiles: `ci` (derandomized, small) and `dev` (larger, random).

Select with HYPOTHESIS_PROFILE=dev; CI uses `ci`.
"""

import os

# XLA:CPU contracts a*b + c into one FMA where a fusion allows it, so the last
# bit of a float32 result would depend on how XLA happened to fuse a graph.
# Capping the ISA below FMA makes every test compare IEEE arithmetic, op for
# op. Set before jax starts its CPU backend.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_max_isa=AVX"
).strip()

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=6,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=50,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
