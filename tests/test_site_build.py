"""The site build (hooks/book_mkdocs.py): outputs under code blocks, links, serve in the background.

The whole built site is checked by .ci/check_site.py (every link of every page, reading width in
a browser); these tests check the pieces on small synthetic pages, without a build.
"""

import base64
import functools
import posixpath
import re
import threading
from types import SimpleNamespace

import markdown
import nbformat
import pytest

import book_mkdocs
import book_pages

PAGE = '''# A page

Some text.

```python
print("<b> & x")
```

=== "A tab"

    ```python
    1 + 1
    ```

```python
x = 1
```

```python
for i in range(100):
    print("line", i)
```
'''
PNG = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d4944415478da63f8cf"
    "c0f01f0005000201a5d2a4dd0000000049454e44ae426082"
)).decode()


@functools.cache
def _site_markdown():
    """A Markdown converter with the site's extensions, configured as in mkdocs.yml."""
    from mkdocs.config import load_config

    config = load_config(str(book_pages.ROOT / "mkdocs.yml"))
    return config["markdown_extensions"], config["mdx_configs"]


def to_html(text):
    extensions, configs = _site_markdown()
    return markdown.Markdown(extensions=extensions, extension_configs=configs).convert(text)


def executed(page):
    """The page's notebook, with outputs as a kernel would have recorded them."""
    blocks = book_pages.page_blocks(page)
    nb = book_pages.page_notebook(page, blocks)
    cells = [c for c in nb.cells if c.cell_type == "code"]
    cells[0].outputs = [nbformat.v4.new_output("stream", name="stdout", text="<b> & x\n")]
    cells[1].outputs = [
        nbformat.v4.new_output("execute_result", data={"text/plain": "2"}, execution_count=2),
        nbformat.v4.new_output("display_data", data={"image/png": PNG, "text/plain": "<Figure>"}),
    ]
    cells[3].outputs = [
        nbformat.v4.new_output("stream", name="stdout", text="".join(f"line {i}\n" for i in range(50))),
        nbformat.v4.new_output("stream", name="stdout", text="".join(f"line {i}\n" for i in range(50, 100))),
    ]
    stored = page.with_suffix(".ipynb")  # as the tests store it, and as the build reads it
    book_pages.save_executed(stored, nb)
    return blocks, book_mkdocs.read_notebook(stored)


@pytest.fixture
def page(tmp_path):
    path = tmp_path / "page.md"
    path.write_text(PAGE, encoding="utf-8")
    return path


def render(page, blocks, nb, stale_ok=False):
    text, replacements = book_mkdocs.render_outputs(PAGE, 0, blocks, nb, stale_ok=stale_ok, page="page.md")
    return book_mkdocs.fill_placeholders(to_html(text), replacements)


def test_each_block_shows_its_outputs_right_under_it(page):
    blocks, nb = executed(page)
    html = render(page, blocks, nb)
    assert html.count('<div class="book-output">') == 3  # `x = 1` prints nothing: no box
    # Printed text is escaped, and its box follows the block that printed it.
    first_code, first_output = html.index("print"), html.index("&lt;b&gt; &amp; x")
    assert first_code < first_output < html.index("1</span> <span")  # before the tab's block
    # The output of a block inside a tab stays inside that tab.
    tab = html[html.index('<div class="tabbed-block">'):]
    tab = tab[:tab.index("</div>\n</div>")]
    assert '<pre class="book-output-result">2</pre>' in tab
    assert f'src="data:image/png;base64,{PNG}"' in tab
    assert "&lt;Figure&gt;" not in html  # a figure shows as the image, not its text


def test_a_long_output_shows_its_start_and_end_with_a_note(page):
    blocks, nb = executed(page)
    html = render(page, blocks, nb)
    box = html[html.rindex('<div class="book-output">'):]
    assert "line 0\n" in box and "line 99</pre>" in box  # two stream outputs, one box
    assert "line 50\n" not in box
    assert f"… {100 - book_mkdocs.MAX_OUTPUT_LINES} more lines" in box


def test_terminal_text_is_cleaned():
    html = book_mkdocs.output_html([
        nbformat.v4.new_output("stream", name="stderr", text="\x1b[31mwarning\x1b[0m\nstep 1\rstep 2\n"),
    ])
    assert '<pre class="book-output-stderr">warning\nstep 2</pre>' in html


def test_the_build_refuses_outputs_of_other_code(page):
    blocks, nb = executed(page)
    edited = PAGE.replace("x = 1", "x = 2")
    page.write_text(edited, encoding="utf-8")
    new_blocks = book_pages.page_blocks(page)
    with pytest.raises(book_mkdocs.StaleOutputs, match="line 15"):
        book_mkdocs.block_outputs(new_blocks, nb, stale_ok=False, page="page.md")
    # `mkdocs serve` shows what still matches: the blocks whose code is unchanged.
    outputs = book_mkdocs.block_outputs(new_blocks, nb, stale_ok=True, page="page.md")
    assert sorted(outputs) == [5, 11, 19]
    page.write_text(PAGE.replace('print("<b> & x")', 'print("changed")'), encoding="utf-8")
    outputs = book_mkdocs.block_outputs(book_pages.page_blocks(page), nb, stale_ok=True, page="page.md")
    assert sorted(outputs) == [11, 19]


def test_serve_shows_the_page_at_once_and_runs_its_notebook_in_the_background(page, tmp_path, monkeypatch):
    monkeypatch.setattr(book_mkdocs, "_serving", True)
    monkeypatch.setattr(book_mkdocs, "background", book_mkdocs.Background())
    monkeypatch.setattr(book_mkdocs, "STAGING", tmp_path / "staging")
    monkeypatch.setattr(book_mkdocs, "_chapters", {})
    monkeypatch.setattr(book_mkdocs, "READY", tmp_path / "serve" / "ready")
    monkeypatch.setattr(book_pages, "NOTEBOOK_CACHE", tmp_path / "notebooks")
    ran = []
    monkeypatch.setattr(book_mkdocs, "execute_into_cache", lambda page, nb, path: ran.append(path))
    config = {"site_dir": str(tmp_path / "site"), "use_directory_urls": True}
    files = []
    book_mkdocs._add_notebook(files, config, page, [])
    assert ran == []  # nothing ran before the page is served
    state = book_mkdocs._chapters[page.stem]
    assert state["kind"] == "running" and state["path"] is None
    assert files == []  # no notebook page until the notebook has run
    assert "outputs appear once the notebook has run" in book_mkdocs._note(state, page)
    book_mkdocs._add_notebook([], config, page, [])  # a rebuild queues no second run
    assert book_mkdocs.background.jobs.qsize() == 1

    book_mkdocs.background.start()  # on_serve starts it, once the server watches READY
    _wait_for(lambda: book_mkdocs.READY.exists())
    assert ran == [book_mkdocs.page_notebook_state(page)[2]]  # where the next rebuild looks


def _wait_for(condition, seconds=20):
    event = threading.Event()
    for _ in range(seconds * 20):
        if condition():
            return
        event.wait(0.05)
    raise AssertionError("timed out")


def test_a_failed_background_job_is_reported_once_and_not_retried(tmp_path, monkeypatch):
    monkeypatch.setattr(book_mkdocs, "READY", tmp_path / "ready")
    work = book_mkdocs.Background()

    def fail():
        raise RuntimeError("the kernel died")

    work.submit("notebook of a.md [1]", fail)
    work.start()
    _wait_for(lambda: (tmp_path / "ready").exists())
    assert work.failed == {"notebook of a.md [1]": "RuntimeError: the kernel died"}
    work.submit("notebook of a.md [1]", fail)
    assert work.jobs.qsize() == 0 and not work.waiting


def test_notebooks_carry_the_modules_without_section_markers():
    page = book_pages.DOCS_DIR / "chapters" / "ch02_tokenizer.md"
    nb = book_pages.page_notebook(page)
    setup = [c.source for c in nb.cells if c.metadata.get("book_setup")]
    assert setup, "the chapter imports its module, so a setup cell writes it"
    assert not any("--8<--" in cell.source for cell in nb.cells)
    module = (book_pages.CODE_DIR / "ch02_tokenizer.py").read_text(encoding="utf-8")
    kept = [line for line in module.split("\n") if "# --8<-- [" not in line]
    assert setup[-1] == "%%writefile ch02_tokenizer.py\n" + "\n".join(kept)  # nothing else changed


def test_chapter_links_resolve_from_the_chapter_page():
    urls = {  # (url, dest_uri); the notebook is the page mkdocs-jupyter makes of it
        "notebooks/ch01_backprop.ipynb": ("notebooks/ch01_backprop/", "notebooks/ch01_backprop/index.html"),
        "starters/ch01_backprop.py": ("starters/ch01_backprop.py", "starters/ch01_backprop.py"),
    }
    files = SimpleNamespace(get_file_from_path=lambda path: SimpleNamespace(
        url=urls[path][0], dest_uri=urls[path][1]) if path in urls else None)
    page = SimpleNamespace(file=SimpleNamespace(src_uri="chapters/ch01_backprop.md"), url="chapters/ch01_backprop/")
    config = {"extra": {"repository": "owner/book"}}
    line = book_mkdocs.chapter_links(page, config, files)
    hrefs = re.findall(r'href="([^"]+)"', line)  # raw HTML: MkDocs leaves these addresses as they are
    resolved = [posixpath.normpath(posixpath.join("/chapters/ch01_backprop/", h)) for h in hrefs if "://" not in h]
    assert resolved == [
        "/notebooks/ch01_backprop",
        "/notebooks/ch01_backprop/ch01_backprop.ipynb",
        "/starters/ch01_backprop.py",
    ]


def test_the_server_rebuilds_once_a_page_is_complete_not_after_each_job(tmp_path, monkeypatch):
    ready = tmp_path / "ready"
    monkeypatch.setattr(book_mkdocs, "READY", ready)
    work = book_mkdocs.Background()
    seen = []
    work.submit("figure 1", lambda: seen.append(ready.exists()), "a.md")
    work.submit("notebook of a.md", lambda: seen.append(ready.exists()), "a.md")
    work.submit("notebook of b.md", lambda: seen.append(ready.read_text()), "b.md")
    work.start()
    _wait_for(lambda: ready.exists() and ready.read_text() == "notebook of b.md\n")
    assert seen == [False, False, "notebook of a.md\n"]


def test_notebook_links_lead_to_the_site_pages_and_code_keeps_its_brackets(tmp_path):
    chapter = book_pages.DOCS_DIR / "chapters" / "ch09_any.md"
    text = "See [Chapter 2](ch02_tokenizer.md#bpe), [data](../data/run.json) and [here](#top)."
    assert book_pages.notebook_links(text, chapter, directory_urls=True) == (
        "See [Chapter 2](../../chapters/ch02_tokenizer/#bpe), [data](../../data/run.json) and [here](#top).")
    assert book_pages.notebook_links(text, chapter, directory_urls=False) == (
        "See [Chapter 2](../chapters/ch02_tokenizer.html#bpe), [data](../data/run.json) and [here](#top).")
    page = tmp_path / "page.md"
    page.write_text('# T\n\n[a](b.md)\n\n```python\ncalls = {"n": len}\nprint(calls["n"]("ab"))\n```\n')
    nb = book_pages.page_notebook(page)  # raises if a cell differs from its block
    assert [c.source for c in nb.cells if c.cell_type == "code"] == ['calls = {"n": len}\nprint(calls["n"]("ab"))']
    assert "[a](../b.html)" in nb.cells[0].source or "[a](../../b/)" in nb.cells[0].source
