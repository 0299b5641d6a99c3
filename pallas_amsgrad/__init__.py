"""pallas-amsgrad: a fused Pallas AMSGrad step, a drop-in for optax.amsgrad."""

from pallas_amsgrad._implementations import (
    IMPLEMENTATIONS,
    Pallas,
    Xla,
    implementation_for,
)
from pallas_amsgrad._transform import (
    GradientTransformationWithStep,
    amsgrad,
    scale_by_amsgrad,
)
from pallas_amsgrad.kernels.common import BlockSizes

__all__ = [
    "IMPLEMENTATIONS",
    "BlockSizes",
    "GradientTransformationWithStep",
    "Pallas",
    "Xla",
    "amsgrad",
    "implementation_for",
    "scale_by_amsgrad",
]
