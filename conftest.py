"""Registers the book's pytest plugin for the whole repository.

It lives at the root because pytest must see it for docs/ as well as tests/: it collects
every page of docs/ and runs its code blocks, and it gives tests the ``load_chapter``
fixture and the ``--impl`` and ``--exercise`` options. The plugin itself is
hooks/book_pytest.py. pytest's own ``pytester`` lets tests/test_book.py run pytest on
small made-up tests and pages to check that plugin.
"""

pytest_plugins = ["book_pytest", "pytester"]
