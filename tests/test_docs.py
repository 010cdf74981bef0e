"""README.md and docs/*.md: the README's size and first command block (which .ci/run executes),
relative links that resolve (files and #anchors), and the python examples, which are run.

README's python blocks each run on their own; a docs page's python blocks run in order in one
namespace (a page sets up once). A block right after a line ``<!-- not run: reason -->`` is skipped
with that reason; a page whose examples import a package that is not installed (timm, ultralytics)
is skipped. Examples run from a temporary directory, on one CPU thread."""

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
MAX_README_LINES = 200
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(.+?)\s*-->\s*$")


def code_blocks(path):
    """[(language, code, first line number, reason it is not run or None)] of every fenced block."""
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start = i + 1
        j = start
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        assert j < len(lines), f"{path.name}:{i + 1}: code block never closed"
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        skip = NOT_RUN.match(lines[k]) if k >= 0 else None
        blocks.append((m.group(1), "\n".join(lines[start:j]) + "\n", start + 1, skip.group(1) if skip else None))
        i = j + 1
    return blocks


def prose(path):
    """The page without its fenced blocks and inline code (links inside code are not links)."""
    text = re.sub(r"^```.*?^```\s*$", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    found, seen = set(), {}
    for line in re.sub(r"^```.*?^```\s*$", "", path.read_text(encoding="utf-8"), flags=re.S | re.M).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            found.add(s if n == 0 else f"{s}-{n}")
    return found


def links(path):
    return re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose(path))


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; the limit is {MAX_README_LINES} (details go to docs/)"


def test_readme_starts_with_the_two_commands():
    blocks = code_blocks(README)
    assert blocks, "README.md has no code block"
    language, code, line, _ = blocks[0]
    assert language == "bash", f"README.md's first code block (line {line}) must be the ```bash block .ci/run executes"
    commands = [c for c in code.splitlines() if c.strip()]
    assert len(commands) == 2, f"README.md's first ```bash block must hold exactly two commands, found {commands}"
    assert commands[0].startswith("pip install") and commands[1].startswith("pip install")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_readme_links_every_docs_page():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links(README)}
    missing = [p.relative_to(ROOT).as_posix() for p in DOCS if p.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"


def run_blocks(blocks, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    namespace = {"__name__": "__docs_example__"}
    try:
        for code, name in blocks:
            exec(compile(code, name, "exec"), namespace)
    finally:
        torch.set_num_threads(threads)


def python_blocks(page):
    return [(code, f"{page.relative_to(ROOT)}:{line}", skip)
            for language, code, line, skip in code_blocks(page) if language == "python"]


README_EXAMPLES = python_blocks(README)


def test_readme_has_its_examples():
    assert len(README_EXAMPLES) >= 3, "README.md should show sparsity training, pruning and deployment"


@pytest.mark.parametrize("example", README_EXAMPLES, ids=lambda e: e[1])
def test_readme_example_runs(example, monkeypatch, tmp_path):
    code, name, skip = example
    if skip:
        pytest.skip(skip)
    run_blocks([(code, name)], monkeypatch, tmp_path)


@pytest.mark.parametrize("page", [p for p in DOCS if python_blocks(p)], ids=lambda p: p.name)
def test_docs_examples_run(page, monkeypatch, tmp_path):
    blocks = [(code, name) for code, name, skip in python_blocks(page) if not skip]
    if not blocks:
        pytest.skip("; ".join(skip for _, _, skip in python_blocks(page)))
    for code, _ in blocks:
        for module in re.findall(r"^(?:import|from)\s+(timm|ultralytics|onnxruntime|onnx)\b", code, flags=re.M):
            pytest.importorskip(module)
    run_blocks(blocks, monkeypatch, tmp_path)
