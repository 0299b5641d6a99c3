"""`amsgrad_spec` in a source checkout run with `PYTHONPATH=.` (no install).

An install maps spec/ to this name (pyproject's package-dir); without one,
this module stands in for it and is the same module object as `spec`.
"""

import sys

import spec

sys.modules[__name__] = spec
