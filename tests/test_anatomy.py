"""Every chapter has the anatomy of a textbook chapter (issue: the book teaches).

A chapter notebook `nbs/NN_*.ipynb` (NN = its chapter number):
- opens with why it matters and "In this chapter you will" followed by a list of 3-6 goals, before
  its first section;
- ends with `## Summary` (a bulleted list of the concepts), `## Test yourself` (a numbered list of
  at least five questions) and `## Exercises` (at least three, each a paragraph starting `**Exercise
  N.k**`), in that order;
- has a worked solution for every exercise in an appendix notebook (`### Exercise N.k`, followed by
  at least one code cell that nbval runs) and an answer for every question (under a heading labelled
  `#sec-answers-NN-quiz`);
- refers to each of its figures by number (`@fig-...`) at least once;
- names no `@sec-` label inside code (a comment there is not rendered as a link);
- follows each `# NBVAL_IGNORE_OUTPUT` cell with a cell that asserts what the prose claims.
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
CHAPTERS = sorted(p for p in NBS.glob("[0-9][0-9]_*.ipynb"))
APPENDICES = sorted(p for p in NBS.glob("[A-Z]_*.ipynb"))


def cells(path):
    return [(c["cell_type"], "".join(c["source"])) for c in json.loads(path.read_text())["cells"]]


def section(md_cells, title):
    "The markdown from the `## title` heading to the next `## ` heading."
    text = "\n\n".join(md_cells)
    m = re.search(rf"^## {title}\b.*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
    return m.group(1) if m else None


def items(text, numbered):
    pattern = r"^\d+\.\s+\S" if numbered else r"^[-*]\s+\S"
    return len(re.findall(pattern, text or "", re.M))


def test_chapters_are_numbered_by_file():
    numbers = [int(p.name[:2]) for p in CHAPTERS]
    assert numbers == list(range(1, len(CHAPTERS) + 1)), [p.name for p in CHAPTERS]


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_anatomy(path):
    n = int(path.name[:2])
    cs = cells(path)
    md = [s for t, s in cs if t == "markdown"]
    problems = []
    intro = []
    for s in md:
        if re.search(r"^## ", s, re.M):
            intro.append(re.split(r"^## ", s, flags=re.M)[0])
            break
        intro.append(s)
    intro = "\n\n".join(intro)
    goals = re.search(r"In this chapter you will(.*)", intro, re.S)
    k = items(goals.group(1), numbered=False) + items(goals.group(1), True) if goals else 0
    if not 3 <= k <= 6:
        problems.append(
            f"'In this chapter you will' with 3-6 goals before the first section (found {k})"
        )
    heads = [h for s in md for h in re.findall(r"^## (.+?)\s*(?:\{.*\})?$", s, re.M)]
    tail = [h for h in heads if h in ("Summary", "Test yourself", "Exercises")]
    if tail != ["Summary", "Test yourself", "Exercises"] or heads[-3:] != tail:
        problems.append(
            f"the last sections must be Summary, Test yourself, Exercises (found {heads[-4:]})"
        )
    if items(section(md, "Summary"), numbered=False) < 3:
        problems.append("Summary: at least 3 bullets")
    questions = items(section(md, "Test yourself"), numbered=True)
    if questions < 5:
        problems.append(f"Test yourself: at least 5 numbered questions (found {questions})")
    exercises = re.findall(rf"^\*\*Exercise {n}\.(\d+)\*\*", section(md, "Exercises") or "", re.M)
    if len(exercises) < 3:
        problems.append(
            f"Exercises: at least 3 paragraphs starting **Exercise {n}.k** (found {len(exercises)})"
        )
    # solutions and answers in the appendices
    for k in exercises:
        if not _has_solution(n, k):
            problems.append(
                f"Exercise {n}.{k}: no `### Exercise {n}.{k}` with a code cell in an appendix"
            )
    answers = _answers(n)
    if answers < questions:
        problems.append(
            f"answers: {answers} under #sec-answers-{n:02d}-quiz for {questions} questions"
        )
    # figures referred to by number
    text = "\n".join(s for p in [*CHAPTERS, *APPENDICES, NBS / "index.ipynb"] for _, s in cells(p))
    labels = set()
    for t, s in cs:
        labels |= set(re.findall(r"^#\|\s*label:\s*(fig-[\w-]+)", s, re.M) if t == "code" else [])
        labels |= set(re.findall(r"\{#(fig-[\w-]+)", s) if t == "markdown" else [])
    for label in sorted(labels):
        if f"@{label}" not in text:
            problems.append(f"{label} is never referred to as @{label}")
    for i, (t, s) in enumerate(cs):
        if t == "code" and "@sec-" in s:
            problems.append(f"cell {i}: @sec- inside code")
    code = [(i, s) for i, (t, s) in enumerate(cs) if t == "code"]
    for i, s in code:  # Quarto reads cell options only at the top of a cell
        lines = s.splitlines()
        top = next((k for k, line in enumerate(lines) if not line.startswith("#|")), len(lines))
        if any(line.startswith("#|") for line in lines[top:]):
            problems.append(f"cell {i}: a `#|` option after the cell's first other line")
    for (i, s), (j, nxt) in zip(code, code[1:] + [(None, "")]):
        if "NBVAL_IGNORE_OUTPUT" in s and not re.search(r"^\s*assert\b", nxt, re.M):
            problems.append(f"cell {i}: NBVAL_IGNORE_OUTPUT not followed by an assert cell")
    assert not problems, f"{path.name}:\n  " + "\n  ".join(problems)


def _appendix_cells():
    return [c for p in APPENDICES for c in cells(p)]


def _has_solution(n, k):
    cs = _appendix_cells()
    for i, (t, s) in enumerate(cs):
        if t == "markdown" and re.search(rf"^### Exercise {n}\.{k}\b", s, re.M):
            for t2, s2 in cs[i + 1 :]:
                if t2 == "markdown" and re.search(r"^#{1,3} ", s2, re.M):
                    return False
                if t2 == "code" and s2.strip():
                    return True
    return False


def _answers(n):
    for t, s in _appendix_cells():
        m = re.search(rf"\{{#sec-answers-{n:02d}-quiz\}}(.*?)(?=^#{{1,3}} |\Z)", s, re.M | re.S)
        if t == "markdown" and m:
            return items(m.group(1), numbered=True)
    return 0
