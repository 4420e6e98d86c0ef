"""The documentation builds, strictly, and the README's links resolve.

`mkdocs build --strict` fails on any warning: a broken link or anchor between
pages, a page missing from the nav, an API reference (`::: keras_swa.X`) or a
cross-reference (`[text][keras_swa.X]`) that names nothing, or a docstring
that mkdocstrings cannot parse. The build reads the source statically: it
does not depend on the Keras backend of this run.
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mkdocs_available():
    try:
        import mkdocs  # noqa: F401
        import mkdocstrings  # noqa: F401
        import material  # noqa: F401
    except ImportError:
        return False
    return True


def test_docs_build_strictly(tmp_path):
    if not _mkdocs_available():
        message = (
            "MkDocs is not installed: `pip install -e .[docs]`, or run "
            "`make test`, which installs it."
        )
        # CI installs everything with `make test`: a missing MkDocs there is
        # a broken install, not a reason to skip.
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    completed = subprocess.run(
        [
            sys.executable, "-m", "mkdocs", "build", "--strict",
            "--site-dir", str(tmp_path / "site"),
        ],
        cwd=ROOT,
        # Material prints a banner about MkDocs 2 on every build otherwise.
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, (
        "`make docs` (mkdocs build --strict) failed:\n"
        + completed.stdout[-3000:]
        + completed.stderr[-3000:]
    )
    assert (tmp_path / "site" / "api.html").exists()


def test_readme_links_resolve():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as file:
        readme = file.read()
    targets = re.findall(r"\]\(([^)\s]+)\)", readme)
    local = [
        target.split("#", 1)[0]
        for target in targets
        if not re.match(r"[a-z]+:", target) and not target.startswith("#")
    ]
    assert local, "the README links to no local file"
    missing = [
        target for target in local
        if not os.path.exists(os.path.join(ROOT, target))
    ]
    assert not missing, f"README.md links to missing files: {missing}"
