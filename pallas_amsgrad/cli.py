"""The `pallas-amsgrad` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pallas-amsgrad", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser(
        "verify",
        help="check the kernel and the XLA path against the spec and optax",
    )
    verify.add_argument("--steps", type=int, default=3, help="steps per configuration")
    args = parser.parse_args(argv)

    import jax

    from pallas_amsgrad import _verify

    rows = _verify.verify(steps=args.steps)
    print(_verify.format_table(rows, jax.default_backend()))
    return 0 if all(r.passed for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
