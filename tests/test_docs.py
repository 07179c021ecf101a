"""The documentation names only what exists: every repository path that README.md or a
docs/*.md file names (``split_alexnet/...``, ``launch/...``, ``scripts/...``, ``tests/...``,
and modules named from inside the package such as ``training/optim.py``), and every test it
names as ``test_x.py::test_name``.
"""

from __future__ import annotations

import re

from helpers import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Not inside a longer path (``~/.cache/split_alexnet/...`` is the user's cache, not the tree).
_START = r"(?<![\w./~}$-])"
#: A path from the repository root; a trailing ``/`` or a ``<placeholder>`` ends it.
REPO_PATH = re.compile(_START + r"((?:split_alexnet|launch|scripts|tests)/[\w./-]*\w)")
#: A module or source file named relative to the package, as in ``training/optim.py``.
PACKAGE_PATH = re.compile(_START + r"((?:training|network|data|tools|utils|csrc)/[\w/]+"
                          r"\.(?:py|cpp))")
#: A test named with its file, as in ``tests/test_train.py::test_resume_equals_uninterrupted``.
TEST = re.compile(r"(?<![\w./-])(?:tests/)?(test_\w+\.py)::\s*(\w+)")


def named(pattern: re.Pattern) -> list[tuple[str, tuple[str, ...]]]:
    """(where, groups) of every match of ``pattern`` in the docs; where is ``doc:line``."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for m in pattern.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            found.append((f"{doc.relative_to(REPO)}:{line}", m.groups()))
    return found


def test_every_path_and_test_the_docs_name_exists():
    paths, package, tests = named(REPO_PATH), named(PACKAGE_PATH), named(TEST)
    # The patterns do find the docs' names (the check is not vacuous).
    assert len(paths) > 50 and len(package) > 50 and len(tests) > 10
    missing = [f"{where} {path}" for where, (path,) in paths if not (REPO / path).exists()]
    missing += [f"{where} {path} (split_alexnet/{path})" for where, (path,) in package
                if not (REPO / "split_alexnet" / path).exists()]
    for where, (file, name) in tests:
        path = REPO / "tests" / file
        if not path.is_file() or not re.search(rf"^def {name}\(", path.read_text(), re.M):
            missing.append(f"{where} tests/{file}::{name}")
    assert missing == [], "\n".join(missing)
