"""The `pallas-amsgrad` command."""

from __future__ import annotations

import argparse
import json
import sys


def _verify(args) -> int:
    from pallas_amsgrad import _verify

    if args.params:
        params, source = _verify.load_params(args.params), args.params
    else:
        params, source = _verify.default_params(), "embedded two-layer transformer"
    rows = _verify.verify(
        params=params, steps=args.steps, learning_rate=args.learning_rate
    )
    run = _verify.report(
        rows,
        params=params,
        source=source,
        steps=args.steps,
        learning_rate=args.learning_rate,
    )
    if args.json == "-":
        json.dump(run, sys.stdout, indent=2)
        print()
    else:
        print(_verify.format_table(run))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(run, f, indent=2)
    return 0 if run["failed"] == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pallas-amsgrad", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser(
        "verify",
        help="check the kernel, the XLA path and optax against the spec",
        description="Runs every param dtype x mu_dtype for N steps with the "
        "kernel (compiled on TPU/GPU, interpreted on CPU), the XLA path and "
        "optax, and prints each one's largest error against the spec in ULPs. "
        "Exits 1 on any disagreement.",
    )
    verify.add_argument("--steps", type=int, default=3, help="steps per configuration")
    verify.add_argument(
        "--params",
        metavar="FILE.npz",
        help="your parameters (one floating array per leaf) instead of the "
        "embedded model-shaped tree",
    )
    verify.add_argument("--learning-rate", type=float, default=1e-3)
    verify.add_argument(
        "--json",
        metavar="PATH",
        help="also write the report as JSON to PATH; '-' prints only the JSON",
    )
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    return _verify(args)


if __name__ == "__main__":
    sys.exit(main())
