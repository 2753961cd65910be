#!/usr/bin/env python3
"""Render the book without Quarto: _quarto.yml + the chapter notebooks -> book/minillm.pdf and
book/*.html.

`make book` runs `quarto render` where Quarto is installed, and this script otherwise. It reads the
same _quarto.yml and makes the same two outputs with tools from the venv: pandoc (pypandoc-binary)
parses and writes, Typst (the `typst` package) typesets the PDF, Pagefind (`pagefind[bin]`) indexes
the HTML pages for search. Nothing is executed: the book shows the outputs stored in the notebooks.

    .venv/bin/python tools/render_book.py [--project DIR] [--out DIR] [--chapter 04]
    .venv/bin/python tools/render_book.py --check-notebooks   # `make book`, before nbdev-export

How it works, in the order it runs:

1. Read _quarto.yml: title, subtitle, author, date, output-file, output-dir, the chapters with
   their parts, the bibliography.
2. Each notebook is read by nbdev's reader (fastcore.nbio), which also reads the cells' `#|`
   directives, and becomes pandoc markdown (`notebook_markdown`): hidden cells dropped, `# NBVAL_*`
   markers stripped, outputs turned into fenced text, images (written to media/) and tables.
   nbdev's module docstring (a markdown cell starting `#| export`) becomes a note titled "The
   module `minillm.<name>`"; a code cell that only asserts becomes a check (a collapsed "✓ checked"
   in HTML, a small box in the PDF). pandoc parses each chapter into its JSON AST (in a thread
   pool; kept in ~/.cache/minillm/book/ast, so an unchanged chapter is not parsed again). Tables
   that cells output are tidied (`tidy_table`): "—" for missing values, numbers right-aligned.
3. Citations (`[@key]`, `@key`): every citation of the book is formatted in one citeproc run
   (`cite_book`); the bibliography becomes an unnumbered "References" chapter at the end (or fills
   the `references` chapter, as Quarto does). An unknown key is an error naming the cell.
4. On the AST (walked with pandocfilters), in Python (`number_chapter`): callouts get their title,
   the `> description` under a chapter's title becomes its lead paragraph, chapters, sections and
   figures (from code cells and from markdown images, `![Caption.](figures/x.svg){#fig-x}`) get
   their numbers, once for both formats, and every #sec-/#fig- label is recorded. The prose is
   checked (`text_problems`, and `html_problems` on the pages): markup leaked into the text, TeX
   outside maths, a prime for an apostrophe; a control character in a formula is a warning.
5. With every label known, `@sec-x`, `@fig-x` and links to other chapters' notebooks become links,
   once per output format (`resolve`). An unresolved one is an error: the book never ships a "??".
6. pandoc writes all the HTML pages in one call and all the PDF's chapters in another, at once
   (`write_all`); Python listings are highlighted by pandoc in both (in the PDF, book.typ's
   `Skylighting` sets them: Typst's own highlighting took most of the build). tools/book/page.html
   wraps each page with the sidebar, the in-page contents and prev/next links; style.css, book.js
   and favicon.svg go beside them; Pagefind indexes them while Typst typesets the PDF with
   tools/book/book.typ (title page, contents, running headers, parts, callouts, checks, figures).
   Its fonts are Typst's own and matplotlib's; for a character none of them has (語) a Debian font
   package is added (`with_fonts`: installed, or fetched into ~/.cache/minillm/fonts), and what
   still has no font is printed as [U+8A9E], with a warning.
7. All of it is written to a temporary directory next to the output (.book-tmp-<pid>-*), which
   replaces the old book only when everything succeeded: a failed build leaves the previous book as
   it was. Directories left by a killed build are removed by the next one.

`--chapter 04` renders one chapter for its author: its HTML page and a PDF of it alone
(book/04_attention.pdf), written into the book directory beside the rest (links to chapters that
are not in that PDF are plain text). Every chapter is still read, for the cross-references.

Error messages name a cell as "nbs/04_attention.ipynb (cell 7, nbval Cell 3)": its index among all
cells from 0 (Jupyter's order, as tests/test_width.py and test_anatomy.py count), and for a code
cell nbval's name, which counts code cells only from 0 (`nbs/04_attention.ipynb::Cell 3`).

Of _quarto.yml it reads: book.title/subtitle/author/date/output-file/chapters (with `part:`)/
appendices, project.output-dir, bibliography, csl, number-sections, lang, format.typst.papersize/
toc/toc-depth. Numbering follows Quarto: the `index` chapter (or one titled `{.unnumbered}`) is an
unnumbered preface, chapters 1, 2, ..., appendices A, B, ..., sections 2.1, figures "Figure 2.1".
Cell options it knows: `#| hide`, `include: false`, `echo: false`, `output: false`, `label: fig-x`
with `fig-cap`, nbdev's `export` and `default_exp`; in markdown `::: {.content-visible
when-format="html"}` and callouts. The rest of Quarto is not supported (the chapters do not use it):
executing code, shortcodes, references other than @sec-/@fig- (an error), `crossref:` options,
sub-figures, other cell options (`fig-alt`, `output: asis`, `warning`), raw cells, cell attachments,
`content-hidden`, `unless-format`, the other `format:` options, JavaScript/widget outputs (their
text/plain is shown) and, in the PDF, HTML outputs other than tables. A `.qmd`/`.md` chapter is
read as plain pandoc markdown.
"""

import argparse
import base64
import concurrent.futures
import datetime
import functools
import hashlib
import html
import json
import os
import re
import shutil
import string
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import pandocfilters as pf
from pandocfilters import Div, Link, Plain, RawBlock, RawInline, Space, Span, Str, stringify

TEMPLATES = Path(__file__).resolve().parent / "book"
CALLOUTS = {
    "note": "Note",
    "tip": "Tip",
    "warning": "Warning",
    "important": "Important",
    "caution": "Caution",
}
# Quarto's cross-reference prefixes: `@tbl-x` is a reference (only @sec- and @fig- are supported).
CROSSREF_PREFIXES = "sec fig tbl eq lst thm lem cor prp cnj def exm exr nte tip wrn imp cau".split()
# Which output a cell shows of the mime types it stored, best first. The PDF cannot show HTML,
# except a table (pandas), which pandoc turns into a Typst table. A cell with a figure label prefers
# its image in both formats.
SHOW = {
    "html": "text/html text/markdown image/svg+xml image/png image/jpeg text/plain".split(),
    "typst": "text/markdown image/svg+xml image/png image/jpeg text/html text/plain".split(),
}
IMAGES = {"image/svg+xml": "svg", "image/png": "png", "image/jpeg": "jpg"}

NBVAL_MARKER = re.compile(r"^\s*#\s*NBVAL_[A-Z_]+\s*$")  # nbval's test markers
ANSI = re.compile(
    r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][A-Za-z0-9]|\x1b[=>]"
)
CELL_MARK = "minillm-cell"  # raw block format that marks where a cell starts
TYPST_TEMPLATE = ".book-template.typ"  # tools/book/book.typ, next to the document that imports it


class BookError(Exception):
    "A problem with the book or its sources; the message names the file (and cell) at fault."


def warn(message):
    print(f"render_book: warning: {message}", file=sys.stderr)


def need(module, what):
    try:
        return __import__(module)
    except ImportError:
        raise BookError(
            f"the Python package `{what}` is missing: "
            "`pip install pypandoc-binary typst pyyaml` in the "
            f"venv, or run `make book`, which sets up .venv"
        ) from None


# --------------------------------------------------------------------------------------------------
# _quarto.yml


@dataclass
class Chapter:
    src: str  # as listed in _quarto.yml: "nbs/01_data.ipynb"
    path: Path
    part: int | None = None  # index into Book.parts
    appendix: bool = False
    page: str = ""  # its HTML page: "01_data.html"; the first chapter is "index.html"
    blocks: list = field(default_factory=list)  # pandoc AST
    number: str | None = None  # "2", "A"; None for an unnumbered chapter
    title: str = ""
    anchor: str = ""  # id of its title heading
    description: str = ""  # the `> ...` line under the title
    sections: list = field(default_factory=list)  # (id, number, title) of its `##` headings
    ids: set = field(default_factory=set)  # every id in the chapter
    cites: list = field(default_factory=list)  # (Cite node's content, cell) of every citation
    problems: list = field(default_factory=list)  # what the prose checks found

    @property
    def stem(self):
        return self.path.stem

    def label(self):  # "2 The corpus"
        return f"{self.number} {self.title}" if self.number else self.title


@dataclass
class Book:
    title: str
    subtitle: str | None
    authors: list
    date: str | None
    output_file: str
    output_dir: str
    lang: str
    number_sections: bool
    paper: str
    toc: bool
    toc_depth: int
    chapters: list
    parts: list  # (number, title); number is None for "Appendices"
    project: Path = Path(".")
    bibliography: list = field(default_factory=list)  # .bib files, absolute paths
    csl: Path | None = None
    lib_name: str = ""  # nbdev's lib_name (pyproject.toml): the module note says `minillm.data`


def read_config(project: Path) -> Book:
    yaml = need("yaml", "pyyaml")
    cfg_file = project / "_quarto.yml"
    try:
        cfg = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise BookError(
            f"{cfg_file}: not found (--project must be the directory of the book's _quarto.yml)"
        ) from None
    except yaml.YAMLError as e:
        raise BookError(f"{cfg_file}: invalid YAML: {e}") from None
    book, fmt = cfg.get("book") or {}, cfg.get("format") or {}
    typ = fmt.get("typst") if isinstance(fmt.get("typst"), dict) else {}

    chapters, parts = [], []

    def add(src, part=None, appendix=False):
        if not isinstance(src, str):
            raise BookError(f"{cfg_file}: book.chapters: cannot read the entry {src!r}")
        path = (project / src).resolve()
        if not path.is_file():
            raise BookError(f"{cfg_file}: the chapter {src} does not exist ({path})")
        chapters.append(Chapter(src=src, path=path, part=part, appendix=appendix))

    for entry in book.get("chapters") or []:
        if isinstance(entry, dict) and "part" in entry:
            if str(entry["part"]).endswith((".qmd", ".md", ".ipynb")):
                raise BookError(
                    f"{cfg_file}: `part: {entry['part']}` (a part given as a file) is not supported"
                )
            parts.append((_roman(sum(p[0] is not None for p in parts) + 1), str(entry["part"])))
            for src in entry.get("chapters") or []:
                add(src, part=len(parts) - 1)
        else:
            add(entry)
    if book.get("appendices"):
        parts.append((None, "Appendices"))
        for src in book["appendices"]:
            add(src, part=len(parts) - 1, appendix=True)
    if not chapters:
        raise BookError(f"{cfg_file}: book.chapters lists no chapter")

    pages = {}
    for i, ch in enumerate(chapters):
        ch.page = "index.html" if i == 0 else f"{ch.stem}.html"
        if ch.page in pages:
            raise BookError(
                f"{cfg_file}: {pages[ch.page]} and {ch.src} would both become {ch.page}"
            )
        pages[ch.page] = ch.src

    authors = book.get("author") or cfg.get("author") or []
    authors = authors if isinstance(authors, list) else [authors]
    authors = [a.get("name", "") if isinstance(a, dict) else str(a) for a in authors]
    authors = [
        a.get("literal", "") if isinstance(a, dict) else a for a in authors
    ]  # name: {literal: ...}
    date = book.get("date") or cfg.get("date")
    if date in ("today", "now", "last-modified"):
        date = datetime.date.today().isoformat()
    bibliography = cfg.get("bibliography") or []
    bibliography = [bibliography] if isinstance(bibliography, str) else list(bibliography)
    bibs = []
    for b in bibliography:
        if not (project / str(b)).is_file():
            raise BookError(f"{cfg_file}: the bibliography {b} does not exist")
        bibs.append((project / str(b)).resolve())
    if cfg.get("csl") and not (project / str(cfg["csl"])).is_file():
        raise BookError(f"{cfg_file}: the citation style (csl) {cfg['csl']} does not exist")
    return Book(
        title=str(book.get("title") or cfg.get("title") or "Untitled"),
        subtitle=str(book["subtitle"]) if book.get("subtitle") else None,
        authors=[a for a in authors if a],
        date=str(date) if date else None,
        output_file=str(book.get("output-file") or "book"),
        output_dir=str((cfg.get("project") or {}).get("output-dir") or "_book"),
        lang=str(cfg.get("lang") or "en"),
        number_sections=cfg.get("number-sections", True) is not False,
        paper=str(typ.get("papersize") or "a4"),
        toc=typ.get("toc", True) is not False,
        toc_depth=int(typ.get("toc-depth") or 2),
        chapters=chapters,
        parts=parts,
        project=project,
        bibliography=bibs,
        csl=(project / str(cfg["csl"])).resolve() if cfg.get("csl") else None,
        lib_name=lib_name(project),
    )


def lib_name(project: Path):
    "The package the notebooks export to: [tool.nbdev] lib_name, else [project] name."
    try:
        import tomllib

        cfg = tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))
    except (OSError, ValueError, ImportError):
        return ""
    nbdev = (cfg.get("tool") or {}).get("nbdev") or {}
    return str(nbdev.get("lib_name") or (cfg.get("project") or {}).get("name") or "")


def _roman(n):
    out = ""
    for value, letters in ((10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")):
        while n >= value:
            out, n = out + letters, n - value
    return out


# --------------------------------------------------------------------------------------------------
# Notebook -> pandoc markdown


def cell_text(value):
    return "".join(value) if isinstance(value, list) else (value or "")


def cell_options(cell):
    """(options, source) of a cell, read by nbdev's notebook reader (fastcore.nbio): its leading
    `#|` lines are nbdev's directives (`#| export`, `#| default_exp data`) and Quarto's options,
    which are YAML (`#| fig-cap: >-` and the caption on the next `#|` lines: nbdev reads each line
    alone, so where the lines are YAML, YAML reads them). nbval's `# NBVAL_*` markers are removed
    first (a label may follow one)."""
    from fastcore.nbio import NbCell

    yaml = need("yaml", "pyyaml")
    source = "".join(l for l in cell.source.splitlines(True) if not NBVAL_MARKER.match(l))
    cell = NbCell(cell.idx_, {**cell, "source": source})
    dirs, body = cell._partition()
    try:
        opts = yaml.safe_load("".join(re.sub(r"^\s*#\|\s?", "", d) for d in dirs))
    except yaml.YAMLError:
        opts = None
    if not isinstance(opts, dict):  # nbdev's words, a value YAML cannot read (`*Emma* ...`)
        opts = {k: yaml_value(v) if v else True for k, v in cell.directives.items()}
    return opts, "".join(body).strip("\n")


def yaml_value(text):
    try:
        return need("yaml", "pyyaml").safe_load(text)
    except Exception:
        return text


def plain_text(text):
    """Terminal text as a reader saw it: no ANSI colours, and a `\\r` (progress bars) overwrites
    its line."""
    text = ANSI.sub("", cell_text(text)).replace("\r\n", "\n")
    return "\n".join(([p for p in line.split("\r") if p] or [""])[-1] for line in text.split("\n"))


def fenced(text, info=""):
    fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
    return f"{fence}{info}\n{text}\n{fence}"


def div(classes, body):
    return f"::::: {{{' '.join('.' + c for c in classes.split())}}}\n{body}\n:::::"


def cell_label(cells, i):
    """How messages name cell `i`: its index among all cells, counting from 0 (Jupyter's order, as
    tests/test_width.py and test_anatomy.py count), and for a code cell also nbval's name for it,
    which counts code cells only: "7, nbval Cell 3" is the `Cell 3` of pytest's output."""
    if cells[i].get("cell_type") != "code":
        return str(i)
    return f"{i}, nbval Cell {sum(c.get('cell_type') == 'code' for c in cells[:i])}"


def default_exp(cells):
    "The module a notebook exports to (`#| default_exp data`), or None."
    return next((c.directive("default_exp") for c in cells if c.directive("default_exp")), None)


def module_note(text, module, lib):
    """nbdev's module docstring (a markdown cell starting `#| export`) as a note titled with the
    module's name; a plain note where the notebook names no module."""
    name = f"{lib}.{module}" if lib and module else module
    title = f"The module `{name}`" if name else "The module"
    return f"::::: {{.callout-note .module-doc}}\n## {title} {{.unnumbered}}\n\n{text}\n:::::"


def check_summary(code):
    """For a cell whose code is nothing but `assert` statements (and comments): a one-line summary
    of what it checks (its first condition); for any other cell None."""
    import ast

    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return None
    if not tree.body or not all(isinstance(s, ast.Assert) for s in tree.body):
        return None
    first = " ".join((ast.get_source_segment(code, tree.body[0].test) or "").split())
    if len(first) > 70:
        first = first[:69] + "…"
    more = len(tree.body) - 1
    return first + (f" (and {more} more)" if more else "")


def notebook_markdown(ch, media: Path, lib=""):
    """The chapter as pandoc markdown, and the HTML outputs that the PDF shows as tables
    (placeholders in the text)."""
    from fastcore.nbio import dict2nb  # nbdev's notebook reader

    nb = read_notebook(ch.path, ch.src)
    lang = (nb.get("metadata") or {}).get("kernelspec", {}).get("language") or "python"
    nb = dict2nb(nb)
    chunks, tables = [], []
    module = default_exp(nb.cells)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type not in ("markdown", "code"):
            continue
        opts, source = cell_options(cell)
        if opts.get("include") is False or opts.get("hide"):
            continue
        where = f"{ch.src} (cell {cell_label(nb.cells, i)})"
        if cell.cell_type == "markdown":
            md = source
            for tex in MATH_SPAN.findall(md):  # before pandoc, which turns tabs into spaces
                if CONTROL.search(tex):
                    warn(f"{where}: {math_control(tex)}")
            if opts.get("export") and md.strip():  # nbdev's module docstring
                md = module_note(md, module, lib)
        else:
            md = code_cell_markdown(cell, i, where, opts, source, lang, media, tables)
        if md.strip():
            chunks.append(f"```{{={CELL_MARK}}}\n{cell_label(nb.cells, i)}\n```\n\n{md}")
    return "\n\n".join(chunks) + "\n", tables


def read_notebook(path: Path, name):
    "The notebook's JSON; invalid JSON is one line naming the file and the position."
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BookError(
            f"{name}: not a valid notebook (invalid JSON at line {e.lineno} column {e.colno}: "
            f"{e.msg})"
        ) from None
    except UnicodeDecodeError as e:
        raise BookError(f"{name}: not a valid notebook (not UTF-8: {e.reason})") from None
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise BookError(f"{name}: not a notebook (no list of cells)")
    return nb


def check_notebooks(project: Path):
    """Every notebook of the project (nbdev's nbs_path, and the chapters) is valid JSON: run before
    nbdev-export, whose traceback for a broken notebook never names the file."""
    import tomllib

    try:
        cfg = tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))
        nbs = (cfg.get("tool") or {}).get("nbdev", {}).get("nbs_path") or "nbs"
    except (OSError, ValueError):
        nbs = "nbs"
    for path in sorted((project / nbs).rglob("*.ipynb")):
        if ".ipynb_checkpoints" not in path.parts:
            read_notebook(path, os.path.relpath(path, project))


def write_media(media: Path, name, data, mime):
    "Save an output's image under media/<chapter>/ and return its path relative to the book's root."
    media.mkdir(parents=True, exist_ok=True)
    if mime == "image/svg+xml":
        (media / name).write_text(cell_text(data), encoding="utf-8")
    else:
        (media / name).write_bytes(base64.b64decode(cell_text(data)))
    return f"{media.parent.name}/{media.name}/{name}"


def code_cell_markdown(cell, i, where, opts, code, lang, media, tables):
    out = []
    if code.strip() and opts.get("echo", True) is not False:
        block = fenced(code, f"{{.{lang} .cell-code}}")
        summary = check_summary(code) if lang == "python" else None
        if summary is not None:  # a check: shown compactly, as a check (see `resolve`)
            quoted = summary.replace("\\", "\\\\").replace('"', '\\"')
            block = f'::::: {{.check summary="{quoted}"}}\n{block}\n:::::'
        out.append(block)
    if opts.get("output", True) is not False:
        out += outputs_markdown(cell, i, where, opts, media, tables)
    return "\n\n".join(out)


def outputs_markdown(cell, i, where, opts, media, tables):
    label = str(opts.get("label") or "")
    figure = {"id": label, "cap": str(opts.get("fig-cap") or "")} if label[:4] == "fig-" else None
    outputs = []
    for o in cell.get("outputs") or []:  # a stream printed in several pieces is one output
        if (
            o.get("output_type") == "stream"
            and outputs
            and outputs[-1].get("output_type") == "stream"
            and outputs[-1].get("name") == o.get("name")
        ):
            outputs[-1] = {
                **outputs[-1],
                "text": cell_text(outputs[-1]["text"]) + cell_text(o.get("text")),
            }
        else:
            outputs.append(o)
    out = []
    for k, o in enumerate(outputs):
        kind = o.get("output_type")
        if kind == "stream":
            text = plain_text(o.get("text")).rstrip("\n")
            if text.strip():
                name = "stderr" if o.get("name") == "stderr" else "stdout"
                out.append(div(f"cell-output cell-output-{name}", fenced(text, "{." + name + "}")))
        elif kind == "error":
            source = cell_text(cell.get("source"))
            if "raises-exception" not in (cell.get("metadata") or {}).get(
                "tags", []
            ) and not re.search(r"^\s*#\s*NBVAL_RAISES_EXCEPTION\s*$", source, re.MULTILINE):
                raise BookError(
                    f"{where}: the stored output is an error ({o.get('ename')}: "
                    f"{o.get('evalue')}); fix the cell and re-run the notebook, or mark it "
                    f"'# NBVAL_RAISES_EXCEPTION' if the error is the point"
                )
            text = plain_text(
                "\n".join(o.get("traceback") or []) or f"{o.get('ename')}: {o.get('evalue')}"
            )
            out.append(div("cell-output cell-output-error", fenced(text.rstrip("\n"), "{.error}")))
        elif kind in ("execute_result", "display_data"):
            data = o.get("data") or {}
            shown = {}
            for fmt, order in SHOW.items():
                if figure:
                    order = [m for m in order if m in IMAGES] + [
                        m for m in order if m not in IMAGES
                    ]
                ok = [
                    m
                    for m in order
                    if m in data
                    and (m != "text/html" or fmt == "html" or "<table" in cell_text(data[m]))
                ]
                shown[fmt] = ok[0] if ok else None
            if shown["html"] == shown["typst"]:
                md = display_markdown(
                    data, shown["html"], "both", f"cell{i}-{k}", media, tables, figure, opts
                )
            else:
                md = "\n\n".join(
                    div(
                        f"only-{fmt}",
                        display_markdown(
                            data, shown[fmt], fmt, f"cell{i}-{k}", media, tables, figure, opts
                        ),
                    )
                    for fmt in ("html", "typst")
                    if shown[fmt]
                )
            if md:
                out.append(md)
    if figure and not figure.get("used"):
        warn(
            f"{where}: #| label: {label}, but the cell has no image output "
            "(run the notebook and save it)"
        )
    return out


def display_markdown(data, mime, fmt, name, media, tables, figure, opts):
    if mime is None:
        return ""
    value = cell_text(data[mime])
    if not value.strip():
        return ""
    if mime in IMAGES:
        path = write_media(media, f"{name}.{IMAGES[mime]}", data[mime], mime)
        if figure and not figure.get("used"):  # the cell's figure: its first image (no sub-figures)
            figure["used"] = True
            return f"![{' '.join(figure['cap'].split())}]({path}){{#{figure['id']}}}"
        return f"![]({path})"
    if mime == "text/html" and "<table" in value:
        # a DataFrame: in both formats the table pandoc reads out of the HTML (see parse_chapter)
        tables.append(value)
        index = len(tables) - 1
        return f'::::: {{.cell-output .cell-output-display .html-table index="{index}"}}\n:::::'
    if mime == "text/html":  # other HTML: as it is, in the HTML only
        return div("cell-output cell-output-display", fenced(value.strip("\n"), "{=html}"))
    if mime == "text/markdown":  # its tables are tidied like a DataFrame's (see `tidy_table`)
        return div("cell-output cell-output-display cell-output-markdown", value)
    return div(
        "cell-output cell-output-display", fenced(plain_text(value).rstrip("\n"), "{.stdout}")
    )


def markdown_chapter(ch):
    "A .qmd/.md chapter (the references chapter): read as pandoc markdown, its code not run."
    return ch.path.read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# pandoc and its AST


@functools.lru_cache(maxsize=None)
def pandoc_path():
    return need("pypandoc", "pypandoc-binary").get_pandoc_path()


def pandoc(text, src, dst, where, *args, cache=None):
    """pandoc's conversion of `text`. With `cache` (True, or a list of the texts of the files the
    conversion reads), the result is kept in cache_dir()/ast, named by a hash of pandoc, the
    conversion and the texts: a chapter that did not change since the last build is not parsed
    again (every chapter is read on every build, for the cross-references).
    What no build used for a day is removed (`prune_cache`)."""
    cmd = [pandoc_path(), "-f", src, "-t", dst, *args]
    if cache:
        key = [pandoc_version(), cmd[1:], text, cache]
        key = hashlib.sha256(json.dumps(key).encode()).hexdigest()
        path = cache_dir() / "ast" / f"{key}.{dst}"
        try:
            os.utime(path)  # used now
            return path.read_text(encoding="utf-8")
        except OSError:
            pass
    try:
        r = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True)
    except OSError as e:
        raise BookError(
            f"cannot run pandoc ({cmd[0]}: {e}): reinstall it with `pip install pypandoc-binary`"
        ) from None
    if r.returncode != 0:
        raise BookError(
            f"{where}: pandoc ({src} -> {dst}) failed: "
            + r.stderr.decode("utf-8", "replace").strip()
        )
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(f".{os.getpid()}-{threading.get_ident()}")
        part.write_bytes(r.stdout)
        os.replace(part, path)  # whole or not at all
    return r.stdout.decode("utf-8")


@functools.lru_cache(maxsize=None)
def pandoc_version():
    return subprocess.run([pandoc_path(), "--version"], capture_output=True, text=True).stdout


def prune_cache():
    "Remove the cached conversions no build used for a day (chapters as they were before an edit)."
    for f in (cache_dir() / "ast").glob("*"):
        try:
            if time.time() - f.stat().st_mtime > 86400:
                f.unlink()
        except OSError:  # another build removed it
            pass


SPLIT = "minillm-chapter-split"


def write_all(asts, fmt, api_version, listings=()):
    """The chapters' ASTs written in `fmt` ("html" or "typst") by one pandoc call (its highlighter
    takes half a second to set up, per call), and split back into one text per chapter. In Typst,
    the `// minillm-listing N` lines that `resolve` left become the highlighted `listings`."""
    mark = f"<!--{SPLIT}-->" if fmt == "html" else f"// {SPLIT}"
    blocks = [b for ast in asts for b in [raw(fmt, mark)] + ast]
    if fmt == "typst":
        blocks = sticky_intros(blocks)
    doc = json.dumps({"pandoc-api-version": api_version, "meta": {}, "blocks": blocks})
    args = ["--mathml", "--wrap=none", "--reference-location=block"]
    if fmt == "html":
        return pandoc(doc, "json", fmt, "the book", *args).split(mark + "\n")[1:]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # two pandoc processes at once
        calls = pool.submit(typst_listings, listings, api_version)
        out = pandoc(doc, "json", fmt, "the book", "--wrap=preserve")
        out = LISTING.sub(lambda m: calls.result()[int(m[1])], typst_symbols(out))
    return out.split(mark + "\n")[1:]


LISTING = re.compile(r"^// minillm-listing (\d+)$", re.M)


def typst_listings(listings, api_version):
    """The PDF's Python listings (CodeBlock contents) highlighted by pandoc (skylighting), as
    book.typ's `Skylighting` sets them: Typst's own highlighting of raw blocks takes many times
    longer. Only these: pandoc would also turn inline code and outputs into `NormalTok` calls."""
    mark = RawBlock("typst", f"// {SPLIT}")
    code = [b for c in listings for b in ({"t": "CodeBlock", "c": c}, mark)]
    doc = json.dumps({"pandoc-api-version": api_version, "meta": {}, "blocks": code})
    typst = pandoc(doc, "json", "typst", "the listings", "--syntax-highlighting=pygments")
    return [call.strip() for call in typst.split(f"// {SPLIT}\n")]


def walk(x, fn):
    """pandocfilters' walk with `fn(t, c, ...)`: it returns None (keep the node), a node or a list
    of nodes (splice); `c` is the node's own content, so `fn` may also change it in place.
    Top-down: what `fn` returns is walked into, but not passed to `fn` itself."""
    return pf.walk(x, fn, "", {})


def raw(fmt, text, block=True):
    return (RawBlock if block else RawInline)(fmt, text)


ATTR = {"Header": 1, "Div": 0, "Span": 0, "CodeBlock": 0, "Code": 0, "Figure": 0, "Table": 0}
ATTR.update(Image=0, Link=0)


def attr(t, c):
    "The [id, classes, key-values] of a node that has one, else None."
    pos = ATTR.get(t)
    return c[pos] if pos is not None else None


def parse_chapter(ch, tmp: Path, lib=""):
    "Step 2: the chapter's pandoc AST, with the HTML tables of its outputs parsed."
    if ch.path.suffix == ".ipynb":
        md, tables = notebook_markdown(ch, tmp / "media" / ch.stem, lib)
    else:
        md, tables = markdown_chapter(ch), []
    try:
        doc = json.loads(pandoc(md, "markdown", "json", ch.src, cache=True))
    except BookError:  # find the cell pandoc cannot read
        for chunk in md.split(f"```{{={CELL_MARK}}}\n")[1:]:
            cell, _, text = chunk.partition("\n```\n")
            pandoc(text, "markdown", "json", f"{ch.src} (cell {cell})")
        raise
    parsed = [
        json.loads(pandoc(t, "html", "json", f"{ch.src}: an HTML output", cache=True))["blocks"]
        for t in tables
    ]

    def fill(t, c, *_):
        if t == "Div" and "html-table" in c[0][1]:
            c[1] = parsed[int(dict(c[0][2])["index"])]
            c[0][1].remove("html-table")
            c[0][2] = []
        if t == "Div" and "cell-output-display" in c[0][1]:
            walk(c, lambda t, c, *_: tidy_table(c) if t == "Table" else None)
        elif t == "Table":
            left_aligned(c)
        if t == "RawBlock" and c[0] == CELL_MARK:
            cell[0] = c[1]
        if t == "Cite":
            ch.cites.append((c, cell[0]))
        if t == "Image":  # an image file next to the notebook: copy it into media/
            url = c[2][0]
            if re.match(r"^[a-z][a-z0-9+.-]*:|^/", url, re.I) or (tmp / url).is_file():
                return
            if not (ch.path.parent / unquote(url)).is_file():
                missing.append(f"{at(ch, cell[0])}: the image {url} does not exist")
                return
            dst = tmp / "media" / ch.stem / unquote(url).replace("/", "_").replace("..", "_")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ch.path.parent / unquote(url), dst)
            c[2][0] = f"media/{ch.stem}/{dst.name}"

    missing, cell = [], [None]
    ch.blocks = doc["blocks"]
    walk(ch.blocks, fill)  # in place
    if missing:
        raise BookError("\n".join(missing))
    return doc["pandoc-api-version"]


MISSING = {"", "nan", "NaN", "None", "<NA>", "NaT", "null", "—"}
NUMBER = re.compile(r"^[-+−]?(\d{1,3}(,\d{3})+|\d*)(\.\d+)?([eE][-+]?\d+)?\s?%?$|^[-+−]?inf$")


def left_aligned(c):
    """A table column that does not say how to align is left-aligned, as in the HTML (pandoc's
    Typst centres the table, and a column that does not say would inherit that)."""
    for spec in c[2]:
        if spec[0]["t"] == "AlignDefault":
            spec[0] = {"t": "AlignLeft"}


def tidy_table(c):
    """A table a cell printed (a DataFrame, a Markdown pipe table): missing values shown as "—";
    columns whose values are all numbers right-aligned, the others left-aligned (where the table
    does not say); every column as wide as its content needs."""
    _, _, colspecs, head, bodies, foot = c
    body_rows = [row[1] for b in bodies for row in b[2] + b[3]]
    for cells in body_rows:
        for cell in cells:
            if stringify(cell[4]).strip() in MISSING:
                cell[4] = [Plain([Str("—")])]
    for j, spec in enumerate(colspecs):
        values = [stringify(cells[j][4]).strip() for cells in body_rows if j < len(cells)]
        values = [v for v in values if v != "—"]
        numeric = bool(values) and all(NUMBER.match(v) and re.search(r"\d|inf", v) for v in values)
        if spec[0]["t"] == "AlignDefault":
            spec[0] = {"t": "AlignRight" if numeric else "AlignLeft"}
        # A Markdown table built in code has equal dashes in its |---| line, which pandoc reads as
        # equal column widths where a row is long: names wrap beside half-empty number columns.
        spec[1] = {"t": "ColWidthDefault"}
    for cells in body_rows + [row[1] for row in head[1] + foot[1]]:
        for cell in cells:
            cell[1] = {"t": "AlignDefault"}  # the column's alignment


# --------------------------------------------------------------------------------------------------
# Citations: [@key] with pandoc's citeproc, for the whole book at once


def is_crossref(key):
    "`@sec-x`, `@fig-x`, ...: Quarto's cross-reference syntax, not a citation."
    label = key[:1].lower() + key[1:]
    return "-" in label and label.split("-")[0] in CROSSREF_PREFIXES


def bibliography_keys(book: Book):
    "The citation keys of the book's bibliography files (read by pandoc, as citeproc reads them)."
    keys = set()
    readers = {".bib": "biblatex", ".bibtex": "bibtex", ".json": "csljson", ".yaml": "markdown"}
    for path in book.bibliography:
        src = readers.get(path.suffix.lower(), "biblatex")
        bib = path.read_text(encoding="utf-8")
        items = json.loads(pandoc(bib, src, "csljson", str(path.name), cache=True))
        keys |= {item["id"] for item in items}
    return keys


def collect_citations(ch, keys, book: Book, problems):
    """The chapter's citations (its Cite nodes that are not cross-references), in order, each with
    the cross-references cited with it in one [...] (or None); an unknown key is a problem naming
    the cell."""
    found = []
    for c, cell in ch.cites:  # changed in place: cite_book fills in the Cite nodes found
        ids = [x["citationId"] for x in c[0]]
        refs = [k for k in ids if is_crossref(k)]
        unknown = [k for k in ids if k not in keys and not is_crossref(k)]
        if unknown:
            names = ", ".join(p.name for p in book.bibliography)
            problems.append(
                f"{at(ch, cell)}: unknown citation key "
                + ", ".join("@" + k for k in unknown)
                + (f" (not in {names})" if names else " (_quarto.yml names no bibliography)")
                + "; write \\@ for a literal @"
            )
        elif refs and len(refs) < len(ids):  # [@paper; @sec-x]: "(Paper 2019; Chapter 8)"
            tail = {"t": "Cite", "c": [[x for x in c[0] if is_crossref(x["citationId"])], []]}
            c[0][:] = [x for x in c[0] if not is_crossref(x["citationId"])]
            found.append((c, tail))
        elif not refs:
            found.append((c, None))
    return found


def cite_book(book: Book, cites, api_version):
    """Format every citation of the book in one citeproc run (so that "Touvron et al. 2023a" and
    the bibliography agree across chapters); returns the bibliography, a Div#refs."""
    blocks = [{"t": "Para", "c": [{"t": "Cite", "c": c}]} for c, _ in cites]
    blocks.append(Div(["refs", [], []], []))
    doc = {
        "pandoc-api-version": api_version,
        "meta": {"link-citations": {"t": "MetaBool", "c": True}},
        "blocks": blocks,
    }
    args = ["--citeproc", f"--metadata=lang:{book.lang}"]
    args += [f"--bibliography={b}" for b in book.bibliography]
    args += [f"--csl={book.csl}"] if book.csl else []
    files = [b.read_text(encoding="utf-8") for b in book.bibliography + [book.csl] if b]
    out = pandoc(json.dumps(doc), "json", "json", "the citations", *args, cache=files)
    out = json.loads(out)["blocks"]
    if len(out) != len(blocks) or any(
        b["t"] != "Para" or b["c"][0]["t"] != "Cite" for b in out[:-1]
    ):
        raise BookError("citeproc returned the citations in an unexpected shape")
    for (cite, tail), para in zip(cites, out):
        content = para["c"][0]["c"][1]
        if tail:  # the cross-references inside the parentheses: "(Paper 2019; Chapter 8)"
            close = content and content[-1]["t"] == "Str" and content[-1]["c"].endswith(")")
            if close:
                content[-1]["c"] = content[-1]["c"][:-1]
            content += [Str(";"), Space(), tail] + ([Str(")")] if close else [])
        cite[1] = content
    return out[-1]


def add_references(book: Book, refs):
    """The bibliography goes where Quarto puts it: into the `references` chapter (its `::: {#refs}`
    div, else its end) if the book has one, else into an unnumbered chapter at the end."""
    ch = next((c for c in book.chapters if c.stem == "references"), None)
    if ch is None:
        src = book.bibliography[0].name if book.bibliography else "references"
        ch = Chapter(src=src, path=book.project / "references", page="references.html")
        header = {"t": "Header", "c": [1, ["references", ["unnumbered"], []], [Str("References")]]}
        ch.blocks = [header]
        book.chapters.append(ch)
    filled = []

    def fill(t, c, *_):
        if t == "Div" and c[0][0] == "refs":
            filled.append(True)
            return refs

    ch.blocks = walk(ch.blocks, fill)
    if not filled:
        ch.blocks.append(refs)
    return ch


# --------------------------------------------------------------------------------------------------
# Step 3: numbers and labels


@dataclass
class Target:
    chapter: Chapter
    kind: str  # "chapter", "section" or "figure"
    number: str | None
    title: str

    def text(self, number_only=False):
        if self.number is None:
            return self.title
        if number_only:
            return self.number
        name = {
            "chapter": "Appendix" if self.chapter.appendix else "Chapter",
            "section": "Section",
            "figure": "Figure",
            "reference": "",
        }
        return f"{name[self.kind]}\u00a0{self.number}"


def callout(t, c, *_):
    """::: {.callout-KIND} with a `## Title` or title="..." -> Div.callout > Div.callout-title +
    Div.callout-body."""
    if t != "Div":
        return None
    (ident, classes, kv), body = c
    kind = next((c[8:] for c in classes if c.startswith("callout-") and c[8:] in CALLOUTS), None)
    if kind is None or "callout" in classes:
        return None
    title = [Str(dict(kv)["title"])] if dict(kv).get("title") else None
    if title is None and body and body[0]["t"] == "Header":
        title, body = body[0]["c"][2], body[1:]
    title = title or [Str(CALLOUTS[kind])]
    classes = ["callout", f"callout-{kind}"] + [c for c in classes if c != f"callout-{kind}"]
    parts = [
        Div(["", ["callout-title"], []], [Plain(title)]),
        Div(["", ["callout-body"], []], body),
    ]
    return Div([ident, classes, []], parts)


def number_chapter(ch, number, book: Book, labels: dict):
    """Number the chapter's headings and figures (in the AST, for both formats) and record their
    labels."""
    ch.number = number
    where = {"cell": None}
    counters, figures, problems = [0] * 8, [0], []

    def visit(t, c, *_):
        a = attr(t, c)
        if a and a[0]:
            ch.ids.add(a[0])
        if t in ("Para", "Plain", "Header"):  # the prose checks (`text_problems`)
            ch.problems += text_problems(at(ch, where["cell"]), prose_text(c))
        if t == "RawBlock" and c[0] == CELL_MARK:
            where["cell"] = c[1]
        elif t == "Div":
            return callout(t, c)
        elif t == "Header":
            level, (ident, classes, kv), inlines = c
            title = stringify(inlines).strip()
            if level == 1:
                if ch.title:
                    problems.append(
                        f"{at(ch, where['cell'])}: a second level-1 heading `# {title}`: a "
                        "chapter has one `# Title`; its sections are `## ...`"
                    )
                else:
                    ch.title, ch.anchor = title, ident
                num, kind = number, "chapter"
            else:
                num = None
                if number and book.number_sections and "unnumbered" not in classes:
                    counters[level] += 1
                    counters[level + 1 :] = [0] * (len(counters) - level - 1)
                    num = ".".join([number] + [str(n) for n in counters[2 : level + 1]])
                kind = "section"
                if level == 2:
                    ch.sections.append((ident, num, title))
            if num:
                kv.append(["number", num])
            if ident.startswith("sec-"):
                register(labels, ident, Target(ch, kind, num, title), ch, where["cell"])
        elif t in ("Para", "Plain") and len(c) == 1 and c[0]["t"] == "Image":
            image = c[0]["c"]
            if image[0][0].startswith("fig-"):  # a labelled image without a caption
                figure = [[image[0][0], [], []], [None, []], [Plain([c[0]])]]
                image[0][0] = ""
                visit("Figure", figure)
                return {"t": "Figure", "c": figure}
        elif t == "Figure" and c[0][0].startswith("fig-"):
            figures[0] += 1
            num = f"{number}.{figures[0]}" if number else str(figures[0])
            caption = c[1][1]
            text = stringify(caption).strip()
            prefix = [Str(f"Figure\u00a0{num}" + (":" if text else ""))] + (
                [Space()] if text else []
            )
            if caption and caption[0]["t"] in ("Plain", "Para"):
                caption[0]["c"] = prefix + caption[0]["c"]
            else:
                c[1][1] = [Plain(prefix)] + caption
            register(labels, c[0][0], Target(ch, "figure", num, text), ch, where["cell"])

    ch.blocks = walk(ch.blocks, visit)
    if problems:
        raise BookError("\n".join(problems))
    if not ch.title:
        raise BookError(
            f"{ch.src}: no chapter title (a `# Title` heading in its first markdown cell)"
        )

    # The `> description` right under the title is the chapter's lead paragraph.
    top = [b for b in ch.blocks if not (b["t"] == "RawBlock" and b["c"][0] == CELL_MARK)]
    for h, nxt in zip(top, top[1:]):
        if h["t"] == "Header" and h["c"][0] == 1:
            if nxt["t"] == "BlockQuote":
                ch.description = stringify(nxt["c"]).strip()
                nxt.update(Div(["", ["lead"], []], nxt["c"]))
            break


# What must never reach a reader: markup that leaked into the text, TeX outside maths, a prime ′
# standing for an apostrophe ("GPT-2′s").
LEAKS = [
    (re.compile(r"rgb\(|#text\("), "markup shown as text (`{}`): a formatting call leaked"),
    (re.compile(r"[_^]\{"), "TeX outside maths (`{}`): write it as $...$"),
    (re.compile(r"(?<=\w)\u2032(?=[a-z])"), "a prime ′ used as an apostrophe (`{}`): write ' or ’"),
]


def text_problems(where, text):
    out = []
    for pattern, message in LEAKS:
        for m in pattern.finditer(text):
            snippet = text[max(0, m.start() - 12) : m.end() + 8].replace("\n", " ").strip()
            out.append(f"{where}: {message.format(snippet)}")
    return out


# A tab, backspace... in a formula: a Python string ate a backslash ("\text" became tab + "ext").
CONTROL = re.compile(r"[\x00-\x09\x0b\x0c\x0e-\x1f]")
MATH_SPAN = re.compile(r"(?<![\\$])\$\$?(.+?)\$", re.S)  # near enough to find one


def math_control(tex):
    "The warning for a formula with a control character in it (shown as its symbol: \\t as ␉)."
    c = CONTROL.search(tex)
    snippet = CONTROL.sub(lambda m: chr(0x2400 + ord(m.group(0))), tex[max(0, c.start() - 12) :])
    return (
        f"a control character in the formula ...{snippet[:30]}... ({c.group(0)!r} shown as "
        f"{chr(0x2400 + ord(c.group(0)))}): a Python escape (\\t in \\text, \\b in \\beta, "
        "\\f in \\frac, \\r in \\right) where a backslash was meant"
    )


def prose_text(x):
    "The visible text of inlines, with code, maths and raw markup left out."
    if isinstance(x, list):
        return "".join(prose_text(i) for i in x)
    if not isinstance(x, dict):
        return ""
    t = x.get("t")
    if t == "Str":
        return x["c"]
    if t in ("Space", "SoftBreak", "LineBreak"):
        return " "
    if t in ("Code", "Math", "RawInline", "Note"):
        return " "
    if t in ("Link", "Image", "Span", "Cite", "Quoted"):
        return prose_text(x["c"][1])
    return prose_text(x.get("c"))


VISIBLE_SKIP = re.compile(
    r"<(pre|code|math|script|style|summary)\b.*?</\1>|<!--.*?-->", re.S | re.I
)


def html_problems(ch, page):
    "The same checks on the text a reader sees in the HTML page (code and maths left out)."
    text = html.unescape(re.sub(r"<[^>]+>", " ", VISIBLE_SKIP.sub(" ", page)))
    return text_problems(f"{ch.src} (its HTML page)", text)


def register(labels, ident, target, ch, cell):
    if ident in labels:
        other = labels[ident].chapter
        raise BookError(
            f"{at(ch, cell)}: the label #{ident} is defined twice (also in {other.src})"
        )
    labels[ident] = target


def at(ch, cell):
    return f"{ch.src} (cell {cell})" if cell is not None else ch.src


def is_numbered(ch):
    "Quarto's rule: the `index` chapter and a chapter whose title is {.unnumbered} have no number."
    first = next((b for b in ch.blocks if b["t"] == "Header" and b["c"][0] == 1), None)
    return ch.stem != "index" and not (first and "unnumbered" in first["c"][1][1])


# --------------------------------------------------------------------------------------------------
# Step 4: one AST per format, with references resolved


def typst_label(ch, ident, labels):
    "Typst labels are global: ids other than #sec-/#fig- labels get the chapter's name in front."
    return ident if ident in labels else f"{ch.stem}--{ident}"


def resolve(ch, fmt, book: Book, labels: dict, problems: list, present=None, listings=None):
    """The chapter's AST for one format (`html` or `typst`): refs resolved, format-only content
    chosen, numbers shown. `present`: the chapters in the PDF (in a one-chapter preview, links to
    the others are left as text). In Typst a Python listing becomes a line `// minillm-listing N`
    and its code listings[N] (see `write_all`)."""
    by_path = {c.path: c for c in book.chapters}
    where = {"cell": None}

    def href(target_ch, ident):
        if fmt == "typst":
            if present is not None and target_ch not in present:
                return ""  # not in this PDF
            return "#" + typst_label(target_ch, ident or target_ch.anchor, labels)
        if not ident or ident == target_ch.anchor:
            return target_ch.page
        return ("" if target_ch is ch else target_ch.page) + "#" + ident

    def link_url(url):
        if re.match(r"^[a-z][a-z0-9+.-]*:|^//", url, re.I) or url in ("", "#"):
            return url
        path, _, frag = url.partition("#")
        target = ch
        if path:
            target = by_path.get((ch.path.parent / unquote(path)).resolve())
            if target is None:
                return url  # not a chapter of the book: left as it is
        frag = unquote(frag)
        if frag in labels:
            return href(labels[frag].chapter, frag)
        if frag and frag not in target.ids:
            problems.append(
                f"{at(ch, where['cell'])}: the link {url} points at #{frag}, "
                f"which {target.src} does not have"
            )
            return url
        return href(target, frag)

    def cite(node):
        ids = [c["citationId"] for c in node[0]]
        if not any(is_crossref(k) for k in ids):  # a citation, formatted by citeproc (cite_book)
            return Span(["", ["citation"], [["data-cites", " ".join(ids)]]], node[1])
        out = []
        for n, c in enumerate(node[0]):
            key = c["citationId"]
            label = key[0].lower() + key[1:]
            if label not in labels:
                if label.split("-")[0] in CROSSREF_PREFIXES and "-" in label:
                    hint = (
                        ""
                        if label.startswith(("sec-", "fig-"))
                        else " (only @sec- and @fig- are supported)"
                    )
                    problems.append(
                        f"{at(ch, where['cell'])}: unresolved cross-reference @{key}{hint}"
                    )
                return node[1]  # not a cross-reference: the text as written
            t = labels[label]
            text = t.text(number_only=c["citationMode"]["t"] == "SuppressAuthor")
            prefix = c["citationPrefix"] + ([Space()] if c["citationPrefix"] else [])
            url = href(t.chapter, label)
            out += (
                ([Str(","), Space()] if n else [])
                + prefix
                + [Link(["", [], []], [Str(text)], [url, ""]) if url else Str(text)]
                + c["citationSuffix"]
            )
        return out

    def each(blocks):  # what a Div opens into: each block visited, as the walk visits a node
        out = []
        for b in blocks:
            r = visit(b["t"], b.get("c"))
            out += r if isinstance(r, list) else [b if r is None else r]
        return out

    def visit(t, c, *_):
        a = attr(t, c)
        if t == "RawBlock" and c[0] == CELL_MARK:
            where["cell"] = c[1]
            return [raw("typst", f"// minillm-source: {ch.src} cell {c[1]}")] * (fmt == "typst")
        if t == "Cite":
            return cite(c)
        if t == "Link":
            c[2][0] = link_url(c[2][0])
            if not c[2][0] and fmt == "typst":  # a chapter not in this PDF
                return Span(["", [], []], c[1])
        if t == "Div":
            keep = visible(a, fmt)
            if keep is not None:
                return each(c[1]) if keep else []
        if t == "Div" and "check" in a[1]:  # a cell of asserts: a check, collapsed
            if fmt == "typst":  # book.typ: a small box, the listing set by check-lines
                opening = raw("typst", "#check[#let Skylighting = check-lines")
                return [opening] + each(c[1]) + [raw("typst", "]")]
            summary = html.escape(dict(a[2]).get("summary", ""))
            head = (
                '<details class="check"><summary><span class="check-mark">✓ checked</span>: '
                f"<code>{summary}</code></summary>"
            )
            return [raw("html", head)] + c[1] + [raw("html", "</details>")]
        if t == "Header":
            level, num = c[0], dict(c[1][2]).get("number")
            c[1][2] = [kv for kv in c[1][2] if kv[0] != "number"]
        if fmt == "html":
            if t == "Header" and num:
                cls = "chapter-number" if level == 1 else "header-section-number"
                c[2][:0] = [raw("html", f'<span class="{cls}">{num}</span>', False), Space()]
            if t == "Header" and a[0] and level > 1:  # an anchor to link to the section
                anchor = (
                    f' <a class="anchor" href="#{html.escape(a[0])}" aria-label="Link to this '
                    'section" data-pagefind-ignore>#</a>'
                )
                c[2].append(raw("html", anchor, False))
            return None
        # Typst
        if t == "CodeBlock" and "python" in a[1]:
            listings.append(c)
            return raw("typst", f"// minillm-listing {len(listings) - 1}")
        if a and a[0]:
            a[0] = typst_label(ch, a[0], labels)
        if t == "Header":
            numbering = f'(..) => "{num}"' if num else "none"
            supplement = ("[Appendix]" if ch.appendix else "[Chapter]") if level == 1 else "auto"
            heading = f"#set heading(numbering: {numbering}, supplement: {supplement})"
            return [raw("typst", heading), {"t": t, "c": c}]
        if t == "Image" and re.match(r"^[a-z][a-z0-9+.-]*:", c[2][0], re.I):  # Typst reads no URLs
            return Link(["", [], []], c[1] or [Str(c[2][0])], [c[2][0], ""])
        if t == "Div":
            classes, body = a[1], c[1]
            label = f" <{a[0]}>" if a[0] else ""
            if "callout" in classes:
                kind = next(k[8:] for k in classes if k[:8] == "callout-" and k[8:] in CALLOUTS)
                title = body[0]["c"][1][0]["c"]  # Div.callout-title > Plain
                opening = [raw("typst", f"#callout({typst_str(kind)}, [", False)] + title
                opening += [raw("typst", "])[", False)]
                return [Plain(opening)] + each(body[1]["c"][1]) + [raw("typst", "]" + label)]
            for cls, call in (("csl-entry", "#bibentry["), ("lead", "#lead[")):
                if cls in classes:
                    return [raw("typst", call)] + each(body) + [raw("typst", "]" + label)]
            if "references" in classes or "cell-output" in classes:
                return each(body)  # code blocks styled by their "language": stdout, stderr, error

    return walk(json.loads(json.dumps(ch.blocks)), visit)  # a copy: `visit` changes it in place


def visible(a, fmt):
    """For a Div: False to drop it in this format, True to keep just its content, None to keep it as
    it is (`only-html`/`only-typst` are the renderer's, `content-visible when-format` Quarto's)."""
    classes, when = a[1], dict(a[2]).get("when-format")
    if "only-html" in classes or "only-typst" in classes:
        return f"only-{fmt}" in classes
    if "content-visible" in classes:
        return when is None or {"pdf": "typst", "latex": "typst"}.get(when, when) == fmt
    return None


def typst_str(s):
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'


# --------------------------------------------------------------------------------------------------
# Step 5: HTML pages and the PDF


# Inline code without a space, short enough for a phone's line: never broken (`austen-` | `tiny`).
SHORT_CODE = re.compile(r"<code>([^<\s]{1,24})</code>")


# A formula in a box that scrolls, on a phone, when it is too wide.
MATHML = re.compile(r'<math display="(block|inline)".*?</math>', re.S)


def html_page(ch, body, book: Book, template: string.Template):
    e = html.escape
    body = SHORT_CODE.sub(r'<code class="nowrap">\1</code>', body)
    kind = {"block": "display", "inline": "inline"}
    body = MATHML.sub(lambda m: f'<span class="math-{kind[m[1]]}">{m[0]}</span>', body)
    items, part = [], None
    for c in book.chapters:
        if c.part != part and c.part is not None:
            number, title = book.parts[c.part]
            items.append(
                f'<li class="part">{e(("Part " + number + " · ") if number else "")}{e(title)}</li>'
            )
        elif c.part is None and part is not None:  # after the parts: the references
            items.append('<li class="part-end" aria-hidden="true"></li>')
        part = c.part
        num = f'<span class="num">{e(c.number)}</span> ' if c.number else ""
        sub = ""
        if c is ch and c.sections:
            sub = (
                '\n    <ul class="sections">'
                + "".join(
                    f'\n      <li><a href="#{e(i)}">'
                    + (f'<span class="num">{e(n)}</span> ' if n else "")
                    + f"{e(s)}</a></li>"
                    for i, n, s in c.sections
                )
                + "\n    </ul>"
            )
        active = ' class="active"' if c is ch else ""
        items.append(f'<li{active}><a href="{c.page}">{num}{e(c.title)}</a>{sub}</li>')
    sidebar = '  <ul class="chapters">\n    ' + "\n    ".join(items) + "\n  </ul>"

    i = book.chapters.index(ch)
    nav = []
    if i > 0:
        p = book.chapters[i - 1]
        nav.append(
            f'<a class="prev" href="{p.page}"><small>Previous</small>&larr; {e(p.label())}</a>'
        )
    if i + 1 < len(book.chapters):
        n = book.chapters[i + 1]
        nav.append(f'<a class="next" href="{n.page}"><small>Next</small>{e(n.label())} &rarr;</a>')
    title_block = ""
    if i == 0:
        title_block = (
            '<header class="title-block">\n'
            f'<p class="book-title"><strong>{e(book.title)}</strong></p>\n'
            + (f'<p class="subtitle">{e(book.subtitle)}</p>\n' if book.subtitle else "")
            + (f'<p class="author">{e(", ".join(book.authors))}</p>\n' if book.authors else "")
            + (f'<p class="date">{e(book.date)}</p>\n' if book.date else "")
            + "</header>"
        )
    chapter_name = (("Appendix " if ch.appendix else "") + ch.label()) if ch.number else ch.title
    page_toc = ""
    if ch.sections:  # the in-page contents, on the right of wide screens
        page_toc = (
            '<nav class="page-toc" aria-label="On this page">\n<p class="page-toc-title">On this '
            'page</p>\n<ul>\n'
            + "".join(
                f'<li><a href="#{e(i)}">'
                + (f'<span class="num">{e(n)}</span> ' if n else "")
                + f"{e(t)}</a></li>\n"
                for i, n, t in ch.sections
            )
            + "</ul>\n</nav>"
        )
    return template.substitute(
        page_toc=page_toc,
        lang=e(book.lang),
        description=e(ch.description or book.subtitle or ""),
        book_title=e(book.title),
        page_title=e(f"{chapter_name} – {book.title}"),
        sidebar=sidebar,
        pdf=e(book.output_file) + ".pdf",
        title_block=title_block,
        body=body,
        prev_next="\n".join(nav),
    )


RAW_BLOCK = re.compile(r"^(`{3,}).*?^\1", re.MULTILINE | re.DOTALL)
OLD_SYMBOL = re.compile(r"\b((?:dot|plus|minus|times|div|ast|slash|eq|backslash)\.)circle\b")


# Inline code (left alone) or a formula; in one, `upright("pass@") k` (pandoc's \text{pass@}k).
MATH_OR_CODE = re.compile(r"(`+).*?\1|(?<!\\)\$(?:[^$\\]|\\.)*\$", re.DOTALL)
TEXT_SPACE = re.compile(r'(upright\("(?:[^"\\]|\\.)*"\)) (?=\S)')


def typst_math(text: str) -> str:
    """pandoc writes TeX's `\\text{pass@}k` as `upright("pass@") k`, and in Typst maths a space
    next to text is a space ("pass@ k"); in TeX maths spaces are never typeset: remove it."""

    def fix(m):
        return m.group(0) if m.group(1) else TEXT_SPACE.sub(r"\1", m.group(0))

    return MATH_OR_CODE.sub(fix, text)


def typst_symbols(text: str) -> str:
    """pandoc 3.9 writes math symbols with Typst's old `.circle` modifier (`\\odot` ->
    `dot.circle`), which Typst 0.14+ renamed `.o`; rename them outside raw (code) blocks, and
    remove the space after text in formulas (`typst_math`)."""
    parts, last = [], 0
    for m in RAW_BLOCK.finditer(text):
        parts += [typst_math(OLD_SYMBOL.sub(r"\1o", text[last : m.start()])), m.group(0)]
        last = m.end()
    return "".join(parts + [typst_math(OLD_SYMBOL.sub(r"\1o", text[last:]))])


def sticky_intros(blocks):
    """In the PDF, a paragraph of the text that ends with a colon ("... the pieces are visible:")
    stays on the page of what it introduces (a Typst sticky block), never alone at the foot of the
    page before it."""
    out = []
    for node in blocks:
        last = node["c"][-1] if node["t"] == "Para" and node["c"] else {}
        if last.get("t") == "Str" and last["c"].endswith(":"):
            out += [raw("typst", "#block(sticky: true)["), node, raw("typst", "]")]
        else:
            out.append(node)
    return out


def typst_document(book: Book, bodies: list, chapters=None) -> str:
    "The whole book (or, for an author's preview, some chapters without title page and contents)."
    chapters = chapters or book.chapters
    whole = len(chapters) == len(book.chapters)
    authors = "(" + "".join(typst_str(a) + ", " for a in book.authors) + ")"
    head = [
        f'#import "{TYPST_TEMPLATE}": *',
        f"#show: book.with(title: {typst_str(book.title)}, "
        f"subtitle: {typst_str(book.subtitle) if book.subtitle else 'none'}, authors: {authors}, "
        f"date: {typst_str(book.date) if book.date else 'none'}, paper: {typst_str(book.paper)}, "
        f"toc: {'true' if book.toc and whole else 'false'}, toc-depth: {book.toc_depth}, "
        f"lang: {typst_str(book.lang)}, cover: {'true' if whole else 'false'})",
        "",
    ]
    out, part = head, None
    for ch, body in zip(chapters, bodies):
        if ch.part != part and ch.part is not None and whole:
            number, title = book.parts[ch.part]
            out.append(f"#part({typst_str(number) if number else 'none'}, {typst_str(title)})\n")
        part = ch.part
        out.append(f"// minillm-source: {ch.src}\n{body}")
    return "\n".join(out)


# Fonts. Typst has its own (Libertinus Serif, New Computer Modern, DejaVu Sans Mono) and gets
# matplotlib's (DejaVu Sans, which the SVG figures name); system fonts are ignored, so the PDF is
# the same on every machine. A character none of them has (Chinese, Japanese, Korean) would be drawn
# as an empty box: for those the renderer adds a small Debian font package, installed
# (`apt-get install fonts-wqy-microhei`) or fetched without root into the cache (`apt-get download`,
# as the corpus is); what is still missing is shown as "[U+8A9E]", with a warning.
FONT_PACKAGES = {  # package: (its fonts' directory when installed, the code points it is for)
    "fonts-wqy-microhei": (
        "/usr/share/fonts/truetype/wqy",
        ((0x2E80, 0x9FFF), (0xAC00, 0xD7AF), (0xF900, 0xFAFF), (0xFE30, 0xFE4F), (0xFF00, 0xFFEF)),
    ),
}
FONT_SUFFIXES = (".ttf", ".ttc", ".otf", ".otc")


def cache_dir() -> Path:
    "The renderer's cache: `$MINILLM_CACHE/book`, beside minillm's data (~/.cache/minillm)."
    base = os.environ.get("MINILLM_CACHE")
    if not base:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        base = Path(base) / "minillm"
    return Path(base) / "book"


def font_cache() -> Path:
    "Where fetched font packages are unpacked: `$MINILLM_CACHE/fonts`, as minillm caches data."
    return cache_dir().parent / "fonts"


def font_paths():
    """Fonts besides Typst's own (Libertinus Serif, New Computer Modern, DejaVu Sans Mono): DejaVu
    Sans, which the SVG figures name, from matplotlib (in the venv), so the PDF does not depend on
    the fonts installed on the machine; and the packages of FONT_PACKAGES, installed or fetched."""
    paths = []
    try:
        import matplotlib

        ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
        if (ttf / "DejaVuSans.ttf").is_file():
            paths.append(str(ttf))
    except ImportError:
        pass
    for package, (system, _) in FONT_PACKAGES.items():
        for d in (font_cache() / package, Path(system)):
            if d.is_dir():
                paths.append(str(d))
                break
    return paths


@functools.lru_cache(maxsize=8)
def font_coverage(paths: tuple) -> frozenset:
    """The code points the fonts in `paths` have. Last Resort (matplotlib ships it) is left out: it
    "has" every code point, as a box with the name of its block."""
    typst = need("typst", "typst")
    from fontTools.ttLib import TTFont

    cover, seen = set(), set()
    fonts = typst.Fonts(include_system_fonts=False, include_embedded_fonts=False, font_paths=paths)
    for f in fonts.fonts():
        if (f.path, f.index) in seen or "last resort" in f.family.lower():
            continue
        seen.add((f.path, f.index))
        try:
            cover.update(TTFont(f.path, fontNumber=f.index, lazy=True).getBestCmap() or ())
        except Exception:  # a font fontTools cannot read does not count
            continue
    return frozenset(cover)


def fetch_font_package(package) -> bool:
    """`apt-get download` the Debian font package and unpack its fonts into font_cache()/package
    (no root needed). False where that is not possible (no apt-get, no network, unknown package)."""
    dst = font_cache() / package
    if dst.is_dir():
        return True
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        return False
    with tempfile.TemporaryDirectory() as d:
        try:
            r = subprocess.run(
                ["apt-get", "download", package], cwd=d, capture_output=True, timeout=120
            )
            debs = list(Path(d).glob("*.deb"))
            if r.returncode or not debs:
                return False
            subprocess.run(["dpkg-deb", "-x", str(debs[0]), f"{d}/x"], check=True, timeout=300)
        except (OSError, subprocess.SubprocessError):
            return False
        files = [
            f for f in Path(d, "x").rglob("*") if f.is_file() and f.suffix.lower() in FONT_SUFFIXES
        ]
        if not files:
            return False
        part = dst.with_name(f".{package}-{os.getpid()}")
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        for f in files + list(Path(d, "x").glob(f"usr/share/doc/{package}/copyright")):
            shutil.copyfile(f, part / f.name)
        try:
            part.rename(dst)  # whole or not at all; another build may have won the race
        except OSError:
            shutil.rmtree(part, ignore_errors=True)
    return dst.is_dir()


# Code points that need no glyph: controls, spaces, joiners, variation selectors.
NO_GLYPH = re.compile(
    r"[\x00-\x20\x7f-\xa0\u00ad\u200b-\u200f\u2028-\u202f\u2060-\u206f\ufe00-\ufe0f]"
)


def missing_glyphs(text: str, cover) -> list:
    "The characters of `text` (in order of first use) that no font covers."
    chars = dict.fromkeys(c for c in text if ord(c) > 0x7E and not NO_GLYPH.match(c))
    return [c for c in chars if ord(c) not in cover]


def glyph_fallback(c: str) -> str:
    "What the PDF shows for a character no font has: its code point, e.g. [U+8A9E]."
    return f"[U+{ord(c):04X}]"


def with_fonts(bodies: list, chapters: list, fetch=fetch_font_package):
    """The Typst bodies of `chapters` with every character that no font has replaced by its code
    point (a warning names it and its chapter). First, where a package of FONT_PACKAGES has such
    characters, it is fetched (`fetch`)."""
    cover = font_coverage(tuple(font_paths()))
    missing = {ch.src: missing_glyphs(body, cover) for ch, body in zip(chapters, bodies)}
    wanted = {c for cs in missing.values() for c in cs}
    fetched = False
    for package, (_, ranges) in FONT_PACKAGES.items():
        if any(lo <= ord(c) <= hi for c in wanted for lo, hi in ranges):
            fetched |= bool(fetch(package))
    if fetched:
        cover = font_coverage(tuple(font_paths()))
    out = []
    for ch, body in zip(chapters, bodies):
        gone = [c for c in missing[ch.src] if ord(c) not in cover]
        if gone:
            packages = [
                p
                for p, (_, ranges) in FONT_PACKAGES.items()
                if any(lo <= ord(c) <= hi for c in gone for lo, hi in ranges)
            ]
            hint = (
                f"; `apt-get install {' '.join(packages)}` gives the PDF a font with them"
                if packages
                else ""
            )
            warn(
                f"{ch.src}: no font of the PDF has "
                + ", ".join(f"{c} (U+{ord(c):04X})" for c in gone)
                + f"; the PDF shows {glyph_fallback(gone[0])} instead{hint}"
            )
            body = "".join(glyph_fallback(c) if c in gone else c for c in body)
        out.append(body)
    return out


def compile_pdf(tmp: Path, typ_name: str, pdf: Path, source: str):
    typst = need("typst", "typst")
    try:
        typst.compile(
            str(tmp / typ_name),
            output=str(pdf),
            root=str(tmp),
            ignore_system_fonts=True,
            font_paths=font_paths(),
        )
    except typst.TypstError as e:
        m = re.search(re.escape(typ_name) + r":(\d+):", getattr(e, "diagnostic", "") or "")
        where = "the PDF"
        if m:  # the chapter and cell the failing line came from
            marks = [
                l for l in source.splitlines()[: int(m[1])] if l.startswith("// minillm-source: ")
            ]
            if marks:
                src = marks[-1][len("// minillm-source: ") :]
                where = src.replace(" cell ", " (cell ") + (")" if " cell " in src else "")
        detail = getattr(e, "diagnostic", "") or str(e)
        raise BookError(f"{where}: Typst failed: {getattr(e, 'message', e)}\n{detail}") from None


# --------------------------------------------------------------------------------------------------
# The whole book


@dataclass
class Result:
    chapters: int
    pages: int
    pdf: Path
    html: list
    typst_source: str
    seconds: float


ASSETS = ("style.css", "book.js", "favicon.svg")  # tools/book/ files the pages load


def select_chapter(book: Book, chapter):
    "The chapter `--chapter 04` names: the one whose file name starts with it (or is it)."
    if chapter is None:
        return None
    matches = [c for c in book.chapters if c.stem == chapter or c.src == chapter]
    matches = matches or [c for c in book.chapters if c.stem.startswith(str(chapter))]
    if len(matches) != 1:
        names = ", ".join(c.stem for c in matches) or "none"
        raise BookError(f"--chapter {chapter}: matches {names}; name one chapter of _quarto.yml")
    return matches[0]


def render(project=".", out=None, chapter=None) -> Result:
    """Render the book of `project` into `out` (default: its output-dir); raises BookError naming
    what is wrong. With `chapter` ("04"), only that chapter: its HTML page and a PDF of it alone
    (<name>.pdf), written into `out` beside the rest of the book, which is left as it is."""
    start = time.time()
    for module, package in (
        ("yaml", "pyyaml"),
        ("pypandoc", "pypandoc-binary"),
        ("typst", "typst"),
    ):
        need(module, package)
    project = Path(project).resolve()
    book = read_config(project)
    only = select_chapter(book, chapter)
    out = Path(out).resolve() if out else project / book.output_dir
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the book is for reading
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            keys = pool.submit(bibliography_keys, book)
            pool.submit(font_coverage, tuple(font_paths()))  # for `with_fonts`, meanwhile
            api_version = list(
                pool.map(lambda ch: parse_chapter(ch, tmp, book.lib_name), book.chapters)
            )[0]

            problems, cites = [], []
            for ch in book.chapters:
                cites += collect_citations(ch, keys.result(), book, problems)
            if problems:
                raise BookError("\n".join(dict.fromkeys(problems)))
            references = None
            if cites:
                references = add_references(book, cite_book(book, cites, api_version))

            labels, n_chapter, n_appendix = {}, 0, 0
            for ch in book.chapters:
                number = None
                if is_numbered(ch) and ch.appendix:
                    n_appendix += 1
                    number = chr(ord("A") + n_appendix - 1)
                elif is_numbered(ch):
                    n_chapter += 1
                    number = str(n_chapter)
                number_chapter(ch, number if book.number_sections else None, book, labels)
            if references:
                entries = []
                walk(references.blocks, lambda t, c, *_: entries.append(c) if t == "Div" else None)
                for (ident, classes, _), body in entries:
                    if "csl-entry" in classes:
                        target = Target(references, "reference", None, stringify(body))
                        register(labels, ident, target, references, None)

            chapters = [only] if only else book.chapters
            problems += [p for ch in chapters for p in ch.problems]
            listings = []  # the PDF's Python listings, highlighted by pandoc (`typst_listings`)
            asts = {
                fmt: [
                    resolve(ch, fmt, book, labels, problems, chapters, listings) for ch in chapters
                ]
                for fmt in ("html", "typst")
            }
            if problems:
                raise BookError("\n".join(dict.fromkeys(problems)))

            # pandoc writes every chapter in one call per format (its highlighter's set-up costs
            # half a second a call), the PDF's chapters and the HTML pages at once, on two cores.
            typst_out = pool.submit(write_all, asts["typst"], "typst", api_version, listings)
            html_out = pool.submit(write_all, asts["html"], "html", api_version)
            bodies = with_fonts(typst_out.result(), chapters)
            source = typst_document(book, bodies, chapters)
            name = only.stem if only else book.output_file
            typ_name = f"{name}.typ"
            shutil.copyfile(TEMPLATES / "book.typ", tmp / TYPST_TEMPLATE)
            (tmp / typ_name).write_text(source, encoding="utf-8")
            pdf = tmp / f"{name}.pdf"
            # Typst typesets (without the GIL) while the HTML pages are written and indexed.
            typeset = pool.submit(compile_pdf, tmp, typ_name, pdf, source)

            template = string.Template((TEMPLATES / "page.html").read_text(encoding="utf-8"))
            for ch, body in zip(chapters, html_out.result()):
                page = html_page(ch, body, book, template)
                problems += html_problems(ch, page)
                (tmp / ch.page).write_text(page, encoding="utf-8")
            if problems:
                raise BookError("\n".join(dict.fromkeys(problems)))
            for asset in ASSETS:
                shutil.copyfile(TEMPLATES / asset, tmp / asset)
            if not only:
                search_index(tmp)
            typeset.result()
            (tmp / typ_name).unlink()
            (tmp / TYPST_TEMPLATE).unlink()
        prune_cache()
        pages = len(re.findall(rb"/Type\s*/Page(?![a-zA-Z])", pdf.read_bytes()))
        if only:
            publish_chapter(tmp, out, only)
        else:
            publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Result(
        chapters=len(chapters),
        pages=pages,
        pdf=out / pdf.name,
        html=[out / ch.page for ch in chapters],
        typst_source=source,
        seconds=time.time() - start,
    )


def search_index(site: Path):
    "Pagefind's full-text index of the pages (and its search UI files), into site/pagefind/."
    try:
        import pagefind  # noqa: F401  (the binary comes with pagefind[bin])
    except ImportError:
        raise BookError(
            "the Python package `pagefind[bin]` is missing (the HTML book's search): "
            "`pip install 'pagefind[bin]'` in the venv, or run `make book`"
        ) from None
    cmd = [sys.executable, "-m", "pagefind", "--site", str(site), "--output-subdir", "pagefind"]
    r = subprocess.run(cmd + ["--keep-index-url", "--silent"], capture_output=True, text=True)
    if r.returncode != 0 or not (site / "pagefind" / "pagefind-ui.js").is_file():
        raise BookError(f"pagefind (the search index) failed: {(r.stderr or r.stdout).strip()}")


TMP_PREFIX = ".book-tmp-"  # .book-tmp-<pid>-xxxx: a build's working directory next to the book


def clean_stale(parent: Path):
    """Remove the working directories of builds that were killed: those whose process is gone
    (and, of an older renderer without the pid in the name, those over an hour old)."""
    for d in parent.glob(TMP_PREFIX + "*"):
        m = re.match(re.escape(TMP_PREFIX) + r"(?:old-)?(\d+)-", d.name)
        if m:
            try:
                os.kill(int(m[1]), 0)
                continue  # a build still running
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        elif time.time() - d.stat().st_mtime < 3600:
            continue
        shutil.rmtree(d, ignore_errors=True)


def publish_chapter(tmp: Path, out: Path, ch):
    "One chapter's page, media, PDF and the assets, into the book directory (each file replaced)."
    out.mkdir(parents=True, exist_ok=True)
    files = [ch.page, f"{ch.stem}.pdf", *ASSETS]
    media = tmp / "media" / ch.stem
    files += [str(f.relative_to(tmp)) for f in media.rglob("*") if f.is_file()]
    if (out / "media" / ch.stem).exists():
        shutil.rmtree(out / "media" / ch.stem)
    for name in files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / name, out / name)


def publish(tmp: Path, out: Path):
    "Put the new book in place of the old one: two renames, so a reader never sees half a book."
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}old-{os.getpid()}-", dir=out.parent))
        old.rmdir()
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        if old:
            old.rename(out)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Render the book (_quarto.yml) to PDF and HTML with pandoc and Typst."
    )
    ap.add_argument("--project", default=".", help="directory of _quarto.yml (default: .)")
    ap.add_argument(
        "--out", default=None, help="output directory (default: project.output-dir of _quarto.yml)"
    )
    ap.add_argument(
        "--chapter",
        default=None,
        help="render only this chapter (`04` or `04_attention`): its HTML page and <name>.pdf",
    )
    ap.add_argument(
        "--check-notebooks",
        action="store_true",
        help="only check that every notebook is valid JSON (run before nbdev-export)",
    )
    args = ap.parse_args(argv)
    try:
        if args.check_notebooks:
            return check_notebooks(Path(args.project)) or 0
        r = render(args.project, args.out, args.chapter)
    except BookError as e:
        print(f"render_book: error: {e}", file=sys.stderr)
        return 1
    rel = lambda p: os.path.relpath(p)
    print(
        f"render_book: {r.chapters} chapter{'s' if r.chapters > 1 else ''}, {r.pages} PDF pages, "
        f"built in {r.seconds:.1f} s\n  {rel(r.pdf)}\n  {rel(r.html[0])}"
        + (f" (+{len(r.html) - 1} chapter pages)" if len(r.html) > 1 else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
