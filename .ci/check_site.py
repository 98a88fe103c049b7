"""Look at the built site the way a reader's browser does (headless Chromium).

Serves site/ on 127.0.0.1, opens pages, and checks that
  * every request a page makes stays on 127.0.0.1 (no CDN, no web fonts);
  * a chapter page shows typeset math and real code (no snippet markers left);
  * a notebook page shows its outputs and typeset math.
Usage: python .ci/check_site.py [site_dir]   (Chromium at /usr/bin/chromium)
"""

import functools
import http.server
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

from playwright.sync_api import sync_playwright

CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(site: Path) -> http.server.ThreadingHTTPServer:
    handler = functools.partial(QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


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


def main() -> int:
    site = Path(sys.argv[1] if len(sys.argv) > 1 else "site").resolve()
    server = serve(site)
    base = f"http://127.0.0.1:{server.server_port}/"
    shots = site.parent / ".cache" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    failures = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        pages = {
            "home": base,
            "chapter": base + "chapters/ch01_backprop/",
            "notebook": base + "notebooks/ch01_backprop/",
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
            if name == "notebook" and "hand-written backward == autograd" not in facts["text"]:
                failures.append("notebook: the executed outputs are missing")
        browser.close()
    server.shutdown()
    for failure in failures:
        print("FAIL:", failure)
    print(f"site check: {len(pages) - len({f.split()[0] for f in failures})} passed, "
          f"{len({f.split()[0] for f in failures})} failed; screenshots in {shots}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
