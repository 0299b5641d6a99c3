"""The `pallas-amsgrad` command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from pallas_amsgrad.tools import workloads


def _verify(args) -> int:
    from pallas_amsgrad.tools import verify

    if args.params:
        params, source = verify.load_params(args.params), args.params
    else:
        params = verify.default_params(full=args.full)
        source = verify.default_source(args.full)
    run = verify.run_command(
        params,
        source,
        args.steps,
        args.learning_rate,
        stream=args.json != "-",
        full=args.full,
        jobs=args.jobs,
    )
    if args.json == "-":
        json.dump(run, sys.stdout, indent=2)
        print()
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(run, f, indent=2)
    return 0 if run["failed"] == 0 else 1


def _bench(args, parser) -> int:
    from pallas_amsgrad.tools.bench import contenders, measure, report

    try:
        chosen = workloads.parse_workloads(
            workloads.BENCH_SIZES if args.sizes is None else args.sizes,
            workloads.BENCH_MODELS if args.models is None else args.models,
        )
    except ValueError as error:
        parser.error(str(error))
    if args.png:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error(
                "--png needs matplotlib: pip install 'pallas-amsgrad[bench]', "
                "or pass --png '' to skip the plot"
            )
    baseline = None
    if args.compare:
        with open(args.compare) as f:
            baseline = json.load(f)
        if "cases" not in baseline or "config" not in baseline:
            parser.error(f"{args.compare} is not a `pallas-amsgrad bench` JSON file")
    config = contenders.Config(
        dtype=args.dtype,
        mu_dtype=args.mu_dtype,
        recipe=args.recipe,
        nu_dtype=args.nu_dtype,
        stochastic_rounding=args.stochastic_rounding,
    )
    if baseline is not None:
        theirs = baseline["config"]
        theirs = (
            theirs["dtype"],
            theirs["mu_dtype"],
            theirs.get("recipe", False),
            theirs.get("nu_dtype"),
            theirs.get("stochastic_rounding", False),
        )
        ours = (
            config.dtype,
            config.mu_dtype,
            config.recipe,
            config.nu_dtype,
            config.stochastic_rounding,
        )
        if theirs != ours:
            parser.error(
                f"{args.compare} measured dtype, mu_dtype, recipe, nu_dtype, "
                f"stochastic_rounding = {theirs}; this run {ours}: pass the same "
                "--dtype/--mu-dtype/--recipe/--nu-dtype/--stochastic-rounding"
            )
        # Results before the roofline's kind was recorded measured a pass of
        # the step's own shape.
        kind = baseline["config"].get("roofline", "step-shaped")
        if kind != contenders.ROOFLINE_KIND:
            parser.error(
                f"{args.compare} measured a {kind} roofline, this version a "
                f"{contenders.ROOFLINE_KIND} one: fractions of different "
                "rooflines do not compare; make a new baseline with this version"
            )
    cases = measure.measure(
        chosen,
        contenders.contenders(with_torch=not args.no_torch),
        config,
        args.rounds,
    )
    run = report.report(cases, config, args.rounds)
    # A small case on a shared machine can fall far in one measurement and
    # not the next: a fall counts once every try of that case shows it.
    for _ in range(args.retries if baseline is not None else 0):
        fallen = report.regressions(run, baseline, args.tolerance)
        if not fallen:
            break
        print(
            "measuring again, as it fell: " + ", ".join(" ".join(k) for k in fallen),
            file=sys.stderr,
        )
        names = {contender for _, contender in fallen}
        again = measure.measure(
            {workload: chosen[workload] for workload, _ in fallen},
            [c for c in contenders.contenders(not args.no_torch) if c.name in names],
            config,
            args.rounds,
        )
        run = report.keep_best(run, [dataclasses.asdict(c) for c in again])
    print(report.format_table(run))
    with open(args.json, "w") as f:
        json.dump(run, f, indent=2)
    print(f"wrote {args.json}")
    if args.png:
        report.plot(run, args.png)
        print(f"wrote {args.png}")
    if baseline is None:
        return 0
    lines, regressed = report.compare(run, baseline, args.tolerance)
    print(f"against {args.compare} (tolerance {args.tolerance:.0%}):")
    print("\n".join(lines))
    return 1 if regressed else 0


def _selftest(args) -> int:
    import pathlib

    import jax

    from pallas_amsgrad.tools import selftest

    out = args.out or f"selftest-{jax.default_backend()}"
    return selftest.selftest(
        pathlib.Path(out),
        quick=args.quick,
        tests=not args.no_tests,
        torch=not args.no_torch,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pallas-amsgrad", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser(
        "verify",
        help="check the kernel, the XLA path and optax against the spec",
        description="Runs configurations of param dtype, mu_dtype, nu_dtype "
        "and options for N steps with the kernel (compiled on TPU/GPU, "
        "interpreted on CPU), the XLA path and optax, and prints each one's "
        "largest error against the spec in ULPs. By default a representative "
        "subset, on one leaf of each kind of the embedded model: each param "
        "dtype with its default mu_dtype, one recipe, one lean-state and one "
        "stochastic-rounding configuration; --full runs every configuration "
        "on every leaf. Exits 1 on any disagreement.",
    )
    verify.add_argument(
        "--full",
        action="store_true",
        help="every configuration: each param dtype x mu_dtype, nu_dtype, the "
        "recipe per param dtype and stochastic rounding (the run for a bug report)",
    )
    verify.add_argument("--steps", type=int, default=3, help="steps per configuration")
    verify.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="configurations run at once, in threads (default: one more than "
        "the cores)",
    )
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
    bench = commands.add_parser(
        "bench",
        help="time one step against optax, torch and the memory roofline",
        description="Times this package's step and update, optax.amsgrad + "
        "apply_updates (plain and donated) and torch's fused AMSGrad (when "
        "installed) on flat and model-shaped trees, beside a streaming pass "
        "with the same bytes (the roofline). Prints a table, writes JSON and a "
        "PNG plot; with --compare, exits 1 if a case's fraction of the "
        "roofline fell by more than --tolerance.",
    )
    bench.add_argument(
        "--sizes",
        help="flat single-leaf workloads, comma-separated (default "
        f"{workloads.BENCH_SIZES}; e.g. 1M,64M; '' for none)",
    )
    bench.add_argument(
        "--models",
        help="model-shaped workloads, comma-separated (default "
        f"{workloads.BENCH_MODELS}; also transformer-tiny; '' for none)",
    )
    bench.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    bench.add_argument(
        "--mu-dtype",
        default=None,
        choices=["float32", "bfloat16", "int8"],
        help="default: param; int8: 8-bit block-quantized mu (this package; "
        "optax and torch keep mu in the param dtype)",
    )
    bench.add_argument(
        "--nu-dtype",
        default=None,
        choices=["float32", "bfloat16", "uint8"],
        help="nu and nu_max's storage in this package's step (optax and torch "
        "have no such option); uint8: 8-bit block-quantized; default: param",
    )
    bench.add_argument(
        "--stochastic-rounding",
        action="store_true",
        help="this package's 16-bit stores rounded stochastically (optax and "
        "torch round to nearest); the same bytes, more integer work",
    )
    bench.add_argument("--rounds", type=int, default=5, help="timed calls per case")
    bench.add_argument("--json", default="bench.json", metavar="PATH")
    bench.add_argument(
        "--png", default="bench.png", metavar="PATH", help="'' to skip the plot"
    )
    bench.add_argument("--no-torch", action="store_true", help="leave torch out")
    bench.add_argument(
        "--recipe",
        action="store_true",
        help="the AdamW-style recipe: clipping by global norm, decay of the "
        "matrices, non-finite skips; against the same optax composition",
    )
    bench.add_argument("--compare", metavar="BASELINE.json")
    bench.add_argument(
        "--retries",
        type=int,
        default=2,
        help="with --compare, measure a case that fell again up to this many "
        "times; it regresses only if every measurement fell (default 2)",
    )
    bench.add_argument(
        "--tolerance",
        type=float,
        default=0.35,
        help="allowed relative drop in fraction of roofline (default 0.35; "
        "small workloads on a shared CPU vary about that much)",
    )
    selftest = commands.add_parser(
        "selftest",
        help="the accelerator lane: tests, verify and bench on this device",
        description="On the device this process sees (compiled kernels on "
        "TPU/GPU, interpreted on CPU), runs the tests that judge the kernel "
        "there, then verify, then bench (against optax and, where installed, "
        "torch's fused AMSGrad), and writes logs, JSON, the plot and the "
        "machine description into one folder. Run it from the source "
        "checkout. Exits 1 if any stage failed.",
    )
    selftest.add_argument(
        "--out", metavar="DIR", help="default: selftest-<backend> in the current folder"
    )
    selftest.add_argument(
        "--quick",
        action="store_true",
        help="one test of each kind, verify on a tiny tree, bench on 64K "
        "parameters: shows the lane works (CI runs it on CPU)",
    )
    selftest.add_argument("--no-tests", action="store_true", help="skip pytest")
    selftest.add_argument("--no-torch", action="store_true", help="leave torch out")
    args = parser.parse_args(argv)
    if args.command == "selftest":
        return _selftest(args)
    if args.command == "bench":
        if args.rounds < 1:
            parser.error(f"--rounds must be at least 1, got {args.rounds}")
        if not 0 <= args.tolerance < 1:
            parser.error(f"--tolerance must be in [0, 1), got {args.tolerance}")
        return _bench(args, parser)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    return _verify(args)


if __name__ == "__main__":
    sys.exit(main())
