"""The Pallas kernels and the XLA path, one module per backend.

`common` (the body and what every kernel shares) sits beneath `tpu`, `gpu`
and `interpret`; `dispatch` chooses among them per platform; `xla` is the
plain-XLA implementation beside them. None imports the package above it.
"""
