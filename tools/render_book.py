#!/usr/bin/env python3
"""Render the book without Quarto: _quarto.yml + the chapter notebooks -> book/minillm.pdf and
book/*.html, with pandoc (pypandoc-binary), Typst (`typst`) and Pagefind (`pagefind[bin]`) from the
venv. Nothing is executed: the book shows the outputs stored in the notebooks.

    .venv/bin/python tools/render_book.py [--project DIR] [--out DIR] [--chapter 04]
    .venv/bin/python tools/render_book.py --check-notebooks   # `make book`, before nbdev-export

1. `read_config`: title, subtitle, author, date, output-file, output-dir, chapters with their parts,
   appendices, bibliography, csl, number-sections, lang, format.typst.papersize/toc/toc-depth.
2. `notebook_markdown`: each notebook, read by nbdev's reader (fastcore.nbio, which also reads the
   `#|` directives), becomes pandoc markdown: `#| hide`/`include: false`/`echo: false`/`output:
   false` honoured, `# NBVAL_*` markers stripped, outputs as fenced text, images (into media/) and
   tables ("—" for missing values); nbdev's module docstring (a markdown cell starting `#| export`)
   is a note "The module `minillm.x`"; a cell of nothing but asserts is a check (collapsed
   "✓ checked" in HTML, a small box in the PDF). pandoc parses each chapter (in threads; cached by
   content in ~/.cache/minillm/book/ast).
3. `cite_book`: every citation in one citeproc run; the bibliography is an unnumbered "References"
   chapter at the end (or fills a `references` chapter). An unknown key is an error naming the cell.
4. `number_chapter` (pandocfilters walks): callouts, the `> lead` under the title, numbers of
   chapters (1, 2, ...; appendices A, B, ...; `index` unnumbered), sections and figures (code cells
   with `#| label: fig-x` + `fig-cap`, and `![Caption.](figures/x.svg){#fig-x}`); every #sec-/#fig-
   label recorded. The prose is checked (`text_problems`): markup leaked as text, TeX outside
   maths, a prime for an apostrophe; a control character in a formula is a warning.
5. `resolve`: per format, `@sec-x`, `@fig-x` and links to other chapters' notebooks become links;
   an unresolved one is an error (the book never ships a "??").
6. `write_all`: pandoc writes all HTML pages in one call and all the PDF's chapters in another, at
   once; Python listings are highlighted by pandoc (book.typ's `Skylighting` sets them). Pages are
   wrapped by tools/book/page.html; Pagefind indexes them while Typst typesets the PDF with
   tools/book/book.typ. Fonts: Typst's own and matplotlib's; for CJK a Debian font package
   (`with_fonts`: installed, or fetched into ~/.cache/minillm/fonts); a character still without a
   font shows as [U+8A9E], with a warning.
7. Everything is written to .book-tmp-<pid>-* next to the output, which replaces the old book only
   when all succeeded; directories left by a killed build are removed by the next one.

`--chapter 04` renders one chapter for its author: its HTML page and a PDF of it alone, beside the
rest of the book (every chapter is still read, for the cross-references).

Errors name a cell as "nbs/04_attention.ipynb (cell 7, nbval Cell 3)": its index among all cells
from 0 (Jupyter's order) and, for a code cell, nbval's name (code cells only, from 0). Also
supported: callouts, `::: {.content-visible when-format="html"}`, `.qmd`/`.md` chapters (plain
pandoc markdown). Not supported (no chapter uses them): executing code, shortcodes, references other
than @sec-/@fig-, `crossref:` options, sub-figures, other cell options, raw cells, attachments.
"""

import ast
import base64
import concurrent.futures
import contextlib
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
import tomllib
from fastcore.script import anno_parser
from pandocfilters import Div, Link, Plain, RawBlock, RawInline, Space, Span, Str, stringify

TEMPLATES = Path(__file__).resolve().parent / "book"
CALLOUTS = ("note", "tip", "warning", "important", "caution")
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
            f"the Python package `{what}` is missing: `pip install pypandoc-binary typst pyyaml` "
            "in the venv, or run `make book`, which sets up .venv"
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
    project: Path
    bibliography: list  # .bib files, absolute paths
    csl: Path | None
    lib_name: str  # nbdev's lib_name (pyproject.toml): the module note says `minillm.data`


def read_config(project: Path) -> Book:
    yaml = need("yaml", "pyyaml")
    cfg_file = project / "_quarto.yml"
    try:
        cfg = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise BookError(f"{cfg_file}: cannot read it (--project is the book's directory): {e}")
    book, typ = cfg.get("book") or {}, (cfg.get("format") or {}).get("typst")
    typ = typ if isinstance(typ, dict) else {}  # `typst: default`

    def exists(name, what):
        if not (project / str(name)).is_file():
            raise BookError(f"{cfg_file}: the {what} {name} does not exist")
        return (project / str(name)).resolve()

    chapters, parts = [], []
    entries = [(e, None) for e in book.get("chapters") or []]
    entries += [(e, "appendix") for e in book.get("appendices") or []]
    for entry, kind in entries:
        if kind and (not parts or parts[-1][0] is not None):
            parts.append((None, "Appendices"))
        srcs = [entry]
        if isinstance(entry, dict):  # a part: its number in Roman numerals
            parts.append(("I II III IV V VI VII VIII IX X".split()[len(parts)], str(entry["part"])))
            srcs = entry.get("chapters") or []
        part = len(parts) - 1 if kind or isinstance(entry, dict) else None
        for src in srcs:
            chapters.append(Chapter(src, exists(src, "chapter"), part, kind == "appendix"))
    if not chapters:
        raise BookError(f"{cfg_file}: book.chapters lists no chapter")
    for i, ch in enumerate(chapters):
        ch.page = "index.html" if i == 0 else f"{ch.stem}.html"
    authors = book.get("author") or []
    authors = authors if isinstance(authors, list) else [authors]
    bibliography = cfg.get("bibliography") or []
    bibliography = [bibliography] if isinstance(bibliography, str) else bibliography
    return Book(
        title=str(book.get("title") or "Untitled"),
        subtitle=str(book["subtitle"]) if book.get("subtitle") else None,
        authors=[a.get("name", "") if isinstance(a, dict) else str(a) for a in authors],
        date=str(book["date"]) if book.get("date") else None,
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
        bibliography=[exists(b, "bibliography") for b in bibliography],
        csl=exists(cfg["csl"], "citation style (csl)") if cfg.get("csl") else None,
        lib_name=str(nbdev_config(project).get("lib_name") or ""),
    )


def nbdev_config(project: Path):
    "[tool.nbdev] of pyproject.toml (nbs_path; lib_name, by default the [project] name), or {}."
    try:
        cfg = tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {"lib_name": cfg.get("project", {}).get("name"), **cfg.get("tool", {}).get("nbdev", {})}


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
        opts = {}
        for k, v in cell.directives.items():
            try:
                opts[k] = yaml.safe_load(v) if v else True
            except yaml.YAMLError:
                opts[k] = v
    return opts, "".join(body).strip("\n")


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


AST_LOCK = threading.Lock()


def check_summary(code):
    """For a cell whose code is nothing but `assert` statements (and comments): a one-line summary
    of what it checks (its first condition); for any other cell None."""
    try:
        with AST_LOCK:  # CPython 3.11's ast.parse is not thread-safe (recursion depth mismatch)
            tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return None
    if not tree.body or not all(isinstance(s, ast.Assert) for s in tree.body):
        return None
    first = " ".join((ast.get_source_segment(code, tree.body[0].test) or "").split())
    first = first if len(first) <= 70 else first[:69] + "…"
    return first + (f" (and {len(tree.body) - 1} more)" if len(tree.body) > 1 else "")


def notebook_markdown(ch, media: Path, lib=""):
    """The chapter as pandoc markdown, and the HTML outputs that the PDF shows as tables
    (placeholders in the text)."""
    from fastcore.nbio import dict2nb  # nbdev's notebook reader

    nb = dict2nb(read_notebook(ch.path, ch.src))
    chunks, tables = [], []
    module = next((c.directive("default_exp") for c in nb.cells if c.directive("default_exp")), "")
    module = f"{lib}.{module}" if lib and module else module
    for i, cell in enumerate(nb.cells):
        if cell.cell_type not in ("markdown", "code"):
            continue
        opts, md = cell_options(cell)
        if opts.get("include") is False or opts.get("hide"):
            continue
        where = f"{ch.src} (cell {cell_label(nb.cells, i)})"
        if cell.cell_type == "code":
            md = code_cell_markdown(cell, i, where, opts, md, media, tables)
        else:  # (before pandoc, which turns tabs into spaces)
            for tex in filter(CONTROL.search, MATH_SPAN.findall(md)):
                warn(f"{where}: {math_control(tex)}")
            if opts.get("export") and md.strip():  # nbdev's module docstring: a note
                title = f"The module `{module}`" if module else "The module"
                md = div("callout-note module-doc", f"## {title} {{.unnumbered}}\n\n{md}")
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


def check_notebook_json(project: Path):
    """Every notebook of nbdev's nbs_path is valid JSON: run before nbdev-export, whose traceback
    for a broken notebook never names the file."""
    for path in sorted((project / nbdev_config(project).get("nbs_path", "nbs")).rglob("*.ipynb")):
        if ".ipynb_checkpoints" not in path.parts:
            read_notebook(path, os.path.relpath(path, project))


def code_cell_markdown(cell, i, where, opts, code, media, tables):
    out = []
    if code.strip() and opts.get("echo", True) is not False:
        out.append(fenced(code, "{.python .cell-code}"))
        summary = check_summary(code)
        if summary is not None:  # a check: shown compactly, as a check (see `resolve`)
            quoted = summary.replace("\\", "\\\\").replace('"', '\\"')
            out[-1] = f'::::: {{.check summary="{quoted}"}}\n{out[-1]}\n:::::'
    if opts.get("output", True) is False:
        return "\n\n".join(out)
    label = str(opts.get("label") or "")
    figure = {"id": label, "cap": str(opts.get("fig-cap") or "")} if label[:4] == "fig-" else None
    outputs = []
    for o in cell.get("outputs") or []:  # a stream printed in several pieces is one output
        last = outputs[-1] if outputs else {}
        if o.get("output_type") == "stream" == last.get("output_type") and (
            o.get("name") == last.get("name")
        ):
            outputs[-1] = {**last, "text": cell_text(last["text"]) + cell_text(o.get("text"))}
        else:
            outputs.append(o)
    for k, o in enumerate(outputs):
        kind = o.get("output_type")
        if kind == "stream" and plain_text(o.get("text")).strip():
            name = "stderr" if o.get("name") == "stderr" else "stdout"
            text = plain_text(o.get("text")).rstrip("\n")
            out.append(div(f"cell-output cell-output-{name}", fenced(text, "{." + name + "}")))
        elif kind == "error":
            marked = re.search(r"^\s*#\s*NBVAL_RAISES_EXCEPTION\s*$", cell.source, re.M)
            if not marked and "raises-exception" not in cell.get("metadata", {}).get("tags", []):
                raise BookError(
                    f"{where}: the stored output is an error ({o.get('ename')}: "
                    f"{o.get('evalue')}); fix the cell and re-run the notebook, or mark it "
                    f"'# NBVAL_RAISES_EXCEPTION' if the error is the point"
                )
            text = "\n".join(o.get("traceback") or []) or f"{o.get('ename')}: {o.get('evalue')}"
            text = plain_text(text).rstrip("\n")
            out.append(div("cell-output cell-output-error", fenced(text, "{.error}")))
        elif kind in ("execute_result", "display_data"):
            data, shown = o.get("data") or {}, {}
            table = "<table" in cell_text(data.get("text/html"))  # the PDF shows no other HTML
            for fmt, order in SHOW.items():  # the cell's figure: its images first
                order = sorted(order, key=lambda m: m not in IMAGES) if figure else order
                ok = [
                    m for m in order if m in data and (m != "text/html" or fmt == "html" or table)
                ]
                shown[fmt] = ok[0] if ok else None
            show = lambda m: output_markdown(data, m, f"cell{i}-{k}", media, tables, figure)  # noqa
            if shown["html"] == shown["typst"]:
                out.append(show(shown["html"]))
            else:
                out += [div(f"only-{f}", show(m)) for f, m in shown.items() if m]
    if figure and not figure.get("used"):
        warn(f"{where}: #| label: {label}, but the cell has no image output (run and save it)")
    return "\n\n".join(md for md in out if md)


def output_markdown(data, mime, name, media, tables, figure):
    value = cell_text(data.get(mime))
    if not value.strip():
        return ""
    if mime in IMAGES:  # saved as media/<chapter>/cell7-0.png
        media.mkdir(parents=True, exist_ok=True)
        file = media / f"{name}.{IMAGES[mime]}"
        if mime == "image/svg+xml":
            file.write_text(value, encoding="utf-8")
        else:
            file.write_bytes(base64.b64decode(value))
        path = f"media/{media.name}/{file.name}"
        if figure and not figure.get("used"):  # the cell's figure: its first image (no sub-figures)
            figure["used"] = True
            return f"![{' '.join(figure['cap'].split())}]({path}){{#{figure['id']}}}"
        return f"![]({path})"
    if mime == "text/html" and "<table" in value:
        # a DataFrame: in both formats the table pandoc reads out of the HTML (see parse_chapter)
        tables.append(value)
        n = len(tables) - 1
        return f'::::: {{.cell-output .cell-output-display .html-table index="{n}"}}\n:::::'
    if mime == "text/html":  # other HTML: as it is, in the HTML only
        return div("cell-output cell-output-display", fenced(value.strip("\n"), "{=html}"))
    if mime == "text/markdown":  # its tables are tidied like a DataFrame's (see `tidy_table`)
        return div("cell-output cell-output-display cell-output-markdown", value)
    text = plain_text(value).rstrip("\n")
    return div("cell-output cell-output-display", fenced(text, "{.stdout}"))


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
    r = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True)
    if r.returncode != 0:
        error = r.stderr.decode("utf-8", "replace").strip()
        raise BookError(f"{where}: pandoc ({src} -> {dst}) failed: {error}")
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
        with contextlib.suppress(OSError):  # another build removed it
            if time.time() - f.stat().st_mtime > 86400:
                f.unlink()


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


def attr(t, c):
    "The [id, classes, key-values] of a node that has one, else None."
    has = t in ("Div", "Span", "CodeBlock", "Code", "Figure", "Table", "Image", "Link")
    return c[1] if t == "Header" else c[0] if has else None


def parse_chapter(ch, tmp: Path, lib=""):
    "Step 2: the chapter's pandoc AST, with the HTML tables of its outputs parsed."
    if ch.path.suffix == ".ipynb":
        md, tables = notebook_markdown(ch, tmp / "media" / ch.stem, lib)
    else:
        md, tables = ch.path.read_text(encoding="utf-8"), []  # .qmd/.md: pandoc markdown
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
    "The citation keys of the book's .bib files (read by pandoc, as citeproc reads them)."
    keys = set()
    for path in book.bibliography:
        bib = pandoc(path.read_text("utf-8"), "biblatex", "csljson", path.name, cache=True)
        keys |= {item["id"] for item in json.loads(bib)}
    return keys


def cite_book(book: Book, keys, api_version):
    """Format every citation of the book (its Cite nodes that are not cross-references) in one
    citeproc run, so that "Touvron et al. 2023a" and the bibliography agree across chapters; the
    Cite nodes are filled in place. Returns the bibliography (a Div#refs), or None. An unknown key
    is an error naming the cell."""
    cites, problems = [], []
    for ch in book.chapters:
        for c, cell in ch.cites:
            ids = [x["citationId"] for x in c[0]]
            if unknown := [k for k in ids if k not in keys and not is_crossref(k)]:
                names = ", ".join(p.name for p in book.bibliography) or "a bibliography"
                problems.append(
                    f"{at(ch, cell)}: unknown citation key {', '.join('@' + k for k in unknown)} "
                    f"(not in {names}); write \\@ for a literal @"
                )
            elif not all(map(is_crossref, ids)):  # [@paper; @sec-x]: "(Paper 2019; Chapter 8)"
                refs = [x for x in c[0] if is_crossref(x["citationId"])]
                c[0][:] = [x for x in c[0] if x not in refs]
                cites.append((c, {"t": "Cite", "c": [refs, []]} if refs else None))
    if problems:
        raise BookError("\n".join(dict.fromkeys(problems)))
    if not cites:
        return None
    blocks = [{"t": "Para", "c": [{"t": "Cite", "c": c}]} for c, _ in cites]
    blocks.append(Div(["refs", [], []], []))
    meta = {"link-citations": {"t": "MetaBool", "c": True}}
    doc = {"pandoc-api-version": api_version, "meta": meta, "blocks": blocks}
    args = ["--citeproc", f"--metadata=lang:{book.lang}"]
    args += [f"--bibliography={b}" for b in book.bibliography]
    args += [f"--csl={book.csl}"] if book.csl else []
    files = [b.read_text(encoding="utf-8") for b in book.bibliography + [book.csl] if b]
    out = json.loads(pandoc(json.dumps(doc), "json", "json", "the citations", *args, cache=files))
    for (cite, tail), para in zip(cites, out["blocks"]):
        content = para["c"][0]["c"][1]
        if tail:  # the cross-references inside the parentheses: "(Paper 2019; Chapter 8)"
            close = content and content[-1]["t"] == "Str" and content[-1]["c"].endswith(")")
            if close:
                content[-1]["c"] = content[-1]["c"][:-1]
            content += [Str(";"), Space(), tail] + ([Str(")")] if close else [])
        cite[1] = content
    return out["blocks"][-1]


def add_references(book: Book, refs):
    """The bibliography goes where Quarto puts it: into the `references` chapter (its `::: {#refs}`
    div, else its end) if the book has one, else into an unnumbered chapter at the end."""
    ch = next((c for c in book.chapters if c.stem == "references"), None)
    if ch is None:
        ch = Chapter(book.bibliography[0].name, book.project / "references", page="references.html")
        ch.blocks = [
            {"t": "Header", "c": [1, ["references", ["unnumbered"], []], [Str("References")]]}
        ]
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
    name: str  # "Chapter", "Appendix", "Section", "Figure"
    number: str | None
    title: str

    def text(self, number_only=False):  # "Section 4.2", "4.2" (`-@sec-x`), or an unnumbered title
        if self.number is None:
            return self.title
        return self.number if number_only else f"{self.name}\u00a0{self.number}"


def callout(c):
    """::: {.callout-KIND} with a `## Title` or title="..." -> Div.callout > Div.callout-title +
    Div.callout-body."""
    (ident, classes, kv), body = c
    kind = next((k[8:] for k in classes if k[:8] == "callout-" and k[8:] in CALLOUTS), None)
    if kind is None or "callout" in classes:
        return None
    title = [Str(dict(kv)["title"])] if dict(kv).get("title") else [Str(kind.capitalize())]
    if "title" not in dict(kv) and body and body[0]["t"] == "Header":
        title, body = body[0]["c"][2], body[1:]
    classes = ["callout", f"callout-{kind}"] + [k for k in classes if k != f"callout-{kind}"]
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
            return callout(c)
        elif t == "Header":
            level, (ident, classes, kv), inlines = c
            title, num, name = stringify(inlines).strip(), None, "Section"
            if level == 1 and ch.title:
                problems.append(
                    f"{at(ch, where['cell'])}: a second level-1 heading `# {title}`: a "
                    "chapter has one `# Title`; its sections are `## ...`"
                )
            elif level == 1:
                ch.title, ch.anchor, num = title, ident, number
                name = "Appendix" if ch.appendix else "Chapter"
            elif number and "unnumbered" not in classes:
                counters[level] += 1
                counters[level + 1 :] = [0] * (len(counters) - level - 1)
                num = ".".join([number] + [str(n) for n in counters[2 : level + 1]])
            if level == 2:
                ch.sections.append((ident, num, title))
            if num:
                kv.append(["number", num])
            if ident.startswith("sec-"):
                register(labels, ident, Target(ch, name, num, title), ch, where["cell"])
        elif t == "Figure" and c[0][0].startswith("fig-"):  # its caption: "Figure 4.2: ..."
            figures[0] += 1
            num = f"{number}.{figures[0]}" if number else str(figures[0])
            text = stringify(c[1][1]).strip()
            c[1][1][0]["c"][:0] = [Str(f"Figure\u00a0{num}:"), Space()]
            register(labels, c[0][0], Target(ch, "Figure", num, text), ch, where["cell"])

    ch.blocks = walk(ch.blocks, visit)
    if problems:
        raise BookError("\n".join(problems))
    if not ch.title:
        raise BookError(f"{ch.src}: no chapter title (a `# Title` heading in its first cell)")
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
    symbol = lambda m: chr(0x2400 + ord(m[0]))  # noqa: E731
    snippet = CONTROL.sub(symbol, tex[max(0, c.start() - 12) :])[:30]
    return (
        f"a control character in the formula ...{snippet}... ({c[0]!r} shown as {symbol(c)}): a "
        "Python escape (\\t in \\text, \\b in \\beta, \\f in \\frac) where a backslash was meant"
    )


def prose_text(x):
    "The visible text of inlines, with code, maths and raw markup left out."
    if isinstance(x, list):
        return "".join(map(prose_text, x))
    t = x.get("t") if isinstance(x, dict) else None
    if t == "Str":
        return x["c"]
    if t in ("Space", "SoftBreak", "LineBreak", "Code", "Math", "RawInline", "Note"):
        return " "
    if t in ("Link", "Image", "Span", "Cite", "Quoted"):
        return prose_text(x["c"][1])
    return prose_text(x.get("c")) if t else ""


VISIBLE_SKIP = re.compile(
    r"<(pre|code|math|script|style|summary)\b.*?</\1>|<!--.*?-->", re.S | re.I
)


def html_problems(ch, page):
    "The same checks on the text a reader sees in the HTML page (code and maths left out)."
    text = html.unescape(re.sub(r"<[^>]+>", " ", VISIBLE_SKIP.sub(" ", page)))
    return text_problems(f"{ch.src} (its HTML page)", text)


def register(labels, ident, target, ch, cell):
    if ident in labels:
        other = labels[ident].chapter.src
        raise BookError(f"{at(ch, cell)}: the label #{ident} is defined twice (also in {other})")
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
                if is_crossref(key):
                    hint = "" if label[:4] in ("sec-", "fig-") else " (only @sec- and @fig- are)"
                    problems.append(
                        f"{at(ch, where['cell'])}: unresolved cross-reference @{key}{hint}"
                    )
                return node[1]  # not a cross-reference: the text as written
            t = labels[label]
            text = t.text(number_only=c["citationMode"]["t"] == "SuppressAuthor")
            url = href(t.chapter, label)
            out += [Str(","), Space()] if n else []
            out += c["citationPrefix"] + ([Space()] if c["citationPrefix"] else [])
            out += [Link(["", [], []], [Str(text)], [url, ""]) if url else Str(text)]
            out += c["citationSuffix"]
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
        when = dict(a[2]).get("when-format", fmt) if t == "Div" else None
        if t == "Div" and {"only-html", "only-typst", "content-visible"} & set(a[1]):
            # the renderer's `only-html`/`only-typst`, Quarto's `content-visible when-format`
            keep = {"pdf": "typst"}.get(when, when) == fmt
            keep = keep if "content-visible" in a[1] else f"only-{fmt}" in a[1]
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
        if t == "Str" and APOSTROPHE.search(c):  # Typst sets ' after a digit as a prime ("GPT-2′s")
            parts = APOSTROPHE.split(c)  # and after "al." as an opening quote; pandoc writes ’ as '
            return [x for p in parts for x in (Str(p), raw("typst", "\u2019", False))][:-1]
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


# An apostrophe Typst would not set as one, so written as a raw ’: after a digit, after a letter and
# a full stop ("et al.'s": Typst opens a quote after "."), or opening a Str that follows a link
# ("@sec-x's" -> a link "Chapter 7", then "'s").
APOSTROPHE = re.compile(r"(?:(?<=\d)|(?<=[^\W\d_]\.)|^)['\u2019](?=[a-z])")


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
    num = lambda n: f'<span class="num">{e(n)}</span> ' if n else ""  # noqa: E731
    sections = [f'<li><a href="#{e(i)}">{num(n)}{e(t)}</a></li>' for i, n, t in ch.sections]
    items, part = [], None
    for c in book.chapters:
        if c.part != part and c.part is not None:
            number, title = book.parts[c.part]
            items.append(
                f'<li class="part">{e(f"Part {number} · " if number else "")}{e(title)}</li>'
            )
        elif c.part is None and part is not None:  # after the parts: the references
            items.append('<li class="part-end" aria-hidden="true"></li>')
        part = c.part
        sub = ""
        if c is ch and sections:
            sub = '\n    <ul class="sections">\n      ' + "\n      ".join(sections) + "\n    </ul>"
        active = ' class="active"' if c is ch else ""
        items.append(f'<li{active}><a href="{c.page}">{num(c.number)}{e(c.title)}</a>{sub}</li>')

    i, nav = book.chapters.index(ch), []
    if i > 0:
        p = book.chapters[i - 1]
        nav += [f'<a class="prev" href="{p.page}"><small>Previous</small>&larr; {e(p.label())}</a>']
    if i + 1 < len(book.chapters):
        n = book.chapters[i + 1]
        nav += [f'<a class="next" href="{n.page}"><small>Next</small>{e(n.label())} &rarr;</a>']
    title_block = ""
    if i == 0:
        lines = [
            ("book-title", f"<strong>{e(book.title)}</strong>"),
            ("subtitle", e(book.subtitle or "")),
        ]
        lines += [("author", e(", ".join(book.authors))), ("date", e(book.date or ""))]
        title_block = (
            '<header class="title-block">\n'
            + "".join(f'<p class="{cls}">{text}</p>\n' for cls, text in lines if text)
            + "</header>"
        )
    chapter_name = (("Appendix " if ch.appendix else "") + ch.label()) if ch.number else ch.title
    page_toc = ""
    if sections:  # the in-page contents, on the right of wide screens
        page_toc = (
            '<nav class="page-toc" aria-label="On this page">\n<p class="page-toc-title">On this '
            'page</p>\n<ul>\n' + "\n".join(sections) + "\n</ul>\n</nav>"
        )
    return template.substitute(
        page_toc=page_toc,
        lang=e(book.lang),
        description=e(ch.description or book.subtitle or ""),
        book_title=e(book.title),
        page_title=e(f"{chapter_name} – {book.title}"),
        sidebar='  <ul class="chapters">\n    ' + "\n    ".join(items) + "\n  </ul>",
        pdf=e(book.output_file) + ".pdf",
        title_block=title_block,
        body=body,
        prev_next="\n".join(nav),
    )


OLD_SYMBOL = re.compile(r"\b((?:dot|plus|minus|times|div|ast|slash|eq|backslash)\.)circle\b")
# Code (left alone) or a formula; in one, `upright("pass@") k` (pandoc's \text{pass@}k).
CODE_OR_MATH = re.compile(r"(`+).*?\1|(?<!\\)\$(?:[^$\\]|\\.)*\$", re.DOTALL)
TEXT_SPACE = re.compile(r'(upright\("(?:[^"\\]|\\.)*"\)) (?=\S)')


def typst_symbols(text: str) -> str:
    """Two fixes to pandoc's Typst maths, outside code: pandoc 3.9 writes symbols with Typst's old
    `.circle` modifier (`\\odot` -> `dot.circle`), which Typst 0.14+ renamed `.o`; and it writes
    TeX's `\\text{pass@}k` as `upright("pass@") k`, where Typst would set the space ("pass@ k")."""

    def fix(m):
        return m[0] if m[1] else TEXT_SPACE.sub(r"\1", OLD_SYMBOL.sub(r"\1o", m[0]))

    return CODE_OR_MATH.sub(fix, text)


STICKY_CHARS = 300  # about three lines of the PDF: a longer paragraph may break across the page


def sticky_intros(blocks):
    """In the PDF, a short paragraph of the text that ends with a colon ("... the pieces are
    visible:") stays on the page of what it introduces (a Typst sticky block), never alone at the
    foot of the page before it. A longer one is left free: moved whole, it would empty much of
    the page before it."""
    out = []
    for node in blocks:
        last = node["c"][-1] if node["t"] == "Para" and node["c"] else {}
        short = node["t"] == "Para" and len(stringify(node)) <= STICKY_CHARS
        if short and last.get("t") == "Str" and last["c"].endswith(":"):
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
# the same on every machine. For Chinese, Japanese and Korean characters the renderer adds a small
# Debian font package, installed (`apt-get install fonts-wqy-microhei`) or fetched without root into
# the cache (`apt-get download`, as the corpus is); a character still without a font is shown as
# "[U+8A9E]", with a warning.
CJK_FONT, CJK_FONT_DIR = "fonts-wqy-microhei", Path("/usr/share/fonts/truetype/wqy")
CJK = re.compile("[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef]")
# Code points that need no glyph: controls, spaces, joiners, variation selectors.
NO_GLYPH = re.compile(
    "[\x00-\x20\x7f-\xa0\u00ad\u200b-\u200f\u2028-\u202f\u2060-\u206f\ufe00-\ufe0f]"
)


def cache_dir() -> Path:
    "The renderer's cache: `$MINILLM_CACHE/book`, beside minillm's data (~/.cache/minillm)."
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("MINILLM_CACHE") or Path(base) / "minillm") / "book"


def font_paths():
    """Fonts besides Typst's own: DejaVu Sans from matplotlib (in the venv), so the PDF does not
    depend on the machine's fonts, and the CJK font package, fetched or installed."""
    import matplotlib

    cjk = [p for p in (cache_dir().parent / "fonts" / CJK_FONT, CJK_FONT_DIR) if p.is_dir()]
    return [str(Path(matplotlib.get_data_path()) / "fonts" / "ttf")] + [str(p) for p in cjk[:1]]


@functools.lru_cache(maxsize=8)
def font_coverage(paths: tuple) -> frozenset:
    """The code points the fonts in `paths` have. Last Resort (matplotlib ships it) is left out: it
    "has" every code point, as a box with the name of its block."""
    from fontTools.ttLib import TTFont

    typst = need("typst", "typst")
    fonts = typst.Fonts(include_system_fonts=False, include_embedded_fonts=False, font_paths=paths)
    cover = set()
    for f in {(f.path, f.index) for f in fonts.fonts() if "last resort" not in f.family.lower()}:
        with contextlib.suppress(Exception):  # a font fontTools cannot read does not count
            cover.update(TTFont(f[0], fontNumber=f[1], lazy=True).getBestCmap() or ())
    return frozenset(cover)


def fetch_font_package(package) -> bool:
    """`apt-get download` the Debian font package and unpack its fonts into the cache (no root
    needed). False where that is not possible (no apt-get, no network, unknown package)."""
    dst = cache_dir().parent / "fonts" / package
    if dst.is_dir():
        return True
    with tempfile.TemporaryDirectory() as d:
        try:
            cmd = ["apt-get", "download", package]
            r = subprocess.run(cmd, cwd=d, capture_output=True, timeout=120)
            debs = list(Path(d).glob("*.deb"))
            if r.returncode or not debs:
                return False
            subprocess.run(["dpkg-deb", "-x", str(debs[0]), f"{d}/x"], check=True, timeout=300)
        except (OSError, subprocess.SubprocessError):
            return False
        files = [f for f in Path(d, "x").rglob("*") if f.suffix.lower() in (".ttf", ".ttc", ".otf")]
        if not files:
            return False
        part = dst.with_name(f".{package}-{os.getpid()}")
        part.mkdir(parents=True, exist_ok=True)
        for f in files + list(Path(d, "x").glob(f"usr/share/doc/{package}/copyright")):
            shutil.copyfile(f, part / f.name)
        with contextlib.suppress(OSError):  # whole or not at all; another build may have won
            part.rename(dst)
        shutil.rmtree(part, ignore_errors=True)
    return dst.is_dir()


def missing_glyphs(text: str, cover) -> list:
    "The characters of `text` (in order of first use) that no font covers."
    chars = dict.fromkeys(c for c in text if ord(c) > 0x7E and not NO_GLYPH.match(c))
    return [c for c in chars if ord(c) not in cover]


def with_fonts(bodies: list, chapters: list, fetch=fetch_font_package):
    """The Typst bodies of `chapters` with every character that no font has replaced by its code
    point (a warning names it and its chapter). First, where CJK characters are missing, the CJK
    font package is fetched (`fetch`)."""
    cover = font_coverage(tuple(font_paths()))
    missing = [missing_glyphs(body, cover) for body in bodies]
    if any(CJK.match(c) for cs in missing for c in cs) and fetch(CJK_FONT):
        cover = font_coverage(tuple(font_paths()))
    out = []
    for ch, body, chars in zip(chapters, bodies, missing):
        if gone := [c for c in chars if ord(c) not in cover]:
            hint = f"; `apt-get install {CJK_FONT}` gives the PDF a font with them"
            warn(
                f"{ch.src}: no font of the PDF has "
                + ", ".join(f"{c} (U+{ord(c):04X})" for c in gone)
                + f"; the PDF shows [U+{ord(gone[0]):04X}] instead"
                + (hint if any(CJK.match(c) for c in gone) else "")
            )
            body = "".join(f"[U+{ord(c):04X}]" if c in gone else c for c in body)
        out.append(body)
    return out


def compile_pdf(tmp: Path, typ_name: str, pdf: Path, source: str):
    typst = need("typst", "typst")
    try:
        fonts = dict(font_paths=font_paths(), ignore_system_fonts=True)
        typst.compile(str(tmp / typ_name), output=str(pdf), root=str(tmp), **fonts)
    except typst.TypstError as e:
        detail = getattr(e, "diagnostic", "") or str(e)
        m = re.search(re.escape(typ_name) + r":(\d+):", detail)
        lines = source.splitlines()[: int(m[1])] if m else []  # the chapter and cell it came from
        marks = [l[19:] for l in lines if l.startswith("// minillm-source: ")] or ["the PDF"]
        where = re.sub(r" cell (.*)", r" (cell \1)", marks[-1])
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
TMP_PREFIX = ".book-tmp-"  # .book-tmp-<pid>-xxxx: a build's working directory next to the book


def select_chapter(book: Book, chapter):
    "The chapter `--chapter 04` names: the one whose file name starts with it (or is it)."
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
    project = Path(project).resolve()
    book = read_config(project)
    only = select_chapter(book, chapter) if chapter else None
    out = Path(out).resolve() if out else project / book.output_dir
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the book is for reading
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            keys = pool.submit(bibliography_keys, book)
            pool.submit(font_coverage, tuple(font_paths()))  # for `with_fonts`, meanwhile
            parse = lambda ch: parse_chapter(ch, tmp, book.lib_name)  # noqa: E731
            api_version = list(pool.map(parse, book.chapters))[0]
            references = cite_book(book, keys.result(), api_version)
            if references:
                references = add_references(book, references)

            labels, counts = {}, {False: 0, True: 0}  # chapters and appendices
            for ch in book.chapters:
                number = None
                if is_numbered(ch) and book.number_sections:
                    counts[ch.appendix] += 1
                    number = chr(64 + counts[True]) if ch.appendix else str(counts[False])
                number_chapter(ch, number, book, labels)

            def bib_entry(t, c, *_):  # a reference's id: the target of its citations' links
                if t == "Div" and "csl-entry" in c[0][1]:
                    target = Target(references, "", None, stringify(c[1]))
                    register(labels, c[0][0], target, references, None)

            walk(references.blocks if references else [], bib_entry)

            chapters = [only] if only else book.chapters
            problems = [p for ch in chapters for p in ch.problems]
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
            source = typst_document(book, with_fonts(typst_out.result(), chapters), chapters)
            name = only.stem if only else book.output_file
            shutil.copyfile(TEMPLATES / "book.typ", tmp / TYPST_TEMPLATE)
            (tmp / f"{name}.typ").write_text(source, encoding="utf-8")
            pdf = tmp / f"{name}.pdf"
            # Typst typesets (without the GIL) while the HTML pages are written and indexed.
            typeset = pool.submit(compile_pdf, tmp, f"{name}.typ", pdf, source)

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
            (tmp / f"{name}.typ").unlink()
            (tmp / TYPST_TEMPLATE).unlink()
        prune_cache()
        pages = len(re.findall(rb"/Type\s*/Page(?![a-zA-Z])", pdf.read_bytes()))
        if only:
            publish_chapter(tmp, out, only)
        else:
            publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    html_pages = [out / ch.page for ch in chapters]
    return Result(len(chapters), pages, out / pdf.name, html_pages, source, time.time() - start)


def search_index(site: Path):
    "Pagefind's full-text index of the pages (and its search UI files), into site/pagefind/."
    cmd = [sys.executable, "-m", "pagefind", "--site", str(site), "--output-subdir", "pagefind"]
    r = subprocess.run(cmd + ["--keep-index-url", "--silent"], capture_output=True, text=True)
    if r.returncode != 0 or not (site / "pagefind" / "pagefind-ui.js").is_file():
        raise BookError(
            f"pagefind (the search index) failed: {(r.stderr or r.stdout).strip()} "
            "(`pip install 'pagefind[bin]'` in the venv, or run `make book`)"
        )


def clean_stale(parent: Path):
    "Remove the working directories of builds that were killed (whose process is gone)."
    for d in parent.glob(TMP_PREFIX + "*"):
        m = re.match(re.escape(TMP_PREFIX) + r"(?:old-)?(\d+)-", d.name)
        try:
            if m:
                os.kill(int(m[1]), 0)  # the build is still running
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:  # another user's build, running
            pass


def publish_chapter(tmp: Path, out: Path, ch):
    "One chapter's page, media, PDF and the assets, into the book directory (each file replaced)."
    media = tmp / "media" / ch.stem
    files = [ch.page, f"{ch.stem}.pdf", *ASSETS]
    files += [str(f.relative_to(tmp)) for f in media.rglob("*") if f.is_file()]
    shutil.rmtree(out / "media" / ch.stem, ignore_errors=True)
    for name in files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / name, out / name)


def publish(tmp: Path, out: Path):
    "Put the new book in place of the old one: two renames, so a reader never sees half a book."
    old = out.parent / f"{TMP_PREFIX}old-{os.getpid()}-{tmp.name[-8:]}"
    if out.exists():
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        if old.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def build(
    project: str = ".",  # directory of _quarto.yml
    out: str = None,  # output directory (default: project.output-dir of _quarto.yml)
    chapter: str = None,  # render only this chapter (`04`): its page and <name>.pdf
    check_notebooks: bool = False,  # only check that the notebooks are JSON
) -> int:
    "Render the book (_quarto.yml) to PDF and HTML."
    try:
        if check_notebooks:
            return check_notebook_json(Path(project)) or 0
        r = render(project, out, chapter)
    except BookError as e:
        print(f"render_book: error: {e}", file=sys.stderr)
        return 1
    more = f" (+{len(r.html) - 1} chapter pages)" if len(r.html) > 1 else ""
    print(
        f"render_book: {r.chapters} chapter{'s' * (r.chapters > 1)}, {r.pages} PDF pages, built in "
        f"{r.seconds:.1f} s\n  {os.path.relpath(r.pdf)}\n  {os.path.relpath(r.html[0])}{more}"
    )
    return 0


def main(argv=None) -> int:
    "`tools/render_book.py [options]`: `build` with the options of the command line."
    args = vars(anno_parser(build, prog="tools/render_book.py").parse_args(argv))
    args.pop("pdb", None), args.pop("xtra", None)  # fastcore's own options
    return build(**args)


if __name__ == "__main__":
    sys.exit(main())
