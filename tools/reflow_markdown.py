#!/usr/bin/env python3
"""Wrap the prose of the notebooks' markdown cells at `LIMIT` columns, without changing the book.

    .venv/bin/python tools/reflow_markdown.py [--check] [NOTEBOOK ...]   # default: nbs/*.ipynb

A formatter in the spirit of `ruff format`, for the markdown cells only. A paragraph (or a list
item, which keeps its marker and a hanging indent, or a `> ` blockquote, which keeps `> ` on every
line) that has a line over `LIMIT` columns is filled again to `FILL` columns; every other line is
left exactly as it is. Never touched: nbdev's module docstring (the `> ` summary of the title
cell, and a cell with an `export` directive: nbdev-export copies their lines into minillm/), fenced
code, display maths (`$$` lines),
pipe and grid tables, headings, HTML, `:::` divs, lines with a URL, lines ending in a hard break,
and figures (a paragraph starting `![`, caption included). A line is broken only at a space, never
inside inline code, inline maths, a `[...]` group (citations, links, spans) with its `(...)`,
`{...}` or `[...]` tail, or an HTML tag, and never so that the next line starts with what pandoc
could read as a list marker, a heading, a quote, a table or a definition.

Safety: for every cell it would change, pandoc (pypandoc, with the `markdown` reader that
tools/render_book.py uses) parses the old and the new text, SoftBreak read as Space; the new text
is kept only if the two ASTs are equal, else the cell is left and reported. The cells of a notebook
are parsed in one pandoc call each way. Changed notebooks are written with nbformat (cell ids kept)
and cleaned with `nbdev-clean --fname`.

`--check` changes nothing: it lists `file:cell:line` for each line over `LIMIT` that it would
rewrap and exits 1 if there is one. tests/test_width.py (`test_markdown_lines_fit`) uses `scan`.
"""

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 120  # no prose line of a markdown cell is longer
FILL = 116  # the width a rewrapped paragraph is filled to
FORMAT = "markdown"  # pandoc's reader, as in tools/render_book.py
CELL_MARK = "reflow-cell"

FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
LIST_ITEM = re.compile(r"^(\s*)([-*+]|\d+[.)]|#\.|[a-zA-Z][.)]|\(\w{1,4}\))(\s+)(?=\S)")
QUOTE = re.compile(r"^( {0,3}>) ?")
NBDEV_DOC = re.compile(r"(\s*#\|.*\n)*\s*#\|\s*exportd?\b")  # among the leading directives
URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://|\bwww\.")
# A line starting with one of these could be read as another block (or a definition's term).
BLOCK_START = re.compile(
    r"^([-+*:~]$|#{1,6}$|#\.$|\d+[.)]$|[a-zA-Z][.)]$|\(\w{1,4}\)$|\[[^\]]*\]:|[>|<=]|```|~~~|\$\$)"
)


def frozen(line):
    "A line no paragraph is filled across: left as it is, and it ends the paragraph before it."
    s = line.strip()
    return (
        not s
        or s.startswith(("#", "|", "+-", "+=", "<", ":::", "$$", "![", "[^"))
        or bool(FENCE.match(line))
        or bool(URL.search(line))
        or line.endswith(("  ", "\\"))
        or bool(re.match(r"^\[[^\]]+\]:", s))  # a reference definition
    )


def _closing(text, i, open_, close):
    "The index after the `close` that matches the `open_` at text[i], or None."
    depth, k = 0, i
    while k < len(text):
        c = text[k]
        if c == "\\":
            k += 2
            continue
        if c == "`":  # a code span inside a link: its brackets do not count
            end = _code_end(text, k)
            if end is None:
                return None
            k = end
            continue
        if c == open_:
            depth += 1
        elif c == close:
            depth -= 1
            if depth == 0:
                return k + 1
        k += 1
    return None


def _code_end(text, i):
    "The index after the code span starting at text[i] (a run of backticks), or None."
    n = len(re.match(r"`+", text[i:]).group())
    m = re.compile(r"(?<!`)" + "`" * n + r"(?!`)").search(text, i + n)
    return m.end() if m else None


def _math_end(text, i):
    "The index after the inline maths starting at the `$` at text[i] (pandoc's rules), or None."
    if text.startswith("$$", i):
        end = text.find("$$", i + 2)
        return end + 2 if end > 0 else None
    if i + 1 >= len(text) or text[i + 1].isspace():
        return None
    k = i + 1
    while k < len(text):
        if text[k] == "\\":
            k += 2
            continue
        if text[k] == "$":
            if text[k - 1].isspace() or (k + 1 < len(text) and text[k + 1].isdigit()):
                return None
            return k + 1
        k += 1
    return None


def words(text):
    """`text` cut at the spaces where a line may break: not inside code, maths, a `[...]` group
    with its tail, an HTML tag or after a backslash."""
    out, cur, i = [], "", 0
    while i < len(text):
        c, end = text[i], None
        if c == " ":
            if cur:
                out.append(cur)
            cur, i = "", i + 1
            continue
        if c == "\\":
            end = i + 2
        elif c == "`":
            end = _code_end(text, i)
        elif c == "$":
            end = _math_end(text, i)
        elif c == "[":
            end = _closing(text, i, "[", "]")
            while end is not None and end < len(text) and text[end] in "([{":
                end = _closing(text, end, text[end], {"(": ")", "[": "]", "{": "}"}[text[end]])
        elif c == "{":
            end = _closing(text, i, "{", "}")
        elif c == "<" and re.match(r"</?[a-zA-Z!]", text[i:]):
            end = text.find(">", i)
            end = end + 1 if end > 0 else None
        end = end or i + 1
        cur, i = cur + text[i:end], end
    if cur:
        out.append(cur)
    # glue a word that must not start a line to the one before it, and the word after a trailing
    # backslash (a hard break) to it
    glued = []
    for w in out:
        if glued and (BLOCK_START.match(w) or glued[-1].endswith("\\")):
            glued[-1] += " " + w
        else:
            glued.append(w)
    return glued


def fill(ws, first, rest, width=FILL):
    "The words `ws` as lines of at most `width` columns where they fit, prefixed `first`/`rest`."
    lines, line = [], first + ws[0]
    for w in ws[1:]:
        if len(line) + 1 + len(w) > width:
            lines.append(line)
            line = rest + w
        else:
            line += " " + w
    return lines + [line]


@dataclass
class Cell:
    path: Path
    index: int
    old: str
    new: str = ""
    long_lines: list = field(default_factory=list)  # (line number from 1, length) rewrapped
    stuck: list = field(default_factory=list)  # line numbers over LIMIT it cannot wrap


def reflow(source, summary=False):
    """(new source, [(line number, length) of the rewrapped lines over LIMIT], [line numbers over
    LIMIT it leaves]): the cell's markdown with each paragraph that has a line over LIMIT filled
    to FILL. Exempt lines over LIMIT (tables, figures, URLs...) are in neither list. `summary`: the
    cell is nbdev's title cell, whose `> ` lines are the module's summary."""
    lines = source.split("\n")
    out, done, stuck = [], [], []
    i = 0
    while i < len(lines) and lines[i].lstrip().startswith("#|"):  # nbdev's directives
        out.append(lines[i])
        i += 1
    while i < len(lines):
        line = lines[i]
        if m := FENCE.match(line):  # fenced code, to its closing fence
            mark, j = m.group(1), i + 1
            while j < len(lines) and not lines[j].strip().startswith(mark):
                j += 1
            out += lines[i : j + 1]
            i = j + 1
            continue
        if line.strip().startswith("$$") and not re.search(r"\S\s*\$\$\s*$", line.strip()[2:]):
            j = i + 1  # display maths over several lines, to its closing `$$`
            while j < len(lines) and "$$" not in lines[j]:
                j += 1
            out += lines[i : j + 1]
            i = j + 1
            continue
        if line.lstrip().startswith("![") and (i == 0 or not lines[i - 1].strip()):
            j = i  # a figure, caption and all, to the blank line
            while j < len(lines) and lines[j].strip():
                j += 1
            out += lines[i:j]
            i = j
            continue
        if frozen(line) or (summary and QUOTE.match(line)):
            out.append(line)
            i += 1
            continue
        # a paragraph, list item or quote: its prefixes and the text of its lines
        quote = QUOTE.match(line)
        if quote:
            body = line[quote.end() :]
            if frozen(body) or LIST_ITEM.match(body) or QUOTE.match(body):
                out.append(line)
                i += 1
                continue
            first = rest = quote.group(1).lstrip() + " "
            text = [body]
        elif item := LIST_ITEM.match(line):
            first = line[: item.end()]
            rest = " " * len(first)
            text = [line[item.end() :]]
        else:
            first = rest = line[: len(line) - len(line.lstrip())]
            text = [line.lstrip()]
        j = i + 1
        while j < len(lines):
            nxt = lines[j]
            if frozen(nxt) or LIST_ITEM.match(nxt):
                break
            if quote:
                q = QUOTE.match(nxt)
                body = nxt[q.end() :] if q else ""
                if not q or frozen(body) or LIST_ITEM.match(body) or QUOTE.match(body):
                    break
                text.append(body)
            elif QUOTE.match(nxt):
                break
            else:
                text.append(nxt.strip())
            j += 1
        block = lines[i:j]
        long = [(i + k + 1, len(b)) for k, b in enumerate(block) if len(b) > LIMIT]
        if long:
            new = fill(words(" ".join(t.strip() for t in text)), first, rest)
            if any(len(n) > LIMIT for n in new):
                stuck += [n for n, _ in long]
                out += block
            else:
                done += long
                out += new
        else:
            out += block
        i = j
    return "\n".join(out), done, stuck


def _directives_stripped(src):
    "The text tools/render_book.py gives pandoc for a markdown cell (no `#|` lines)."
    lines = src.split("\n")
    while lines and lines[0].lstrip().startswith("#|"):
        lines.pop(0)
    return "\n".join(lines).strip("\n")


def _softbreaks_as_spaces(node):
    if isinstance(node, dict):
        if node.get("t") == "SoftBreak":
            return {"t": "Space"}
        return {k: _softbreaks_as_spaces(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_softbreaks_as_spaces(v) for v in node]
    return node


def asts(texts):
    "Each text's pandoc AST (its blocks, SoftBreak as Space), by one pandoc call for them all."
    import pypandoc

    mark = f"```{{={CELL_MARK}}}\n.\n```"
    doc = "\n\n".join(f"{mark}\n\n{_directives_stripped(t)}" for t in texts) + "\n"
    blocks = json.loads(pypandoc.convert_text(doc, "json", format=FORMAT))["blocks"]
    parts = []
    for b in blocks:
        if b["t"] == "RawBlock" and b["c"][0] == CELL_MARK:
            parts.append([])
        else:
            parts[-1].append(_softbreaks_as_spaces(b))
    if len(parts) != len(texts):
        raise ValueError("a cell's markdown ran into the next one")
    return parts


def scan(path):
    "The notebook's markdown cells that `reflow` would change or cannot fix, as `Cell`s."
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    cells, title = [], None
    for i, c in enumerate(nb["cells"]):
        if c["cell_type"] != "markdown":
            continue
        old = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
        if NBDEV_DOC.match(old):  # nbdev's module docstring: its lines are minillm/'s
            continue
        title = i if title is None and old.startswith("# ") else title
        new, done, stuck = reflow(old, summary=title == i)
        if new != old or stuck:
            cells.append(Cell(Path(path), i, old, new, done, stuck))
    return cells


def safe(cells):
    "The cells whose new text pandoc reads as their old text; the others get `new = old`."
    changed = [c for c in cells if c.new != c.old]
    if not changed:
        return cells
    try:
        pairs = zip(asts([c.old for c in changed]), asts([c.new for c in changed]))
        same = [a == b for a, b in pairs]
    except ValueError:  # one call per cell instead
        same = [asts([c.old]) == asts([c.new]) for c in changed]
    for c, ok in zip(changed, same):
        if not ok:
            c.stuck += [n for n, _ in c.long_lines]
            c.new, c.long_lines = c.old, []
    return cells


def where(path):
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def write(path, cells):
    "Write the changed cells' sources into the notebook (nbformat, ids kept), then nbdev-clean it."
    import nbformat

    nb = nbformat.read(str(path), as_version=nbformat.NO_CONVERT)
    for c in cells:
        nb.cells[c.index].source = c.new
    nbformat.write(nb, str(path))
    clean = Path(sys.executable).parent / "nbdev-clean"
    subprocess.run([str(clean), "--fname", str(path)], check=True, cwd=ROOT)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="list the lines it would wrap; exit 1")
    p.add_argument("notebooks", nargs="*", type=Path, help="default: nbs/*.ipynb")
    args = p.parse_args(argv)
    paths = args.notebooks or sorted((ROOT / "nbs").glob("*.ipynb"))
    todo, changed, left = 0, 0, []
    for path in paths:
        cells = scan(path)
        if args.check:
            for c in cells:
                for n, length in c.long_lines:
                    print(f"{where(path)}:{c.index}:{n}: {length} columns")
                    todo += 1
            continue
        cells = safe(cells)
        done = [c for c in cells if c.new != c.old]
        left += [f"{where(path)}:{c.index}:{n}" for c in cells for n in c.stuck]
        if done:
            write(path, done)
            changed += len(done)
            print(f"{where(path)}: {len(done)} cell(s) rewrapped")
    if args.check:
        print(f"{todo} line(s) over {LIMIT} columns to rewrap" if todo else "nothing to rewrap")
        return 1 if todo else 0
    print(f"{changed} cell(s) rewrapped")
    for s in left:
        print(f"left as it is (cannot wrap without changing the AST): {s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
