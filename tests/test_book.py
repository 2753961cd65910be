"""tools/render_book.py: the book renderer used by `make book` where Quarto is not installed.

A small fake book (its own _quarto.yml, references.bib and pyproject.toml, a preface and a part with
two chapters, generated here with nbformat) uses every feature the chapters use: cross-references,
citations, the module docstring note, figures from cells and from Markdown SVGs, check cells,
DataFrame and Markdown tables, maths, callouts. We render it once and check the HTML pages and the
Typst source behind the PDF. Then we break it in the ways a writer does (invalid JSON, a missing
chapter, an unresolved reference, an unknown citation key, TeX or a prime in the prose, markup Typst
rejects) and check that the build fails naming the file and cell, and leaves the previously rendered
book as it was. The browser checks of the HTML book are tools/check_book.py (`make check-book`).
"""

import ast
import base64
import html
import importlib.util
import json
import re
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import pytest

pytest.importorskip("pypandoc")
pytest.importorskip("typst")
pytest.importorskip("yaml")
nbformat = pytest.importorskip("nbformat")
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "render_book.py"

spec = importlib.util.spec_from_file_location("render_book", SCRIPT)
rb = importlib.util.module_from_spec(spec)
sys.modules["render_book"] = rb  # dataclasses look their module up
spec.loader.exec_module(rb)

QUARTO_YML = """\
project:
  type: book
  output-dir: book
book:
  title: "A Test Book"
  subtitle: "with a subtitle"
  author: "Ann Author"
  date: "2024-01-02"
  output-file: testbook
  chapters:
    - nbs/index.ipynb
    - part: "Part One"
      chapters:
        - nbs/01_one.ipynb
        - nbs/02_two.ipynb
bibliography: references.bib
number-sections: true
format:
  html:
    toc: true
  typst:
    toc: true
    papersize: a4
"""


def png(w=8, h=6):
    "A tiny valid PNG, without matplotlib."

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    rows = b"".join(b"\x00" + b"\x20\x60\xc0" * w for _ in range(h))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="40" height="20">'
    '<rect width="40" height="20" fill="teal"/></svg>'
)
TABLE = (
    '<div><style scoped>.dataframe td {color: red}</style>'
    '<table border="1" class="dataframe"><thead>'
    '<tr style="text-align: right;"><th></th><th>tokens</th><th>novel</th><th>ratio</th></tr>'
    "</thead>"
    "<tbody><tr><th>0</th><td>4242</td><td>Emma</td><td>NaN</td></tr>"
    "<tr><th>1</th><td>17</td><td>None</td><td>0.25</td></tr></tbody></table></div>"
)
PIPE_TABLE = "| model | loss |\n|---|---|\n| tiny | 1.5 |\n| big | nan |\n"
BIB = """\
@book{knuth1984literate,
  title = {Literate Programming},
  author = {Knuth, Donald E.},
  publisher = {CSLI},
  year = {1984}
}

@book{lamport1994latex,
  title = {{LaTeX}: A Document Preparation System},
  author = {Lamport, Leslie},
  publisher = {Addison-Wesley},
  year = {1994}
}
"""
DIAGRAM = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 120 40" width="120" height="40">'
    '<rect x="1" y="1" width="118" height="38" fill="#e8eef5" stroke="#1f4e79"/>'
    '<text x="60" y="25" text-anchor="middle" font-family="DejaVu Sans, Arial, sans-serif" '
    'font-size="13">diagram</text></svg>'
)


def stream(text, name="stdout"):
    return new_output("stream", name=name, text=text)


def write_project(root: Path):
    (root / "nbs" / "figures").mkdir(parents=True)
    (root / "_quarto.yml").write_text(QUARTO_YML)
    (root / "references.bib").write_text(BIB)
    (root / "pyproject.toml").write_text('[tool.nbdev]\nlib_name = "testlib"\n')
    (root / "nbs" / "figures" / "diagram.svg").write_text(DIAGRAM)
    index = new_notebook(
        cells=[
            new_markdown_cell("# Preface {#sec-preface}\n\n> What this test book is for."),
            new_markdown_cell(
                "Read @sec-one-second first, then [the second chapter](02_two.ipynb) and "
                "[its section](02_two.ipynb#sec-two-a)."
            ),
        ]
    )
    one = new_notebook(
        cells=[
            new_markdown_cell("# Chapter one {#sec-one}\n\n> The lead of chapter one."),
            new_code_cell("#| default_exp one"),
            new_markdown_cell("#| export\nThe module docstring of one."),
            new_markdown_cell(
                "## First section {#sec-one-first}\n\nInline math $a^2 + b^2$ and display math\n\n"
                "$$\\sum_{i=1}^n x_i$$\n\nSee @sec-one-second below, as literate programs do "
                "[@knuth1984literate]."
            ),
            new_markdown_cell(
                "::: {.callout-warning}\n## Mind this\nThe warning body.\n:::\n\n"
                "::: {.callout-tip title=\"A titled tip\"}\nThe tip body.\n:::\n\n"
                "::: {.callout-note}\nAn untitled note.\n:::"
            ),
            new_code_cell(
                "# NBVAL_IGNORE_OUTPUT\nprint('visible code')",
                outputs=[stream("\x1b[32mvisible\x1b[0m output\n"), stream("warned\n", "stderr")],
            ),
            new_code_cell(
                "#| hide\nsecret_hidden_code()", outputs=[stream("secret hidden output\n")]
            ),
            new_code_cell(
                "#| include: false\nsecret_excluded_code()",
                outputs=[stream("secret excluded output\n")],
            ),
            new_code_cell(
                "#| echo: false\nechoed_code_absent()", outputs=[stream("echo false output\n")]
            ),
            new_code_cell(
                "#| output: false\nshown_code_without_output()",
                outputs=[stream("output false output\n")],
            ),
            new_code_cell(
                "#| label: fig-dots\n#| fig-cap: \"Some *blue* dots.\"\nplot_dots()",
                outputs=[
                    new_output(
                        "display_data",
                        data={
                            "image/png": base64.b64encode(png()).decode(),
                            "text/plain": "<Figure size 640x480 with 1 Axes>",
                        },
                    )
                ],
            ),
            new_markdown_cell(
                "![A diagram, drawn by hand.](figures/diagram.svg){#fig-diagram}\n\n"
                "@fig-diagram is a diagram."
            ),
            new_code_cell("# the checks\nassert 1 + 1 == 2\nassert True, 'never'"),
            new_code_cell(
                "show_pipe_table()",
                outputs=[
                    new_output(
                        "display_data", data={"text/markdown": PIPE_TABLE, "text/plain": "<md>"}
                    )
                ],
            ),
            new_code_cell(
                "draw_svg()",
                outputs=[
                    new_output("display_data", data={"image/svg+xml": SVG, "text/plain": "<svg>"})
                ],
            ),
            new_code_cell(
                "frame",
                outputs=[
                    new_output(
                        "execute_result",
                        execution_count=1,
                        data={"text/html": TABLE, "text/plain": "   tokens\n0  4242"},
                    )
                ],
            ),
            new_code_cell(
                "# NBVAL_RAISES_EXCEPTION\n1/0",
                outputs=[
                    new_output(
                        "error",
                        ename="ZeroDivisionError",
                        evalue="division by zero",
                        traceback=[
                            "\x1b[0;31m---------\x1b[0m",
                            "\x1b[0;31mZeroDivisionError\x1b[0m: division by zero",
                        ],
                    )
                ],
            ),
            new_markdown_cell(
                "A plain fenced block:\n\n```\nno language here\n```\n\n"
                "::: {.content-visible when-format=\"html\"}\nOnly on the web.\n:::\n\n"
                "::: {.content-visible when-format=\"pdf\"}\nOnly on paper.\n:::"
            ),
            new_markdown_cell(
                "## Second section {#sec-one-second}\n\n"
                "As @fig-dots shows, and as @sec-one-first said. "
                "The next chapter is @sec-two; its first section is [here](02_two.ipynb#sec-two-a)."
            ),
        ]
    )
    two = new_notebook(
        cells=[
            new_markdown_cell("# Chapter two {#sec-two}\n\n> The lead of chapter two."),
            new_markdown_cell(
                "## A section {#sec-two-a}\n\nBack to @sec-one-second and @fig-dots, and "
                "[the preface](index.ipynb). "
                "@lamport1994latex wrote a manual.[^fn] Kaplan et al.'s law, GPT-2's size and "
                "Austen's novels.\n\n[^fn]: A footnote of chapter two."
            ),
            new_code_cell(
                "show_markdown()",
                outputs=[
                    new_output(
                        "display_data",
                        data={"text/markdown": "**markdown output**", "text/plain": "<md>"},
                    )
                ],
            ),
        ]
    )
    for name, nb in (("index", index), ("01_one", one), ("02_two", two)):
        nb.metadata["kernelspec"] = {
            "name": "python3",
            "display_name": "Python 3",
            "language": "python",
        }
        nbformat.write(nb, root / "nbs" / f"{name}.ipynb")
    return root


def text_of(path: Path):
    """An HTML page's text as a reader sees it: tags removed, entities decoded, non-breaking spaces
    as spaces."""
    return html.unescape(re.sub(r"<[^>]+>", "", path.read_text())).replace("\xa0", " ")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = write_project(tmp_path_factory.mktemp("book"))
    result = rb.render(root)
    return root, result


def test_outputs_exist(built):
    root, r = built
    book = root / "book"
    assert r.pdf == book / "testbook.pdf" and r.pdf.read_bytes().startswith(b"%PDF")
    assert r.pages >= 5  # title, contents, preface, part, two chapters
    assert sorted(p.name for p in book.glob("*.html")) == [
        "01_one.html",
        "02_two.html",
        "index.html",
        "references.html",
    ]
    for asset in ("style.css", "book.js", "favicon.svg", "pagefind/pagefind-ui.js"):
        assert (book / asset).exists(), asset
    assert {p.suffix for p in (book / "media" / "01_one").iterdir()} == {".png", ".svg"}
    assert not list(root.glob(".book-tmp*")), "temporary directory left behind"
    assert not list(book.glob("*.typ")), "intermediate files published"


def test_html_numbers_and_cross_references(built):
    root, _ = built
    one, two, index = (root / "book" / p for p in ("01_one.html", "02_two.html", "index.html"))
    t1 = text_of(one)
    assert "1 Chapter one" in t1 and "1.1 First section" in t1 and "1.2 Second section" in t1
    assert "Figure 1.1: Some blue dots." in t1
    assert "As Figure 1.1 shows, and as Section 1.1 said. The next chapter is Chapter 2" in t1
    h1 = one.read_text()
    assert 'href="#fig-dots"' in h1 and 'href="#sec-one-first"' in h1
    assert 'href="02_two.html"' in h1 and 'href="02_two.html#sec-two-a"' in h1
    assert 'id="fig-dots"' in h1 and "<figcaption" in h1
    h2 = two.read_text()
    assert "Back to Section 1.2 and Figure 1.1" in text_of(two)
    assert 'href="01_one.html#sec-one-second"' in h2 and 'href="01_one.html#fig-dots"' in h2
    assert 'href="index.html">the preface</a>' in h2
    # pandoc writes all pages in one call: a footnote stays on its chapter's page
    assert "A footnote of chapter two." in h2 and 'href="#fn1"' in h2
    assert "footnote" not in (root / "book" / "01_one.html").read_text()
    hi = index.read_text()
    assert "Read Section 1.2 first" in text_of(index) and 'href="01_one.html#sec-one-second"' in hi
    assert 'href="02_two.html">the second chapter' in hi and 'href="02_two.html#sec-two-a"' in hi
    # the preface is unnumbered
    assert "Preface" in text_of(index) and "1 Preface" not in text_of(index)


def test_html_cells(built):
    root, _ = built
    pages = [(root / "book" / p).read_text() for p in ("index.html", "01_one.html", "02_two.html")]
    everything = "\n".join(pages)
    for absent in (
        "#|",
        "NBVAL",
        "default_exp",
        "secret_hidden",
        "secret_excluded",
        "echoed_code_absent",
        "output false output",
        "\x1b",
        "[32m",
        "@sec-",
        "@fig-",
        "??",
    ):
        assert absent not in everything, absent
    one = pages[1]
    for present in (
        "The module docstring of one.",
        "visible code",
        "visible output",
        "warned",
        "echo false output",
        "shown_code_without_output",
        "ZeroDivisionError: division by zero",
        "<math",
        "4242",
        "<table",
    ):
        assert present in one, present
    assert 'class="sourceCode python' in one  # highlighted
    assert "cell-output-stderr" in one and "cell-output-error" in one
    assert re.search(r'<img src="media/01_one/[^"]+\.png"', one) and re.search(
        r'<img src="media/01_one/[^"]+\.svg"', one
    )
    assert "<strong>markdown output</strong>" in pages[2]
    assert "no language here" in one and "Only on the web." in one and "Only on paper." not in one


def test_html_callouts_lead_and_page(built):
    root, _ = built
    one = (root / "book" / "01_one.html").read_text()
    assert (
        'class="callout callout-warning"' in one
        and "Mind this" in one
        and "The warning body." in one
    )
    assert 'class="callout callout-tip"' in one and "A titled tip" in one
    assert 'class="callout callout-note"' in one and re.search(
        r'class="callout-title">\s*Note\s*<', one
    )
    assert 'class="lead"' in one and "The lead of chapter one." in one
    assert '<meta name="viewport"' in one and 'href="style.css"' in one
    # sidebar: the part, the current chapter highlighted with its sections; prev/next
    assert "Part I · Part One" in one and '<li class="active"><a href="01_one.html">' in one
    assert 'href="#sec-one-first"' in one.split('class="sections"')[1].split("</ul>")[0]
    assert 'class="prev" href="index.html"' in one and 'class="next" href="02_two.html"' in one
    index = (root / "book" / "index.html").read_text()
    assert "A Test Book" in index and "with a subtitle" in index and "Ann Author" in index
    assert 'class="prev"' not in index and 'href="testbook.pdf"' in index


def test_typst_source(built):
    _, r = built
    src = r.typst_source
    assert '#part("I", "Part One")' in src and "cover: true" in src and "toc: true" in src
    typ = (ROOT / "tools" / "book" / "book.typ").read_text()
    assert "header: running-header()" in typ and "hyphenate: false" in typ  # headers; title whole
    assert '#callout("warning", [Mind this])[' in src and '#callout("tip", [A titled tip])[' in src
    assert "Figure~1.1" in src or "Figure\u00a01.1" in src
    assert "#link(<sec-one-second>)" in src and "#link(<fig-dots>)" in src
    assert '#set heading(numbering: (..) => "1.2"' in src and "#lead[" in src
    assert src.count("#table(") == 2  # the DataFrame and the Markdown table outputs
    assert 'image("media/01_one/' in src
    assert (
        "#link(<sec-two>)[the second chapter]" in src and "#link(<sec-two-a>)[its section]" in src
    )
    assert "Only on paper." in src and "Only on the web." not in src and "no language here" in src
    for absent in (
        "#|",
        "NBVAL",
        "secret_hidden",
        "echoed_code_absent",
        "output false output",
        "\x1b",
        "#cite",
    ):
        assert absent not in src, absent


def options(source):
    "The options and code of a code cell, read as the renderer reads them (nbdev's reader)."
    from fastcore.nbio import dict2nb

    nb = dict2nb({"cells": [new_code_cell(source)], "metadata": {}})
    return rb.cell_options(nb.cells[0])


def test_plain_text_and_directives():
    assert rb.plain_text("\x1b[31mred\x1b[0m and\r\n 10%\r100%\n") == "red and\n100%\n"
    assert options('#| label: fig-x\n#| fig-cap: "A *b* c"\nx = 1') == (
        {"label": "fig-x", "fig-cap": "A *b* c"},
        "x = 1",
    )
    assert options("#| label: fig-x\n#| fig-cap: The *b* c\nx")[0]["fig-cap"] == "The *b* c"
    assert options("#| export\ndef f(): pass") == ({"export": True}, "def f(): pass")
    assert options("#| default_exp data\n#| hide")[0] == {"default_exp": "data", "hide": True}
    assert options("#| echo: false\n#| export\nx")[0] == {"echo": False, "export": True}
    # Quarto's multi-line YAML, after an nbval marker; a `#|` line inside the code stays code
    opts, code = options(
        "# NBVAL_IGNORE_OUTPUT\n#| label: fig-t\n#| fig-cap: >-\n#|   Time per\n#|   token.\n"
        "plot()\n#| not an option"
    )
    assert opts == {"label": "fig-t", "fig-cap": "Time per token."}
    assert code == "plot()\n#| not an option"


def test_missing_package_message():
    with pytest.raises(rb.BookError, match="pip install pypandoc-binary typst"):
        rb.need("no_such_module_for_the_book", "typst")


# --- failures: a clear message naming the file, and the previous book left as it was
# --------------------------------


@pytest.fixture
def project(built, tmp_path):
    root = tmp_path / "proj"
    shutil.copytree(built[0], root)
    return root


def fails(root: Path, capsys, *names):
    before = {p.name: p.read_bytes() for p in (root / "book").iterdir() if p.is_file()}
    assert rb.main(["--project", str(root)]) == 1
    err = capsys.readouterr().err
    for name in names:
        assert name in err, (name, err)
    after = {p.name: p.read_bytes() for p in (root / "book").iterdir() if p.is_file()}
    assert after == before, "a failed build changed the previous book"
    assert not list(root.glob(".book-tmp*")), "temporary directory left behind"
    return err


def test_invalid_json(project, capsys):
    (project / "nbs" / "02_two.ipynb").write_text('{"cells": [')
    err = fails(project, capsys, "nbs/02_two.ipynb", "invalid JSON at line 1 column 12")
    assert len(err.strip().splitlines()) == 1


def test_notebooks_checked_before_export(project, capsys):
    """`make book` runs `render_book.py --check-notebooks` before nbdev-export: every notebook of
    nbs/ (a chapter or not) must be valid JSON; a broken one: one line naming file and position."""
    assert rb.main(["--project", str(project), "--check-notebooks"]) == 0
    (project / "nbs" / "scratch.ipynb").write_text('{"cells": [\n  {"cell_type": "code",, }\n')
    assert rb.main(["--project", str(project), "--check-notebooks"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "render_book: error: nbs/scratch.ipynb: not a valid notebook (invalid JSON at line 2 "
        "column 24: Expecting property name enclosed in double quotes)"
    )
    make = (ROOT / "Makefile").read_text().split("\nbook:")[1].split("\n\n")[0]
    assert make.index("--check-notebooks") < make.index("export")


def test_missing_chapter(project, capsys):
    cfg = project / "_quarto.yml"
    cfg.write_text(
        cfg.read_text().replace(
            "        - nbs/02_two.ipynb", "        - nbs/02_two.ipynb\n        - nbs/03_gone.ipynb"
        )
    )
    fails(project, capsys, "nbs/03_gone.ipynb", "does not exist")


def test_unresolved_reference(project, capsys):
    nb = nbformat.read(project / "nbs" / "02_two.ipynb", as_version=4)
    nb.cells[1].source += "\n\nSee @sec-nowhere."
    nbformat.write(nb, project / "nbs" / "02_two.ipynb")
    fails(project, capsys, "nbs/02_two.ipynb (cell 1)", "@sec-nowhere")


def test_link_to_missing_section(project, capsys):
    nb = nbformat.read(project / "nbs" / "index.ipynb", as_version=4)
    nb.cells[1].source += " And [this](01_one.ipynb#sec-gone)."
    nbformat.write(nb, project / "nbs" / "index.ipynb")
    fails(project, capsys, "nbs/index.ipynb (cell 1)", "#sec-gone")


def test_typst_error_names_the_cell(project, capsys):
    nb = nbformat.read(project / "nbs" / "02_two.ipynb", as_version=4)
    nb.cells.append(new_markdown_cell("```{=typst}\n#no-such-function()\n```"))
    nbformat.write(nb, project / "nbs" / "02_two.ipynb")
    fails(project, capsys, "nbs/02_two.ipynb (cell 3)", "Typst failed")


def test_rebuild_replaces_the_book(project):
    (project / "book" / "stale.html").write_text("from an old build")
    assert rb.main(["--project", str(project)]) == 0
    assert (
        not (project / "book" / "stale.html").exists()
        and (project / "book" / "index.html").exists()
    )
    assert not list(project.glob(".book-tmp*"))


# --- the real book
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not (ROOT / "_quarto.yml").exists(), reason="no _quarto.yml")
def test_real_book_renders(tmp_path):
    """What `make book` runs without Quarto, on this repository's _quarto.yml, into a temporary
    directory."""
    out = tmp_path / "book"
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--project", str(ROOT), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert (out / "minillm.pdf").read_bytes().startswith(b"%PDF") and (out / "index.html").exists()
    assert not list(tmp_path.glob(".book-tmp*"))
    if shutil.which("pdftotext"):  # Typst sets ' after a digit as a prime: "GPT-2′s", "Chapter 7′s"
        text = subprocess.run(
            ["pdftotext", str(out / "minillm.pdf"), "-"], capture_output=True, text=True
        ).stdout
        assert not re.findall(r"\d\u2032[a-z]", text)
        assert not re.findall(r"[^\W\d_]\.\u2018[a-z]", text)  # "et al.‘s": an opening quote


def test_apostrophes_typst_would_set_otherwise(built):
    """Typst sets ' after a digit as a prime ("GPT-2′s") and after "al." as an opening quote
    ("et al.‘s"): the renderer writes those as ’; Typst's own smart quotes do the rest."""
    _, r = built
    assert "Kaplan et al.\u2019s law, GPT-2\u2019s size and Austen's novels." in r.typst_source
    if shutil.which("pdftotext"):
        text = subprocess.run(["pdftotext", str(r.pdf), "-"], capture_output=True, text=True).stdout
        text = " ".join(text.split())
        assert "Kaplan et al.\u2019s law, GPT-2\u2019s size and Austen\u2019s novels." in text
    parts = rb.APOSTROPHE.split("al.\u2019s e.g.'s 2's it\u2019s Mr.\u2019S")
    assert parts == ["al.", "s e.g.", "s 2", "s it\u2019s Mr.\u2019S"]  # "it’s", "’S": unchanged


def test_stored_error_output_fails_unless_marked(project, capsys):
    """A traceback in a stored output is a broken chapter, unless the cell says the error is the
    point."""
    p = project / "nbs" / "01_one.ipynb"
    nb = nbformat.read(p, as_version=4)
    cell = next(c for c in nb.cells if "NBVAL_RAISES_EXCEPTION" in c.source)
    cell.source = cell.source.replace("# NBVAL_RAISES_EXCEPTION\n", "")
    nbformat.write(nb, p)
    err = fails(project, capsys, "nbs/01_one.ipynb", "ZeroDivisionError")
    assert "NBVAL_RAISES_EXCEPTION" in err


def test_old_typst_symbol_names_renamed_outside_code():
    """pandoc writes \\odot as `dot.circle`, a name Typst 0.14+ no longer knows; code blocks are
    left alone."""
    text = (
        "$ gamma dot.circle x plus.circle.big y $\n```python\nc = a.dot.circle\n```\n"
        "$ times.circle $"
    )
    assert (
        rb.typst_symbols(text)
        == "$ gamma dot.o x plus.o.big y $\n```python\nc = a.dot.circle\n```\n$ times.o $"
    )


# --- citations, the module note, figures from Markdown, checks, tables, typography
# ----------------------------------------------------------------------------------


def test_citations(built):
    root, r = built
    one = (root / "book" / "01_one.html").read_text()
    m = re.search(r'<span class="citation" data-cites="knuth1984literate">(.*?)</span>', one)
    assert m and 'href="references.html#ref-knuth1984literate"' in m[1]
    assert "(Knuth 1984)" in text_of(root / "book" / "01_one.html")
    assert "Lamport (1994) wrote a manual" in text_of(root / "book" / "02_two.html")
    refs = (root / "book" / "references.html").read_text()
    assert 'id="ref-knuth1984literate"' in refs and 'id="ref-lamport1994latex"' in refs
    assert "Literate Programming" in text_of(root / "book" / "references.html")
    assert "References" in one.split('class="chapters"')[1]  # in the sidebar
    src = r.typst_source
    assert "#link(<ref-knuth1984literate>)" in src and "] <ref-knuth1984literate>" in src
    assert "#bibentry[" in src and "References" in src
    # after the last chapter, unnumbered
    assert src.index("#link(<ref-lamport1994latex>)") < src.index("#bibentry[")
    assert "@knuth" not in src and "@knuth" not in one


def test_unknown_citation_key(project, capsys):
    nb = nbformat.read(project / "nbs" / "02_two.ipynb", as_version=4)
    nb.cells[1].source += " As [@nobody2000] says."
    nbformat.write(nb, project / "nbs" / "02_two.ipynb")
    fails(project, capsys, "nbs/02_two.ipynb (cell 1)", "unknown citation key @nobody2000")


def test_module_docstring_is_a_note(built):
    root, r = built
    one = (root / "book" / "01_one.html").read_text()
    note = one.split('class="callout callout-note module-doc"')[1].split("</div>\n</div>")[0]
    assert "The module <code class=\"nowrap\">testlib.one</code>" in note
    assert "The module docstring of one." in note
    assert '#callout("note", [The module `testlib.one`])[' in r.typst_source


def test_figure_from_markdown(built):
    root, r = built
    book = root / "book"
    one = (book / "01_one.html").read_text()
    assert "Figure 1.2: A diagram, drawn by hand." in text_of(book / "01_one.html")
    assert "Figure 1.2 is a diagram." in text_of(book / "01_one.html")
    assert 'id="fig-diagram"' in one and 'src="media/01_one/figures_diagram.svg"' in one
    assert (book / "media" / "01_one" / "figures_diagram.svg").read_text().startswith("<svg")
    assert 'image("media/01_one/figures_diagram.svg"' in r.typst_source  # vector in the PDF
    assert "#link(<fig-diagram>)[Figure~1.2]" in r.typst_source.replace("\u00a0", "~")


def test_check_cells_are_compact(built):
    root, r = built
    one = (root / "book" / "01_one.html").read_text()
    assert (
        '<details class="check"><summary><span class="check-mark">✓ checked</span>: '
        "<code>1 + 1 == 2 (and 1 more)</code></summary>" in one
    )
    check = one.split('<details class="check">')[1].split("</details>")[0]
    assert "assert" in check and 'class="sourceCode python' in check  # highlighted code inside
    src = r.typst_source  # a small box; the listing highlighted by pandoc, set small by book.typ
    check = '#check[#let Skylighting = check-lines\n#Skylighting(([#CommentTok("# the checks")'
    assert check in src
    assert rb.check_summary("assert x\n# c\nassert (\n    y\n)") == "x (and 1 more)"
    assert rb.check_summary("x = 1\nassert x") is None and rb.check_summary("") is None


def test_tables(built):
    root, r = built
    one = (root / "book" / "01_one.html").read_text()
    tables = re.findall(r"<table.*?</table>", one, re.S)
    assert len(tables) == 2 and "<style" not in one.split("<table")[1]
    pipe, frame = tables
    cells = [
        html.unescape(re.sub(r"<[^>]+>", "", c)).strip()
        for c in re.findall(r"<t[dh][^>]*>.*?</t[dh]>", frame, re.S)
    ]
    assert cells == [
        "",
        "tokens",
        "novel",
        "ratio",
        "0",
        "4242",
        "Emma",
        "—",
        "1",
        "17",
        "—",
        "0.25",
    ]
    aligns = re.findall(r'<td[^>]*style="text-align: (\w+);"', frame)
    assert aligns == ["right", "left", "right"] * 2  # the index is a <th>
    assert "—" in pipe and "nan" not in pipe and 'style="text-align: left;">tiny' in pipe
    src = r.typst_source
    assert "align:(right,right,left,right,)" in src.replace(" ", "")
    assert "NaN" not in src and "None" not in src.split("#table(")[1]


def test_prose_checks():
    bad = rb.text_problems("x", "GPT-2′s loss, V_{t+1} and x^{2}, #text(fill: rgb(1, 2, 3))[hi]")
    assert len(bad) == 5, bad
    assert any("prime" in b and "2′s" in b for b in bad) and all(b.startswith("x: ") for b in bad)
    assert not rb.text_problems("x", "the model's loss f′(x) and snake_case{}")


def test_prose_check_fails_the_build(project, capsys):
    nb = nbformat.read(project / "nbs" / "02_two.ipynb", as_version=4)
    nb.cells[1].source += " GPT-2′s value is V_{t+1}; but `V_{t+1}` and $V_{t+1}$ are fine."
    nbformat.write(nb, project / "nbs" / "02_two.ipynb")
    err = fails(project, capsys, "nbs/02_two.ipynb (cell 1)", "apostrophe", "TeX outside maths")
    assert err.count("TeX outside maths") == 1


def test_code_cells_named_as_nbval_names_them(project, capsys):
    p = project / "nbs" / "01_one.ipynb"
    nb = nbformat.read(p, as_version=4)
    i = next(i for i, c in enumerate(nb.cells) if "NBVAL_RAISES_EXCEPTION" in c.source)
    code_before = sum(c.cell_type == "code" for c in nb.cells[:i])
    nb.cells[i].source = nb.cells[i].source.replace("# NBVAL_RAISES_EXCEPTION\n", "")
    nbformat.write(nb, p)
    fails(project, capsys, f"nbs/01_one.ipynb (cell {i}, nbval Cell {code_before})")


def test_html_site(built):
    root, _ = built
    one = (root / "book" / "01_one.html").read_text()
    assert re.search(r'<button class="nav-button" type="button" aria-expanded="false"', one)
    assert '<link rel="icon" href="favicon.svg"' in one and 'src="pagefind/pagefind-ui.js"' in one
    assert '<main class="content" id="main" data-pagefind-body>' in one
    assert 'class="anchor" href="#sec-one-first"' in one
    assert '<span class="math-display"><math display="block"' in one  # scrolls on a phone
    toc = one.split('<nav class="page-toc"')[1].split("</nav>")[0]
    assert 'href="#sec-one-first"' in toc and 'href="#sec-one-second"' in toc
    assert "prefers-color-scheme: dark" in (root / "book" / "style.css").read_text()
    assert "http://" not in one.replace('xmlns="http://www.w3.org', "") and "https://" not in one
    assert list((root / "book" / "pagefind").glob("pagefind-entry.json"))


def test_one_chapter_for_authors(project, capsys):
    stale = project / ".book-tmp-999999999-x"  # left by a killed build (no such process)
    stale.mkdir()
    (project / "book" / "02_two.html").write_text("old")
    assert rb.main(["--project", str(project), "--chapter", "02"]) == 0
    out = capsys.readouterr().out
    assert "built in" in out and "02_two.pdf" in out
    book = project / "book"
    assert (book / "02_two.pdf").read_bytes().startswith(b"%PDF")
    assert "Back to Section 1.2" in text_of(book / "02_two.html")
    assert (book / "01_one.html").exists() and (book / "index.html").exists()  # the rest kept
    assert not list(project.glob(".book-tmp*"))


def test_references_chapter_where_the_book_puts_it(project):
    "As in Quarto: a `references` chapter listed in _quarto.yml gets the bibliography in its #refs."
    (project / "references.qmd").write_text(
        "# References {.unnumbered}\n\nThe works cited.\n\n::: {#refs}\n:::\n"
    )
    cfg = project / "_quarto.yml"
    cfg.write_text(
        cfg.read_text().replace(
            "        - nbs/02_two.ipynb", "        - nbs/02_two.ipynb\n    - references.qmd"
        )
    )
    r = rb.render(project)
    refs = (project / "book" / "references.html").read_text()
    assert "The works cited." in refs and refs.index("The works cited.") < refs.index(
        'id="ref-knuth1984literate"'
    )
    assert r.chapters == 4 and r.typst_source.count("#bibentry[") == 2


# --- what a reader saw wrong in the rendered book
# ------------------------------------------------


def test_text_in_maths_is_not_followed_by_a_space():
    r"""`\text{pass@}k` is "pass@k": pandoc writes `upright("pass@") k`, and Typst would set the
    space. Inline code and code blocks are left as they are."""
    typ = rb.pandoc(
        "$\\text{pass@}k = 1$, $\\text{if } x$, `upright(\"a\") b` and\n\n"
        "$$\\text{pass@}k = \\mathbb{E}[1]$$\n\n```\n$upright(\"c\") d$\n```\n",
        "markdown",
        "typst",
        "test",
    )
    out = rb.typst_symbols(typ)
    assert '$upright("pass@")k = 1$' in out and '$upright("if ")x$' in out
    assert 'upright("pass@")k = bb(E)' in out
    assert '`upright("a") b`' in out and '$upright("c") d$' in out


def table_ast(markdown):
    doc = json.loads(rb.pandoc(markdown, "markdown", "json", "test"))
    return doc, next(b for b in doc["blocks"] if b["t"] == "Table")


def test_tables_left_aligned_and_as_wide_as_their_content():
    "Prose tables: left-aligned, not centred as their figure is; printed ones: natural widths."
    long_row = "| a long name of a row that does not fit | " + "x " * 30 + "|"
    doc, prose = table_ast(f"| name | text |\n|---|---|\n{long_row}\n")
    rb.left_aligned(prose["c"])
    assert [spec[0]["t"] for spec in prose["c"][2]] == ["AlignLeft", "AlignLeft"]
    doc["blocks"] = [prose]
    typ = rb.pandoc(json.dumps(doc), "json", "typst", "test")
    assert "align: (left,left,)" in typ
    _, printed = table_ast("| name | n |\n|---|---:|\n| " + "a long name " * 8 + "| 12 |\n")
    assert printed["c"][2][0][1]["t"] == "ColWidth"  # pandoc: relative widths from the dashes
    rb.tidy_table(printed["c"])
    assert [spec[1]["t"] for spec in printed["c"][2]] == ["ColWidthDefault"] * 2


def test_characters_no_font_has(monkeypatch, capsys):
    "A font package is fetched for CJK; a character still without a font shows its code point."
    fetched = []
    monkeypatch.setattr(rb, "font_paths", lambda: [])  # no font at all: everything is missing
    ch = rb.Chapter("nbs/02_two.ipynb", Path("nbs/02_two.ipynb"))
    out = rb.with_fonts(
        ["plain ascii", "é 語 \U0010fffd é"], [ch, ch], fetch=lambda p: fetched.append(p)
    )
    assert fetched == ["fonts-wqy-microhei"]
    assert out == ["plain ascii", "[U+00E9] [U+8A9E] [U+10FFFD] [U+00E9]"]
    err = capsys.readouterr().err
    assert "nbs/02_two.ipynb: no font of the PDF has é (U+00E9), 語 (U+8A9E)" in err
    assert "apt-get install fonts-wqy-microhei" in err


def test_the_book_fonts_cover_its_characters():
    "DejaVu (matplotlib's) has the chapters' symbols, Greek and emoji; Last Resort is no font."
    pytest.importorskip("matplotlib")
    cover = rb.font_coverage(tuple(rb.font_paths()))
    assert rb.missing_glyphs("aé—−≈→␣αθ😀\u00a0\U0010fffd", cover) == ["\U0010fffd"]
    typ = (ROOT / "tools" / "book" / "book.typ").read_text()
    assert "show figure.caption: it => box(align(left, it))" in typ  # long captions not centred


def test_short_inline_code_is_not_broken():
    "On a narrow screen `austen-tiny` is not split at its hyphen; long code still wraps."
    body = "<p>the <code>austen-tiny</code> model, <code>a b</code>, <code>" + "x" * 30 + "</code>"
    out = rb.SHORT_CODE.sub(r'<code class="nowrap">\1</code>', body)
    assert '<code class="nowrap">austen-tiny</code>' in out
    assert "<code>a b</code>" in out and "<code>" + "x" * 30 in out
    css = (ROOT / "tools" / "book" / "style.css").read_text()
    assert "code.nowrap { white-space: nowrap; }" in css


def test_control_character_in_a_formula_is_reported(project, capsys):
    r"A tab in `$\text{hs}$` is a Python escape that ate the backslash: the build warns, naming it."
    nb = nbformat.read(project / "nbs" / "02_two.ipynb", as_version=4)
    nb.cells[1].source += " The pair $(i, i + \text{hs}/2)$."
    nbformat.write(nb, project / "nbs" / "02_two.ipynb")
    rb.render(project)
    err = capsys.readouterr().err
    assert "nbs/02_two.ipynb (cell 1): a control character in the formula" in err
    assert "␉ext{hs}" in err


def test_a_paragraph_ending_with_a_colon_sticks_to_what_follows():
    long_intro = "A long paragraph. " * 20 + "It ends with a colon:"  # over STICKY_CHARS
    text = f"We print it:\n\nThe end.\n\n- a list:\n\n{long_intro}\n\nCode."
    doc = json.loads(rb.pandoc(text, "markdown", "json", "t"))
    blocks = rb.sticky_intros(doc["blocks"])
    kinds = ["RawBlock", "Para", "RawBlock", "Para", "BulletList", "Para", "Para"]
    assert [b["t"] for b in blocks] == kinds  # the long one is left free
    doc["blocks"] = blocks
    typ = rb.pandoc(json.dumps(doc), "json", "typst", "t")
    assert "#block(sticky: true)[\nWe print it:\n\n]\nThe end." in typ


def typeset_pages(tmp_path, body):
    "The text of each page of a PDF that book.typ sets `body` in (pdftotext -layout)."
    if not shutil.which("pdftotext"):
        pytest.skip("pdftotext (poppler-utils) is not installed")
    shutil.copyfile(ROOT / "tools" / "book" / "book.typ", tmp_path / "book.typ")
    (tmp_path / "t.typ").write_text('#import "book.typ": *\n' + body, encoding="utf-8")
    fonts = dict(font_paths=rb.font_paths(), ignore_system_fonts=True)
    rb.need("typst", "typst").compile(
        str(tmp_path / "t.typ"), output=str(tmp_path / "t.pdf"), root=str(tmp_path), **fonts
    )
    text = subprocess.run(
        ["pdftotext", "-layout", str(tmp_path / "t.pdf"), "-"], capture_output=True, text=True
    ).stdout
    return [[line.strip() for line in p.split("\n") if line.strip()] for p in text.split("\f")]


def test_short_inline_code_is_never_broken_in_the_pdf(tmp_path):
    """Typst would break `<|endoftext|>` after a `|`: in every position on a line it stays whole,
    and code with spaces still breaks at them."""
    words = "The string `<|endoftext|>` typed by a user is an error, and `tok.encode(text, x)` too."
    body = "#show: book.with(title: \"T\", toc: false, cover: false)\n" + "\n\n".join(
        "word " * n + words for n in range(0, 40, 2)
    )
    lines = [line for page in typeset_pages(tmp_path, body) for line in page]
    assert sum("<|endoftext|>" in line for line in lines) == 20
    assert not [line for line in lines if "endoftext" in line and "<|endoftext|>" not in line]
    assert any(line.endswith("tok.encode(text,") for line in lines)  # broken at its space


def test_a_check_header_stays_with_its_code(tmp_path):
    """Wherever a check falls on a page, its "✓ checked" header is never the last line of a page,
    away from the code on the next."""
    check = "#check[#check-lines(([assert a == 1], [assert b == 2], [assert c == 3]))]\n"
    body = "#set page(height: 12cm, margin: 2cm)\n" + "".join(  # a text area 227pt high
        f"#pagebreak(weak: true)\nText.\n#v({at}pt)\n{check}" for at in range(180, 226, 2)
    )
    pages = typeset_pages(tmp_path, body)
    assert sum(p.count("✓ checked") for p in pages) == 23
    assert not [p for p in pages if p and p[-1] == "✓ checked"]
    for p in pages:  # the header and the first assert together
        if "✓ checked" in p:
            assert p[p.index("✓ checked") + 1] == "assert a == 1"


def test_a_figure_never_splits_a_code_block(tmp_path):
    """A figure stays where it is in the text: a float (`placement: auto`) lands between the two
    halves of a code cell or an output that breaks across a page, as it did on 17 pages of the book.
    Read in page order, every listing comes whole, and each caption between its neighbours."""
    (tmp_path / "f.png").write_bytes(png(40, 30))
    body, expected = '#show: book.with(title: "T", toc: false, cover: false)\n', []
    for n in range(6, 90, 7):  # the listings break at a different line each time
        code = [f"code {n} line {i}" for i in range(n)]
        listing = "```stdout\n" + "\n".join(code) + "\n```\n\n"
        body += f"Text {n} before.\n\n{listing}"
        body += f'#figure(image("f.png", width: 40%), caption: [Caption {n}.])\n\n'
        body += f"Then {n}:\n\n{listing}Text {n} after.\n\n"
        expected += [f"Text {n} before.", *code, f"Caption {n}.", f"Then {n}:", *code]
        expected += [f"Text {n} after."]
    lines = [line for page in typeset_pages(tmp_path, body) for line in page]
    assert [x for x in lines if x.startswith(("Text", "code", "Caption", "Then"))] == expected


@pytest.mark.parametrize("nb", [nb.name for nb in sorted((ROOT / "nbs").glob("*.ipynb"))])
def test_no_cell_prints_a_message_cut_short(nb):
    """A printed message is wrapped (textwrap.fill at 100 columns), not cut to fit: `str(e)[:90]`
    in a print ends the book's line in the middle of a sentence."""
    cells = nbformat.read(ROOT / "nbs" / nb, as_version=4).cells
    offenders = [
        f"{nb} cell {i}: {cut}"
        for i, cell in enumerate(cells)
        if cell.cell_type == "code"
        for cut in cut_prints(cell.source)
    ]
    assert not offenders, "\n".join(offenders)


def cut_prints(source):
    "`print` arguments that slice a message: `str(x)[:N]`, `f'...'[:N]`, `str(x).replace(..)[:N]`."
    try:
        with warnings.catch_warnings():  # a cell's "\\," in a string that is not raw
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except SyntaxError:  # IPython magics
        return []

    def message(node):
        while isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            node = node.func.value  # str(x).replace(...).strip()
        is_str = isinstance(node, ast.Call) and getattr(node.func, "id", None) == "str"
        return is_str or isinstance(node, ast.JoinedStr)

    return [
        ast.unparse(sub)
        for call in ast.walk(tree)
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "print"
        for arg in call.args
        for sub in ast.walk(arg)
        if isinstance(sub, ast.Subscript)
        and isinstance(sub.slice, ast.Slice)
        and sub.slice.lower is None
        and sub.slice.upper is not None
        and message(sub.value)
    ]


def test_cut_prints_are_found():
    assert cut_prints('try:\n    f()\nexcept ValueError as e:\n    print("no:", str(e)[:90])') == [
        "str(e)[:90]"
    ]
    assert cut_prints('print(" ", str(x.message).replace(d, "<dir>")[:80], f"{e}"[:5])') == [
        "str(x.message).replace(d, '<dir>')[:80]",
        "f'{e}'[:5]",
    ]
    assert cut_prints("print(val[:300], ids[:8], textwrap.fill(f'refused: {e}', 100))") == []
    assert cut_prints("%timeit f()") == []
