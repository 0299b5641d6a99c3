"""Carries a mutmut run across sessions and lists what is left of it.

mutmut keeps its verdicts in `mutants/` (ignored by git): per source file a
`.meta` file of exit codes by mutant and hashes by function, and
`mutmut-stats.json`, which tests reach which function. `save` copies those
into `mutation/verdicts/` (committed); `restore` copies them back into a fresh
checkout's `mutants/`, where `mutmut run` regenerates the mutants and keeps
the verdict of every function whose hash is unchanged (and, with the
`pyproject.toml` test selection unchanged, the stats).

    python mutation/state.py restore
    .venv/bin/mutmut run --max-children 2 $(python mutation/state.py pending 'spec.rounding.*')
    python mutation/state.py save
    python mutation/state.py summary

`pending GLOB...` prints the undecided mutants whose names match a glob:
naming them runs those alone (a named mutant is run even if decided, so the
list leaves the decided ones out). `summary` prints the table of
docs/testing.md from the saved verdicts.
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import json
import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
MUTANTS = ROOT / "mutants"
SAVED = ROOT / "mutation" / "verdicts"
STATS = "mutmut-stats.json"

# Undecided: never run, or stopped by the user (exit code 2).
_UNDECIDED = (None, 2)


def _metas(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in root.rglob("*.py.meta") if ".jax_cache" not in p.parts)


def save() -> None:
    if SAVED.exists():
        shutil.rmtree(SAVED)
    for meta in _metas(MUTANTS):
        target = SAVED / meta.relative_to(MUTANTS)
        target.parent.mkdir(parents=True, exist_ok=True)
        data = json.loads(meta.read_text())
        target.write_text(json.dumps(data, indent=0, sort_keys=True) + "\n")
    shutil.copy(MUTANTS / STATS, SAVED / STATS)
    print(f"saved {len(_metas(SAVED))} files' verdicts to {SAVED.relative_to(ROOT)}")


def restore() -> None:
    for meta in _metas(SAVED):
        target = MUTANTS / meta.relative_to(SAVED)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(meta, target)
    shutil.copy(SAVED / STATS, MUTANTS / STATS)
    print(f"restored {len(_metas(SAVED))} files' verdicts into mutants/")


def _verdicts(root: pathlib.Path) -> dict[str, dict[str, int | None]]:
    """Exit code (None: undecided) by mutant name, by source file."""
    return {
        str(meta.relative_to(root))[: -len(".meta")]: json.loads(meta.read_text())[
            "exit_code_by_key"
        ]
        for meta in _metas(root)
    }


def pending(globs: list[str]) -> None:
    names = [
        name
        for codes in _verdicts(MUTANTS).values()
        for name, code in codes.items()
        if code in _UNDECIDED and any(fnmatch.fnmatch(name, g) for g in globs)
    ]
    print("\n".join(sorted(names)))


def summary(root: pathlib.Path) -> None:
    from mutmut.stats import status_by_exit_code

    print("| module | mutants | killed | timeout | survived | no tests | pending |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for path, codes in _verdicts(root).items():
        counts = collections.Counter(
            "pending" if code in _UNDECIDED else status_by_exit_code[code]
            for code in codes.values()
        )
        row = [
            counts[k] for k in ("killed", "timeout", "survived", "no tests", "pending")
        ]
        print(f"| `{path}` | {len(codes)} | " + " | ".join(map(str, row)) + " |")
        others = set(counts) - {"killed", "timeout", "survived", "no tests", "pending"}
        if others:
            print(f"  also: {dict((k, counts[k]) for k in others)}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("save")
    commands.add_parser("restore")
    commands.add_parser("pending").add_argument("globs", nargs="+")
    commands.add_parser("summary").add_argument(
        "--live", action="store_true", help="read mutants/, not the saved verdicts"
    )
    args = parser.parse_args()
    if args.command == "save":
        save()
    elif args.command == "restore":
        restore()
    elif args.command == "pending":
        pending(args.globs)
    else:
        summary(MUTANTS if args.live else SAVED)


if __name__ == "__main__":
    main()
