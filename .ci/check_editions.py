"""Check the editions of the built book: the offline site, the PDF and the downloads.

  * offline: a chapter opened from file:// in headless Chromium shows typeset math, requests
    nothing but files, and its search box finds a word; it and its notebook show their figures;
  * PDF (downloads/llm-from-scratch.pdf): an outline entry per chapter, each chapter on its
    own pages and showing its title and page number, and no raw TeX or snippet markers in
    the text it was printed from (print.html, typeset by MathJax in Chromium);
  * downloads: the notebooks bundle and one zip per chapter module, linked from the pages;
  * Colab: every chapter's "Open in Colab" link names a notebook that the build produced
    (the Pages workflow pushes site/notebooks/*.ipynb to the `notebooks` branch).
Usage: python .ci/check_editions.py [site_dir]   (Chromium at /usr/bin/chromium)
"""

import re
import sys
import time
import zipfile
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "hooks"))
import book_editions  # noqa: E402

SEARCH_WORD = "softmax"
BROKEN_IMAGES = "Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)"
RAW_MARKUP = ["\\frac", "$$", "\\(", "\\[", "--8<--"]


def nav_chapters() -> tuple[list[tuple[str, str]], str]:
    """(stem, title) of every chapter in mkdocs.yml's nav, in order, and extra.repository."""
    from mkdocs.config import load_config

    config = load_config(str(ROOT / "mkdocs.yml"))
    found = []

    def walk(items):
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            if isinstance(value, list):
                walk(value)
            elif isinstance(value, str) and value.startswith("chapters/"):
                lines = (ROOT / "docs" / value).read_text(encoding="utf-8").splitlines()
                title = next(line[2:].strip() for line in lines if line.startswith("# "))
                found.append((Path(value).stem, title))

    walk(config["nav"])
    return found, config["extra"]["repository"]


def check_offline(site: Path, failures: list) -> None:
    from playwright.sync_api import sync_playwright

    url = (site / "chapters" / "ch01_backprop.html").as_uri()
    with sync_playwright() as p:
        browser = book_editions.launch_chromium(p)
        page = browser.new_page()
        requests = []
        page.on("request", lambda request: requests.append(request.url))
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        book_editions.open_typeset(page, url)
        math = page.locator("mjx-container").count()
        page.locator("input[data-md-component=search-query]").fill(SEARCH_WORD)
        try:
            page.wait_for_selector(".md-search-result__item", timeout=20_000)
        except Exception:
            pass
        results = page.locator(".md-search-result__item").count()
        broken = {}  # page -> images that did not load from file://
        for name in ("chapters/ch01_backprop.html", "notebooks/ch01_backprop.html"):
            page.goto((site / name).as_uri(), wait_until="load")
            broken[name] = page.evaluate(BROKEN_IMAGES)
        browser.close()
    for name, images in broken.items():
        if images:
            failures.append(f"offline: {name} shows {len(images)} broken images from file://, e.g. {images[:2]}")
    outside = [r for r in requests if urlparse(r).scheme not in ("file", "data", "blob", "about")]
    print(f"offline: {url} -> {math} typeset formulas, {results} search results for "
          f"{SEARCH_WORD!r}, {len(outside)} requests outside the files")
    if math < 10:
        failures.append(f"offline: only {math} typeset formulas on {url}")
    if results == 0:
        failures.append(f"offline: the search for {SEARCH_WORD!r} shows no results from file:// "
                        f"(page errors: {errors[:3]})")
    if outside:
        failures.append(f"offline: the page requested {outside[:5]}")


def print_view_text(site: Path) -> str:
    """The text of print.html once MathJax has typeset it: what the PDF was printed from."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = book_editions.launch_chromium(p)
        page = book_editions.open_typeset(browser.new_page(), (site / book_editions.PRINT_PAGE).as_uri())
        text = page.inner_text("body")
        browser.close()
    return text


def check_pdf(site: Path, chapters: list, failures: list) -> None:
    """The PDF's pages, outline, titles and page numbers (pypdf), and its text without raw
    TeX or snippet markers (Chromium's text of the print view; pypdf needs seconds a page)."""
    from pypdf import PdfReader

    pdf = site / book_editions.PDF
    if not pdf.exists():
        failures.append(f"pdf: {pdf} was not printed (is Chromium at {book_editions.CHROMIUM} "
                        "and playwright installed for the build?)")
        return
    started = time.monotonic()
    reader = PdfReader(pdf)
    total = len(reader.pages)
    first_page = {}  # outline title -> index of its page

    def walk(items):
        for item in items:
            if isinstance(item, list):
                walk(item)
            else:
                first_page.setdefault(re.sub(r"\s+", " ", item.title).strip(), reader.get_destination_page_number(item))

    walk(reader.outline)
    if total < len(chapters):
        failures.append(f"pdf: {total} pages for {len(chapters)} chapters")
    starts = []
    for stem, title in chapters:
        wanted = re.sub(r"\s+", " ", title)
        if wanted not in first_page:
            failures.append(f"pdf: the outline has no entry {title!r}")
            continue
        index = first_page[wanted]
        starts.append(index)
        text = re.sub(r"\s+", " ", reader.pages[index].extract_text() or "")
        if wanted not in text:
            failures.append(f"pdf: page {index + 1}, where the outline puts {title!r}, does not show it")
        if f"{index + 1} / {total}" not in text:
            failures.append(f"pdf: page {index + 1} shows no page number '{index + 1} / {total}'")
    if starts != sorted(set(starts)):
        failures.append(f"pdf: the chapters do not start on pages of their own, in order: {starts}")
    print(f"pdf: {pdf.stat().st_size / 1e6:.1f} MB, {total} pages, {len(first_page)} outline "
          f"entries, chapters start on pages {[i + 1 for i in starts]} (read in {time.monotonic() - started:.0f} s)")

    text = print_view_text(site)
    for raw in RAW_MARKUP:
        if raw in text:
            at = text.index(raw)
            failures.append(f"pdf: raw {raw!r} in the printed text: {text[max(0, at - 60):at + 60]!r}")


def check_downloads(site: Path, chapters: list, repository: str, failures: list) -> None:
    home = (site / "index.html").read_text(encoding="utf-8")
    for uri in (book_editions.PDF, book_editions.NOTEBOOKS_ZIP):
        if f'href="{uri}"' not in home:
            failures.append(f"home page: no link to {uri}")
    bundle = site / book_editions.NOTEBOOKS_ZIP
    names = set(zipfile.ZipFile(bundle).namelist()) if bundle.exists() else set()
    notebooks = sorted(p.name for p in (site / "notebooks").glob("*.ipynb"))
    starters = sorted(p.name for p in (site / "starters").glob("*.py"))
    wanted = {f"notebooks/{n}" for n in notebooks} | {f"starters/{n}" for n in starters}
    if not notebooks or names != wanted:
        failures.append(f"{bundle.name}: holds {sorted(names)}, the site publishes {sorted(wanted)}")
    print(f"downloads: {bundle.name} holds {len(notebooks)} notebooks and {len(starters)} starters")

    for stem, title in chapters:
        page = (site / "chapters" / f"{stem}.html").read_text(encoding="utf-8")
        module_zip = site / book_editions.module_zip_uri(stem)
        if (ROOT / "code" / f"{stem}.py").exists():
            if f'href="../{book_editions.module_zip_uri(stem)}"' not in page or not module_zip.exists():
                failures.append(f"{stem}: no link to an existing {module_zip.name}")
            else:
                members = sorted(zipfile.ZipFile(module_zip).namelist())
                expected = sorted(f"{m}.py" for m in [stem, *book_editions.needs_of(stem)])
                if members != expected:
                    failures.append(f"{module_zip.name}: holds {members}, expected {expected}")
        colab = re.findall(r'href="(https://colab\.research\.google\.com/[^"]+)"', page)
        if (site / "notebooks" / f"{stem}.ipynb").exists():
            expected = book_editions.colab_url(repository, stem)
            if colab != [expected]:
                failures.append(f"{stem}: Colab link {colab}, expected {expected}")
        for link in colab:
            published = link.rpartition(f"/blob/{book_editions.NOTEBOOK_BRANCH}/")[2]
            if "/" in published or not (site / "notebooks" / published).exists():
                failures.append(f"{stem}: Colab link {link} names no notebook of site/notebooks/")


def main() -> int:
    site = Path(sys.argv[1] if len(sys.argv) > 1 else "site").resolve()
    chapters, repository = nav_chapters()
    failures = []
    started = time.monotonic()
    check_downloads(site, chapters, repository, failures)
    check_pdf(site, chapters, failures)
    check_offline(site, failures)
    for failure in failures:
        print("FAIL:", failure)
    print(f"editions check: {len(failures)} failures in {time.monotonic() - started:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
