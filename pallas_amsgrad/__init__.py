"""pallas-amsgrad: a fused Pallas AMSGrad step, a drop-in for optax.amsgrad."""

from pallas_amsgrad._kernel import BlockSizes
from pallas_amsgrad._transform import (
    GradientTransformationWithStep,
    amsgrad,
    scale_by_amsgrad,
)

__all__ = [
    "BlockSizes",
    "GradientTransformationWithStep",
    "amsgrad",
    "scale_by_amsgrad",
]
