#!/usr/bin/env python3
"""The HTML book in a real browser: `make check-book` runs this after `make book`.

It serves book/ over HTTP on 127.0.0.1 (as a reader's local server would: Pagefind's search does not
work from file://) and loads every page in headless Chromium (Debian's `chromium`, driven by
Playwright's Python API; `--chromium PATH` or $CHROMIUM for another), at 1280 px and at 390 px (a
phone). It fails, listing every problem, on:

- a console error or an uncaught exception; a request that fails or answers >= 400; any request that
  leaves the machine (the book must work offline: no CDN);
- a link inside the book to a page that does not exist, or to an id the page does not have; an image
  that did not load;
- a page wider than the viewport at 390 px (wide code, tables and formulas scroll in their box);
- at 1280 px, a code block or printed output of at most 100 columns that scrolls (100 columns must
  fit; a longer line, which tests/test_width.py forbids in code cells and outputs, is a warning);
- a MathML formula with zero width or height (outside a collapsed check);
- the search: "Bennet" must find something;
- the drawer on a phone: its button must open it (aria-expanded="true") and Escape close it;
- a code block without its copy button (book.js did not run).

    .venv/bin/python tools/check_book.py [--book book] [--screenshots DIR]
"""

import functools
import http.server
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

from fastcore.script import anno_parser

PAGE_FACTS = """() => {
  const closedCheck = (e) => e.closest('details:not([open])') !== null;
  const tooWide = document.documentElement.scrollWidth > window.innerWidth;
  let culprits = [];
  if (tooWide) {
    for (const e of document.querySelectorAll('main *, nav *, header *')) {
      const r = e.getBoundingClientRect();
      if (r.right > window.innerWidth + 1 && r.width > 0) {
        let scrolls = false;
        for (let p = e.parentElement; p; p = p.parentElement) {
          const s = getComputedStyle(p).overflowX;
          if ((s === 'auto' || s === 'scroll' || s === 'hidden') && p !== document.body
              && p !== document.documentElement) { scrolls = true; break; }
        }
        if (!scrolls) culprits.push(e.tagName.toLowerCase() + (e.className ? '.' + e.className : '')
                                    + ' (' + Math.round(r.right) + 'px)');
      }
      if (culprits.length >= 3) break;
    }
  }
  const scrolling = [...document.querySelectorAll('div.sourceCode pre, .cell-output pre')]
    .filter((p) => !closedCheck(p) && p.scrollWidth > p.clientWidth + 1)
    .map((p) => p.textContent.split('\\n').reduce((a, b) => (b.length > a.length ? b : a), ''));
  return {
    ids: [...document.querySelectorAll('[id]')].map((e) => e.id),
    links: [...document.querySelectorAll('a[href]')].map((a) => a.getAttribute('href')),
    brokenImages: [...document.images].filter((i) => !i.complete || i.naturalWidth === 0)
      .map((i) => i.getAttribute('src')),
    flatMaths: [...document.querySelectorAll('math')].filter((m) => {
      const r = m.getBoundingClientRect();
      return !closedCheck(m) && (r.width === 0 || r.height === 0);
    }).map((m) => m.textContent.trim().slice(0, 40)),
    maths: document.querySelectorAll('math').length,
    uncopyable: document.querySelectorAll('div.sourceCode:not(:has(> .copy-button))').length,
    width: document.documentElement.scrollWidth, viewport: window.innerWidth, culprits,
    scrolling,
  };
}"""


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # a browser that closed a connection early (a page closed while loading)


def serve(directory: Path):
    handler = functools.partial(Quiet, directory=str(directory))
    server = Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def find_chromium(given):
    for candidate in (given, os.environ.get("CHROMIUM"), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file():
            return candidate
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def check(book: Path, chromium: str, screenshots: Path | None = None):
    from playwright.sync_api import sync_playwright

    pages = sorted(p.name for p in book.glob("*.html"))
    if not pages:
        return [f"{book}: no HTML pages (run `make book` first)"], 0
    server, base = serve(book)
    problems, warnings, facts = [], [], {}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            for width, height in ((1280, 900), (390, 844)):
                context = browser.new_context(viewport={"width": width, "height": height})

                def route(r):
                    if r.request.url.startswith(base) or r.request.url.startswith("data:"):
                        return r.continue_()
                    problems.append(f"a request leaves the machine: {r.request.url}")
                    return r.abort()

                context.route("**/*", route)
                for name in pages:
                    where = f"{name} at {width}px"
                    page = context.new_page()
                    page.on(
                        "console",
                        lambda m, w=where: (
                            problems.append(f"{w}: console error: {m.text}")
                            if m.type == "error"
                            else None
                        ),
                    )
                    page.on("pageerror", lambda e, w=where: problems.append(f"{w}: {e}"))
                    page.on(
                        "requestfailed",
                        lambda r, w=where: problems.append(
                            f"{w}: request failed: {r.url} ({r.failure})"
                        ),
                    )
                    page.on(
                        "response",
                        lambda r, w=where: (
                            problems.append(f"{w}: {r.status} for {r.url}")
                            if r.status >= 400
                            else None
                        ),
                    )
                    page.goto(base + name, wait_until="load")
                    f = page.evaluate(PAGE_FACTS)
                    facts.setdefault(name, f)
                    problems += [f"{where}: image did not load: {s}" for s in f["brokenImages"]]
                    if f["uncopyable"]:
                        n = f["uncopyable"]
                        problems.append(f"{where}: {n} code blocks without a copy button")
                    problems += [f"{where}: a formula has zero size: {m!r}" for m in f["flatMaths"]]
                    if width == 390 and f["width"] > f["viewport"]:
                        problems.append(
                            f"{where}: the page is {f['width']}px wide, wider than the screen: "
                            + (", ".join(f["culprits"]) or "?")
                        )
                    for line in f["scrolling"] if width == 1280 else []:
                        message = f"{where}: a code block scrolls: {len(line)} columns, {line!r}"
                        if len(line) > 100:
                            warnings.append(message + " (the book's line width is 100)")
                        else:
                            problems.append(message)
                    if screenshots and name in ("index.html", "04_attention.html", "15_chat.html"):
                        screenshots.mkdir(parents=True, exist_ok=True)
                        page.screenshot(path=str(screenshots / f"{Path(name).stem}-{width}.png"))
                    if width == 390 and name == pages[0]:
                        problems += drawer_problems(page, where)
                    if width == 1280 and name == "index.html":
                        problems += search_problems(page, where)
                    page.close()
                context.close()
            browser.close()
    finally:
        server.shutdown()
    problems += link_problems(book, base, facts)
    for w in dict.fromkeys(warnings):
        print(f"check_book: warning: {w}", file=sys.stderr)
    return list(dict.fromkeys(problems)), len(pages)


def drawer_problems(page, where):
    out = []
    button = page.locator(".nav-button")
    if not button.is_visible():
        return [f"{where}: no visible contents button on a phone"]
    button.click()
    if button.get_attribute("aria-expanded") != "true" or not page.locator("#sidebar").is_visible():
        out.append(f"{where}: the contents button does not open the drawer")
    page.keyboard.press("Escape")
    if button.get_attribute("aria-expanded") != "false" or page.locator("#sidebar").is_visible():
        out.append(f"{where}: Escape does not close the drawer")
    return out


def search_problems(page, where, term="Bennet"):
    box = page.locator(".pagefind-ui__search-input")
    try:
        box.wait_for(timeout=10000)
    except Exception:
        return [f"{where}: no search box (Pagefind's UI did not load)"]
    box.fill(term)
    try:
        page.locator(".pagefind-ui__result").first.wait_for(timeout=20000)
    except Exception:
        return [f"{where}: searching for {term!r} finds nothing"]
    return []


def link_problems(book: Path, base: str, facts: dict):
    out = []
    for name, f in facts.items():
        for href in f["links"]:
            url = urljoin(base + name, href)
            if not url.startswith(base):
                continue  # another site: not followed (the book reads offline)
            parts = urlsplit(url)
            target = unquote(parts.path[len(urlsplit(base).path) :]) or "index.html"
            if target not in facts:
                if not (book / target).is_file():
                    out.append(f"{name}: broken link {href} ({target} does not exist)")
                continue
            frag = unquote(parts.fragment)
            if frag and frag not in facts[target]["ids"]:
                out.append(f"{name}: broken link {href} ({target} has no id {frag!r})")
    return out


def check_book(
    book: str = "book",  # the rendered book
    chromium: str = None,  # the browser (default: /usr/bin/chromium)
    screenshots: str = None,  # save a few screenshots into this folder
) -> int:
    "Check the HTML book in headless Chromium."
    chromium = find_chromium(chromium)
    if not chromium:
        print(
            "check_book: error: Chromium is missing: `apt-get install chromium` (as root)",
            file=sys.stderr,
        )
        return 1
    try:
        import playwright  # noqa: F401
    except ImportError:
        print("check_book: error: playwright is missing: run `make venv`", file=sys.stderr)
        return 1
    start = time.time()
    shots = Path(screenshots) if screenshots else None
    problems, n = check(Path(book), chromium, shots)
    for p in problems:
        print(f"check_book: {p}", file=sys.stderr)
    print(
        f"check_book: {n} pages at 1280 and 390 px, {len(problems)} problems, "
        f"in {time.time() - start:.0f} s"
    )
    return 1 if problems else 0


def main(argv=None) -> int:
    "`tools/check_book.py [options]`: `check_book` with the options of the command line."
    args = vars(anno_parser(check_book, prog="tools/check_book.py").parse_args(argv))
    args.pop("pdb", None), args.pop("xtra", None)  # fastcore's own options
    return check_book(**args)


if __name__ == "__main__":
    sys.exit(main())
