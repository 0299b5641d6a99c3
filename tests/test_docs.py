"""The README and docs/*.md: every ```python block runs, every relative link
points at a file (and at a heading, where it names one).

A page's blocks share one namespace and run in order, as a reader pasting them
into one session would. A block right after `<!-- docs-test: devices=N -->`
runs alone in a process of its own with N CPU devices (the device count is
fixed when jax starts, and this process keeps its one device).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")
DEVICES_MARKER = re.compile(r"^<!--\s*docs-test:\s*devices=(\d+)\s*-->$")
LINK = re.compile(r"\[(?:[^\]`]|`[^`]*`)*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*$")
EXTERNAL = ("http://", "https://", "mailto:")
# Generous on 2 shared cores: a block in its own process takes a few seconds.
PROCESS_TIMEOUT_S = 300


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: pathlib.Path
    line: int  # of the block's first code line, 1-based
    language: str
    code: str
    devices: int | None  # None: runs here, in its page's namespace

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:L{self.line}"

    def compiled(self):
        """The code, compiled with the page's path and line numbers, so a
        traceback points into the Markdown."""
        return compile("\n" * (self.line - 1) + self.code, str(self.page), "exec")


def blocks_of(page: pathlib.Path) -> list[Block]:
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, language = opening.groups()
        end = next(
            j
            for j in range(i + 1, len(lines))
            if lines[j].startswith(fence) and not lines[j].strip(fence[0]).strip()
        )
        before = next((line for line in reversed(lines[:i]) if line.strip()), "")
        marker = DEVICES_MARKER.match(before.strip())
        blocks.append(
            Block(
                page=page,
                line=i + 2,
                language=language,
                code="\n".join(lines[i + 1 : end]) + "\n",
                devices=int(marker.group(1)) if marker else None,
            )
        )
        i = end + 1
    return blocks


def prose_of(page: pathlib.Path) -> list[str]:
    """The page's lines outside code blocks."""
    lines = page.read_text().splitlines()
    code = {
        line
        for block in blocks_of(page)
        for line in range(block.line - 1, block.line + block.code.count("\n") + 1)
    }
    return [line for number, line in enumerate(lines, 1) if number not in code]


def anchors_of(page: pathlib.Path) -> set[str]:
    """GitHub's anchors for the page's headings."""
    anchors = set()
    for line in prose_of(page):
        heading = HEADING.match(line)
        if heading:
            text = heading.group(1).lower().replace("`", "")
            anchors.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return anchors


PYTHON_BLOCKS = [
    block for page in PAGES for block in blocks_of(page) if block.language == "python"
]
# For each page, how many of its in-process blocks have run in this process,
# and the namespace they ran in.
_namespaces: dict[pathlib.Path, tuple[int, dict]] = {}


def _in_process(page: pathlib.Path) -> list[Block]:
    return [b for b in PYTHON_BLOCKS if b.page == page and b.devices is None]


def _run_in_page_namespace(block: Block) -> None:
    page_blocks = _in_process(block.page)
    index = page_blocks.index(block)
    done, namespace = _namespaces.pop(block.page, (0, {}))
    if done > index:
        done, namespace = 0, {}
    namespace.setdefault("__name__", "__docs__")
    for earlier in page_blocks[done:index]:
        try:
            exec(earlier.compiled(), namespace)
        except Exception as error:
            pytest.fail(f"{earlier.id}, which this block follows, failed: {error!r}")
    exec(block.compiled(), namespace)
    _namespaces[block.page] = (index + 1, namespace)


def _run_in_own_process(block: Block) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={block.devices}",
    )
    runner = (
        "import sys; "
        f"exec(compile(sys.stdin.read(), {str(block.page)!r}, 'exec'), "
        "{'__name__': '__docs__'})"
    )
    result = subprocess.run(
        [sys.executable, "-c", runner],
        input="\n" * (block.line - 1) + block.code,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]


def test_examples_are_found():
    assert PAGES[0].name == "README.md" and len(PAGES) > 1
    assert PYTHON_BLOCKS, "no ```python blocks found"


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda block: block.id)
def test_example_runs(block):
    if block.devices is None:
        _run_in_page_namespace(block)
    else:
        _run_in_own_process(block)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_point_at_files_and_headings(page):
    broken = []
    for line in prose_of(page):
        for target in LINK.findall(line):
            if target.startswith(EXTERNAL):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{target}: no such file")
            elif anchor and linked.suffix == ".md" and anchor not in anchors_of(linked):
                broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_blocks_that_do_not_run_say_so():
    """A fence without a language would hide code from the suite: every code
    block names one (python runs; bash, console and text do not)."""
    unnamed = [
        block.id for page in PAGES for block in blocks_of(page) if not block.language
    ]
    assert not unnamed
