"""Peak memory bandwidth of device kinds, from their vendors' datasheets.

`bench` reports each case against the device's peak as well as against the
roofline it measures: the peak is the fixed yardstick that results from
different runs, machines and commits share.
"""

from __future__ import annotations

import math

# jax's `device_kind` -> peak memory bandwidth in GB/s (1e9 bytes a second).
PEAK_GB_PER_S = {
    "NVIDIA H100 80GB HBM3": 3350,  # H100 SXM5.
    "NVIDIA H100 PCIe": 2000,
    "NVIDIA H100 NVL": 3900,
    "NVIDIA H200": 4800,  # H200 SXM.
    "NVIDIA H200 NVL": 4800,
    "NVIDIA B200": 8000,
    "NVIDIA A100-SXM4-80GB": 2039,
    "NVIDIA A100-SXM4-40GB": 1555,
    "NVIDIA A100 80GB PCIe": 1935,
    "NVIDIA A100-PCIE-40GB": 1555,
    "NVIDIA L4": 300,
    "NVIDIA L40S": 864,
    "AMD Instinct MI300X": 5300,
    "TPU v4": 1200,
    "TPU v5 lite": 819,  # v5e.
    "TPU v5": 2765,  # v5p.
    "TPU v6 lite": 1640,  # v6e (Trillium).
}


def peak_gb_per_s(device_kind: str) -> float:
    """The peak of `device_kind`, or nan for a kind not in the table (CPUs,
    whose bandwidth depends on the machine's memory channels)."""
    return float(PEAK_GB_PER_S.get(device_kind, math.nan))
