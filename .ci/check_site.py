"""Look at the built site the way a reader does: follow every link, and open pages in a browser.

Serves site/ on 127.0.0.1, then
  * crawls every HTML page (from the home page, and every .html file of the site) and requests
    every same-origin link, image, script and stylesheet it names: any answer >= 400 fails, and
    so does a #fragment that is not an id on its target page; links to other hosts are listed;
  * checks that every chapter page shows the outputs of its code, and never says they are
    stale or missing (that is only for `mkdocs serve`);
  * in headless Chromium: every request a page makes stays on 127.0.0.1 (no CDN, no web
    fonts); a chapter page shows typeset math and real code (no snippet markers left); a
    notebook page shows its outputs and typeset math;
  * reading width: at 1280x800 no code block of a chapter page whose lines are at most
    LINE_LENGTH characters scrolls sideways (screenshots in .cache/screenshots/).
Usage: python .ci/check_site.py [site_dir]   (Chromium at /usr/bin/chromium)
"""

import functools
import html.parser
import http.server
import sys
import threading
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
LINE_LENGTH = 100  # the longest line of code that must fit the content column at 1280 px
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
STALE_NOTES = ("outputs on this page are from an older version", "outputs appear once the notebook has run",
               "failed to run, so it shows no outputs")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(site: Path) -> http.server.ThreadingHTTPServer:
    handler = functools.partial(QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# ---------------------------------------------------------------------------
# Links: plain HTTP requests over every page of the site
# ---------------------------------------------------------------------------


class PageParser(html.parser.HTMLParser):
    """The ids of a page and the addresses it refers to."""

    LINKS = {("a", "href"), ("link", "href"), ("script", "src"), ("img", "src"), ("source", "src"),
             ("iframe", "src")}

    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.outputs = 0  # boxes of code outputs (hooks/book_mkdocs.py)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("id", "name"):
            if attrs.get(name):
                self.ids.add(attrs[name])
        for element, attribute in self.LINKS:
            if tag == element and attrs.get(attribute):
                self.links.append(attrs[attribute])
        if tag == "div" and attrs.get("class") == "book-output":
            self.outputs += 1


class Crawler:
    def __init__(self, base: str):
        self.base = base
        self.fetched: dict[str, tuple[int, str | None]] = {}  # url -> (status, HTML text or None)
        self.pages: dict[str, PageParser] = {}
        self.external: Counter = Counter()
        self.failures: list[str] = []
        self.links_checked = 0

    def fetch(self, url: str) -> tuple[int, str | None]:
        if url not in self.fetched:
            try:
                with urllib.request.urlopen(url, timeout=30) as response:
                    body = response.read()
                    is_html = response.headers.get_content_type() == "text/html"
                    self.fetched[url] = (response.status, body.decode("utf-8", "replace") if is_html else None)
            except urllib.error.HTTPError as error:
                self.fetched[url] = (error.code, None)
        return self.fetched[url]

    def parsed(self, url: str) -> PageParser | None:
        if url not in self.pages:
            status, text = self.fetch(url)
            if text is None:
                return None
            parser = PageParser()
            parser.feed(text)
            self.pages[url] = parser
        return self.pages[url]

    def crawl(self, start: list[str]) -> None:
        todo = list(start)
        seen = set(todo)
        while todo:
            url = todo.pop(0)
            page = self.parsed(url)
            if page is None:
                continue
            for link in page.links:
                target = self.check_link(url, page, link)
                if target and target not in seen and self.parsed(target) is not None:
                    seen.add(target)
                    todo.append(target)

    def check_link(self, page_url: str, page: PageParser, link: str) -> str | None:
        """Check one link of a page; return the page it leads to, if on this site."""
        absolute = urljoin(page_url, link)
        parts = urlparse(absolute)
        if parts.scheme in ("mailto", "data", "javascript", "blob"):
            return None
        if not absolute.startswith(self.base):
            self.external[f"{parts.scheme}://{parts.hostname}"] += 1
            return None
        self.links_checked += 1
        target = absolute.split("#")[0].split("?")[0]
        where = f"{page_url[len(self.base) - 1:]} links to {link}"
        status, _ = self.fetch(target)
        if status >= 400:
            self.failures.append(f"{where}: HTTP {status}")
            return None
        fragment = unquote(parts.fragment)
        if fragment:
            linked = page if target == page_url.split("#")[0] else self.parsed(target)
            if linked is None or fragment not in linked.ids:
                self.failures.append(f"{where}: no id {fragment!r} on {target[len(self.base) - 1:]}")
        return target


def check_links(site: Path, base: str) -> tuple[list[str], Crawler]:
    crawler = Crawler(base)
    every_page = [base + str(p.relative_to(site)).replace("index.html", "") for p in sorted(site.rglob("*.html"))]
    crawler.crawl([base] + every_page)
    failures = list(crawler.failures)
    for url, page in crawler.pages.items():
        path = url[len(base) - 1:]
        if path.startswith("/chapters/") and page.outputs == 0:
            failures.append(f"{path} shows no outputs under its code blocks")
        text = crawler.fetched[url][1] or ""
        for note in STALE_NOTES:
            if note in text:
                failures.append(f"{path} says: {note!r} (only `mkdocs serve` may show a page unfinished)")
    print(f"links: {len(crawler.pages)} pages, {crawler.links_checked} links on this site checked, "
          f"{len(crawler.failures)} broken")
    for host, count in sorted(crawler.external.items()):
        print(f"  not checked (outside the site): {count} links to {host}")
    return failures, crawler


# ---------------------------------------------------------------------------
# In a browser
# ---------------------------------------------------------------------------


def check_page(browser, url: str, shot: Path) -> dict:
    page = browser.new_page()
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    missing = []
    page.on("response", lambda r: missing.append(r.url) if r.status >= 400 else None)
    page.goto(url, wait_until="networkidle")
    page.wait_for_timeout(1500)  # MathJax typesets after load
    outside = [r for r in requests
               if urlparse(r).scheme not in ("data", "blob") and urlparse(r).hostname != "127.0.0.1"]
    facts = {
        "requests": len(requests),
        "outside": outside,
        "missing": missing,
        "math": page.locator("mjx-container").count(),
        "text": page.inner_text("body"),
        "code": " ".join(page.locator("pre").all_inner_texts()),
    }
    page.screenshot(path=str(shot), full_page=False)
    page.close()
    return facts


WIDE_CODE = """() => [...document.querySelectorAll('pre > code')]
    .filter(code => code.scrollWidth > code.clientWidth + 1)
    .map(code => Math.max(...code.textContent.split('\\n').map(line => line.length)))"""


def check_width(browser, urls: list[str], shots: Path) -> list[str]:
    """At 1280x800, code blocks whose lines fit LINE_LENGTH must not scroll sideways."""
    failures = []
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    for number, url in enumerate(urls):
        page.goto(url, wait_until="load")
        scrolling = page.evaluate(WIDE_CODE)  # the longest line of each block that scrolls
        short = [n for n in scrolling if n <= LINE_LENGTH]
        name = urlparse(url).path.strip("/").split("/")[-1]
        print(f"width at 1280 px: {name}: {len(scrolling)} code blocks scroll sideways"
              + (f" (longest lines {sorted(scrolling)})" if scrolling else ""))
        if short:
            failures.append(f"{name}: at 1280 px, {len(short)} code blocks with lines of at most "
                            f"{LINE_LENGTH} characters scroll sideways (longest lines {sorted(short)})")
        if number == 0:
            page.screenshot(path=str(shots / "chapter-1280.png"), full_page=False)
    page.close()
    return failures


def long_code_lines() -> list[str]:
    """Lines of code/ longer than LINE_LENGTH: they scroll sideways on a laptop screen."""
    return [f"{path.relative_to(ROOT)}:{number}: {len(line)} characters"
            for path in sorted((ROOT / "code").glob("*.py"))
            for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1)
            if len(line) > LINE_LENGTH]


def main() -> int:
    site = Path(sys.argv[1] if len(sys.argv) > 1 else "site").resolve()
    server = serve(site)
    base = f"http://127.0.0.1:{server.server_port}/"
    shots = site.parent / ".cache" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    failures, crawler = check_links(site, base)
    chapters = sorted(url for url in crawler.pages if urlparse(url).path.startswith("/chapters/ch"))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        pages = {  # pages are chapters/x/ or chapters/x.html (Material's offline plugin)
            "home": base,
            "chapter": next(url for url in chapters if "/chapters/ch01_backprop" in url),
            "notebook": next(url for url in crawler.pages if "/notebooks/ch01_backprop" in url),
        }
        for name, url in pages.items():
            facts = check_page(browser, url, shots / f"{name}.png")
            print(f"{name}: {url} -> {facts['requests']} requests, {len(facts['outside'])} outside "
                  f"127.0.0.1, {facts['math']} typeset formulas")
            if facts["outside"]:
                failures.append(f"{name} requested outside 127.0.0.1: {facts['outside'][:5]}")
            if facts["missing"]:
                failures.append(f"{name}: broken links to {facts['missing'][:5]}")
            if "--8<--" in facts["text"]:
                failures.append(f"{name} shows a raw snippet marker")
            if name in ("chapter", "notebook"):
                if facts["math"] < 10:
                    failures.append(f"{name}: only {facts['math']} typeset formulas")
                if "class Value" not in facts["code"]:
                    failures.append(f"{name}: the code of the chapter is missing")
            if "hand-written backward == autograd" not in facts["text"] and name != "home":
                failures.append(f"{name}: the executed outputs are missing")
        failures += check_width(browser, chapters, shots)
        browser.close()
    server.shutdown()
    too_long = long_code_lines()
    print(f"code/: {len(too_long)} lines longer than {LINE_LENGTH} characters (they scroll on a 1280 px screen)"
          + "".join(f"\n  {line}" for line in too_long[:10]) + ("\n  ..." if len(too_long) > 10 else ""))
    for failure in failures:
        print("FAIL:", failure)
    print(f"site check: {'failed, ' + str(len(failures)) + ' faults' if failures else 'passed'}; "
          f"screenshots in {shots}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
