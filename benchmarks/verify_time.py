"""How long `pallas-amsgrad verify` takes, end to end, as a user runs it.

    python benchmarks/verify_time.py --runs 3 --json verify-time.json
    python benchmarks/verify_time.py --full --runs 1

Each run is a fresh process (imports, tracing and compiling included, no
compilation cache), timed by the wall clock; the JSON keeps every run's
seconds, the command, the verify summary line and the machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time

from pallas_amsgrad.tools.environment import environment


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="time verify --full")
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    args = parser.parse_args()
    executable = shutil.which("pallas-amsgrad")
    command = (
        [executable]
        if executable
        else [sys.executable, "-m", "pallas_amsgrad.tools.cli"]
    )
    command += ["verify", *(["--full"] if args.full else [])]
    seconds, summaries = [], []
    for run in range(args.runs):
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        seconds.append(round(time.perf_counter() - start, 1))
        summary = result.stdout.strip().splitlines()[-1] if result.stdout else ""
        summaries.append(summary)
        print(f"run {run + 1}: {seconds[-1]} s, {summary}", flush=True)
        if result.returncode != 0:
            print(result.stdout[-4000:], result.stderr[-4000:], file=sys.stderr)
            return 1
    report = {
        "command": " ".join(["pallas-amsgrad", *command[-2 if args.full else -1 :]]),
        "seconds": seconds,
        "median_seconds": statistics.median(seconds),
        "summaries": summaries,
        "environment": environment(),
    }
    print(f"median {report['median_seconds']} s over {args.runs} runs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
