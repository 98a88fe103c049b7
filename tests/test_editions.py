"""The book's editions: the GitHub workflows, the Colab links, the offline site and the
downloads that hooks/book_editions.py generates (.ci/check_editions.py looks at the built
site itself: the PDF, the offline search)."""

import ast
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "hooks"))
import book_editions  # noqa: E402
import book_pages  # noqa: E402

WORKFLOWS = ROOT / ".github" / "workflows"
MODULES = sorted(p.stem for p in (ROOT / "code").glob("ch[0-9][0-9]_*.py"))


def readme_command(marker):
    """The command on the line after ``<!-- marker -->`` in README.md."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    return lines[lines.index(f"<!-- {marker} -->") + 1].strip()


def workflow(name):
    data = yaml.safe_load((WORKFLOWS / name).read_text(encoding="utf-8"))
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as True
    return data


def steps(data):
    return [step for job in data["jobs"].values() for step in job.get("steps", [])]


def runs(data):
    return [step["run"].strip() for step in steps(data) if "run" in step]


def uses(data):
    return [step["uses"].split("@")[0] for step in steps(data) if "uses" in step]


def test_pages_workflow_builds_strictly_and_deploys_with_githubs_pages_actions():
    pages = workflow("pages.yml")
    assert pages["on"]["push"]["branches"] == ["main"]
    assert pages["permissions"]["pages"] == "write"
    assert pages["permissions"]["id-token"] == "write"
    assert {"actions/checkout", "actions/configure-pages", "actions/upload-pages-artifact",
            "actions/deploy-pages", "actions/cache"} <= set(uses(pages))
    deploy = next(job for job in pages["jobs"].values()
                  if any(s.get("uses", "").startswith("actions/deploy-pages") for s in job["steps"]))
    assert deploy["environment"]["name"] == "github-pages"
    assert ".venv/bin/mkdocs build --strict" in runs(pages)
    upload = next(s for s in steps(pages) if s.get("uses", "").startswith("actions/upload-pages-artifact"))
    assert upload["with"]["path"] == "site"


def test_workflows_cache_pip_and_the_notebooks_keyed_on_code_and_docs():
    for name in ("pages.yml", "tests.yml"):
        data = workflow(name)
        caches = [s["with"] for s in steps(data) if s.get("uses", "").startswith("actions/cache")]
        book = next(c for c in caches if ".cache/notebooks" in c["path"])
        assert ".cache/figures" in book["path"]
        assert "hashFiles('code/**', 'docs/**')" in book["key"]
        pip_cached = any("~/.cache/pip" in c["path"] for c in caches) or any(
            s.get("with", {}).get("cache") == "pip" for s in steps(data))
        assert pip_cached, f"{name} does not cache pip's downloads"


def test_workflows_run_the_readmes_commands_or_the_books_scripts():
    serve = readme_command("serve-command")
    install, sep, _ = serve.rpartition(" && ")
    assert sep and serve.endswith("mkdocs serve")
    assert install in runs(workflow("pages.yml"))
    assert readme_command("test-command") in runs(workflow("tests.yml"))
    tests = workflow("tests.yml")
    assert "push" in tests["on"] and "pull_request" in tests["on"]
    for name in ("pages.yml", "tests.yml"):
        for run in runs(workflow(name)):
            for word in run.split():
                if word.startswith((".ci/", "hooks/", "code/")):
                    assert (ROOT / word).exists(), f"{name} runs {word}, which does not exist"


def test_colab_links_open_what_the_pages_workflow_pushes_to_the_notebooks_branch():
    push = next(r for r in runs(workflow("pages.yml")) if "git push" in r)
    assert "cp site/notebooks/*.ipynb" in push  # the branch holds the notebooks at its top
    assert push.split()[-1] == book_editions.NOTEBOOK_BRANCH
    url = book_editions.colab_url("someone/fork", "ch04_attention")
    assert url == ("https://colab.research.google.com/github/someone/fork/blob/"
                   f"{book_editions.NOTEBOOK_BRANCH}/ch04_attention.ipynb")
    with pytest.raises(ValueError, match="owner/name"):
        book_editions.colab_url("https://github.com/someone/fork", "ch04_attention")


def test_the_build_publishes_each_notebook_at_notebooks_stem_ipynb():
    """mkdocs-jupyter copies a notebook's source beside its page; with the offline plugin the
    page is notebooks/<stem>.html, so the .ipynb lands in site/notebooks/, where the workflow
    takes it from."""
    from mkdocs.config import load_config
    from mkdocs.structure.files import File
    from mkdocs_jupyter.plugin import NotebookFile

    config = load_config(str(ROOT / "mkdocs.yml"))
    config["plugins"]["material/offline"].on_config(config)
    assert config["use_directory_urls"] is False
    file = File("notebooks/ch04_attention.ipynb", src_dir="x", dest_dir=config["site_dir"], use_directory_urls=False)
    notebook = NotebookFile(file, use_directory_urls=config["use_directory_urls"], site_dir=config["site_dir"])
    assert os.path.dirname(notebook.dest_path) == "notebooks"


def test_offline_site_loads_its_worker_shim_from_itself():
    from mkdocs.config import load_config

    config = load_config(str(ROOT / "mkdocs.yml"))
    assert "material/offline" in config["plugins"]
    polyfills = config["extra"]["polyfills"]
    assert polyfills and all(not p.startswith(("http:", "https:", "//")) for p in polyfills)
    assert all((ROOT / "docs" / p).exists() for p in polyfills)
    assert any("iframe-worker" in p for p in polyfills)  # else the plugin adds unpkg.com's


@pytest.mark.parametrize("module", MODULES)
def test_module_docstring_names_the_book_modules_it_needs(module):
    source = (ROOT / "code" / f"{module}.py").read_text(encoding="utf-8")
    declared = book_editions.declared_needs(ast.get_docstring(ast.parse(source)))
    assert declared is not None, f"code/{module}.py's docstring has no line '{book_editions.needs_line(module)}'"
    needed = sorted(set(book_pages.book_modules_needed(source)) - {module})
    assert declared == needed, f"code/{module}.py: write '{book_editions.needs_line(module)}'"


IMPORT_EACH_ALONE = """
import importlib, sys
for folder in sys.argv[1:]:
    for name in [m for m in sys.modules if m[:2] == "ch" and m[2:4].isdigit()]:
        del sys.modules[name]
    sys.path.insert(0, folder)
    importlib.import_module(folder.rsplit("/", 1)[1])
    sys.path.remove(folder)
"""


def test_module_zips_hold_modules_that_import_on_their_own(tmp_path):
    folders = []
    for module in MODULES:
        data = book_editions.module_zip(module)
        assert data == book_editions.module_zip(module)  # same bytes every build
        archive = zipfile.ZipFile(io.BytesIO(data))
        assert all(info.date_time == (1980, 1, 1, 0, 0, 0) for info in archive.infolist())
        assert sorted(archive.namelist()) == sorted(f"{m}.py" for m in [module, *book_editions.needs_of(module)])
        for info in archive.infolist():
            text = archive.read(info).decode()
            original = (ROOT / "code" / info.filename).read_text(encoding="utf-8")
            assert text.splitlines() == [line for line in original.splitlines() if "# --8<-- [" not in line]
            assert "--8<--" not in text
        archive.extractall(tmp_path / module)
        folders.append(str(tmp_path / module))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", IMPORT_EACH_ALONE, *folders], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]


def test_snippet_markers_are_removed_and_nothing_else():
    source = "x = 1\n# --8<-- [start:a]\ndef f():\n    # --8<-- [start:b-c]\n    return 1\n    # --8<-- [end:b-c]\n# --8<-- [end:a]\n"
    assert book_editions.strip_markers(source) == "x = 1\ndef f():\n    return 1\n"


def test_notebooks_zip_holds_the_chapters_notebooks_and_starters(tmp_path):
    from mkdocs.structure.files import File

    uris = ["notebooks/ch01_backprop.ipynb", "starters/ch01_backprop.py", "index.md",
            "figures/ch01_backprop.plot_x.svg"]
    for uri in uris:
        (tmp_path / uri).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / uri).write_text(f"content of {uri}")
    files = [File(uri, src_dir=str(tmp_path), dest_dir="site", use_directory_urls=False) for uri in uris]
    data = book_editions.notebooks_zip(files)
    archive = zipfile.ZipFile(io.BytesIO(data))
    assert archive.namelist() == ["notebooks/ch01_backprop.ipynb", "starters/ch01_backprop.py"]
    assert archive.read("starters/ch01_backprop.py") == b"content of starters/ch01_backprop.py"
    assert book_editions.notebooks_zip(files[2:]) is None


def test_print_view_links_are_relative_to_the_site_root():
    html = ('<img src="../figures/a.svg"><a href="ch02_tokenizer.html#x">2</a>'
            '<a href="#local">here</a><a href="https://pytorch.org/">torch</a>')
    assert book_editions.rebase_links(html, "chapters/ch01_backprop.html") == (
        '<img src="figures/a.svg"><a href="chapters/ch02_tokenizer.html#x">2</a>'
        '<a href="#local">here</a><a href="https://pytorch.org/">torch</a>')


def test_chapter_links_join_the_line_of_links_under_the_title():
    page = '# Title\n\n<p class="book-links" markdown>[a](b)</p>\nText\n'
    assert book_editions._link_paragraph(page, ["<a>c</a>"]) == (
        '# Title\n\n<p class="book-links" markdown>[a](b) <a>c</a></p>\nText\n')
    assert book_editions._link_paragraph("# Title\nText\n", ["<a>c</a>"]) == (
        '# Title\n\n<p class="book-links" markdown><a>c</a></p>\nText\n')


def test_the_pdf_is_skipped_with_a_reason(monkeypatch):
    monkeypatch.setenv("BOOK_PDF", "0")
    assert book_editions.pdf_tools_missing() == "BOOK_PDF=0"
    monkeypatch.delenv("BOOK_PDF")
    monkeypatch.setattr(book_editions, "CHROMIUM", "/nonexistent/chromium")
    assert book_editions.pdf_tools_missing() == "no Chromium at /nonexistent/chromium"
