"""One line width for the book's code box, the notebooks and the library.

The PDF sets code in DejaVu Sans Mono at `CODE_PT` points in a box `CODE_BOX_MM` wide
(tools/book/book.typ: the text width plus 8 mm into each margin, less the box's inner padding). A
DejaVu Sans Mono glyph is 0.602 em wide, so the box holds `floor(box / (0.602 * size))` columns;
`WIDTH` (ruff's line-length in pyproject.toml) must not exceed it. Every notebook code line, every
line of our Python files, and every line a cell printed fits in `WIDTH` columns, so nothing wraps on
the page. Wide results are tables (a DataFrame or Markdown table), which the renderer turns into
real tables, so they are not counted as printed lines. The prose of markdown cells is held to
`MARKDOWN_WIDTH` columns in the source (tools/reflow_markdown.py rewraps it without changing the
book).
"""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 100
MM_PER_PT = 25.4 / 72
GLYPH_EM = 0.602  # DejaVu Sans Mono advance width, in em (1233 / 2048 units)


def _book_typ():
    return (ROOT / "tools" / "book" / "book.typ").read_text()


def _code_box_columns():
    typ = _book_typ()
    size = float(
        re.search(r"show raw\.where\(block: true\): set text\(size: ([\d.]+)pt\)", typ).group(1)
    )
    margin = float(re.search(r"margin: \(x: ([\d.]+)cm", typ).group(1)) * 10
    bleed = float(re.search(r"pad\(x: -([\d.]+)mm", typ).group(1))
    inset = float(re.search(r"inset: if output \{ \(x: ([\d.]+)pt", typ).group(1)) * MM_PER_PT
    box = 210 - 2 * margin + 2 * bleed - 2 * inset - 1.5 * MM_PER_PT  # A4, less the left rule
    return int(box / (GLYPH_EM * size * MM_PER_PT))


def test_width_fits_the_code_box_and_matches_ruff():
    assert _code_box_columns() >= WIDTH, f"the PDF code box holds {_code_box_columns()} columns"
    ruff = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]
    assert ruff["line-length"] == WIDTH


def _notebooks():
    return sorted((ROOT / "nbs").glob("*.ipynb"))


def _too_long(lines, where):
    return [
        f"{where} line {i}: {len(line)} columns"
        for i, line in enumerate(lines, 1)
        if len(line) > WIDTH
    ]


def test_notebook_code_fits():
    bad = []
    for nb in _notebooks():
        cells = json.loads(nb.read_text())["cells"]
        for i, cell in enumerate(cells):
            if cell["cell_type"] == "code":
                bad += _too_long("".join(cell["source"]).split("\n"), f"{nb.name} cell {i}")
            else:  # code shown in a fenced block of a markdown cell is set in the same box
                fenced = re.findall(r"^```[^\n]*\n(.*?)^```", "".join(cell["source"]), re.M | re.S)
                for block in fenced:
                    bad += _too_long(block.split("\n"), f"{nb.name} cell {i} (fenced code)")
    assert not bad, "\n".join(bad)


def _printed(output):
    "The text a cell printed, or None for a table, an image or other rich output."
    if output["output_type"] == "stream":
        return "".join(output["text"])
    data = output.get("data", {})
    if output["output_type"] == "error" or any(k != "text/plain" for k in data):
        return None
    return "".join(data.get("text/plain", ""))


def test_notebook_outputs_fit():
    bad = []
    for nb in _notebooks():
        cells = json.loads(nb.read_text())["cells"]
        for i, cell in enumerate(cells):
            for output in cell.get("outputs", []):
                text = _printed(output)
                if text is not None:
                    bad += _too_long(text.split("\n"), f"{nb.name} cell {i} output")
    assert not bad, "\n".join(bad)


def test_python_files_fit():
    "Our Python files; in minillm/ nbdev writes `__all__` and the docstring's first line itself."
    bad = []
    files = [
        *ROOT.glob("minillm/*.py"),
        *ROOT.glob("tests/*.py"),
        *ROOT.glob("tools/*.py"),
        *ROOT.glob("benchmarks/*.py"),
        ROOT / "conftest.py",
    ]
    for path in files:
        if path.name in ("_modidx.py", "__init__.py"):
            continue
        lines = path.read_text().split("\n")
        generated = set()
        if path.parent.name == "minillm":
            generated.add(0)  # the chapter's description, as nbdev writes it
            for i, line in enumerate(lines):
                if line.startswith("__all__ = ["):
                    j = i
                    while not lines[j].rstrip().endswith("]"):
                        generated.add(j)
                        j += 1
                    generated.add(j)
        bad += [
            f"{path.relative_to(ROOT)} line {i + 1}: {len(line)} columns"
            for i, line in enumerate(lines)
            if len(line) > WIDTH and i not in generated
        ]
    assert not bad, "\n".join(bad)


MARKDOWN_WIDTH = 120  # a markdown cell's prose lines; tools/reflow_markdown.py wraps them


def test_markdown_lines_fit():
    """No prose line of a markdown cell is over `MARKDOWN_WIDTH` columns. Exempt, as in
    tools/reflow_markdown.py: tables, figures (captions too), URLs, headings, HTML, fenced code,
    display maths, and a line it cannot wrap without changing what pandoc reads."""
    pytest.importorskip("pypandoc")
    spec = importlib.util.spec_from_file_location("reflow", ROOT / "tools" / "reflow_markdown.py")
    reflow = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reflow)
    assert reflow.LIMIT == MARKDOWN_WIDTH
    bad = [
        f"{nb.name} cell {c.index} line {n}: {length} columns"
        for nb in _notebooks()
        for c in reflow.safe(reflow.scan(nb))
        for n, length in c.long_lines
    ]
    fix = "run `.venv/bin/python tools/reflow_markdown.py` to rewrap them"
    assert not bad, f"markdown lines over {MARKDOWN_WIDTH} columns ({fix}):\n" + "\n".join(bad)
