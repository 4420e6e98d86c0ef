"""The documentation builds, strictly, and the README's links resolve.

`mkdocs build --strict` fails on any warning: a broken link or anchor between
pages, a page missing from the nav, an API reference (`::: keras_swa.X`) or a
cross-reference (`[text][keras_swa.X]`) that names nothing, or a docstring
that mkdocstrings cannot parse. The build reads the source statically: it
does not depend on the Keras backend of this run.
"""

import os
import re
import shutil
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


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site built once by `mkdocs build --strict`: its directory."""
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
    directory = tmp_path_factory.mktemp("docs") / "site"
    completed = subprocess.run(
        [
            sys.executable, "-m", "mkdocs", "build", "--strict",
            "--site-dir", str(directory),
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
    return directory


def test_docs_build_strictly(site):
    assert (site / "api.html").exists()


# The doctest blocks of the API reference's `Example:` sections today (26
# sections, one with two blocks); a new example only adds to them. Fewer
# means examples were lost from the reference.
_EXAMPLE_BLOCKS_IN_REFERENCE = 27


def test_every_example_of_the_reference_is_code(site):
    """Every `Example:` of the docstrings renders as a highlighted block.

    The docstrings are Keras style (doctest lines at the docstring's own
    indentation), which plain Markdown reads as nested block quotes;
    docs/_griffe/keras_examples.py turns them into Google `Examples:`
    sections. Each section must hold `<pre><code>` with the doctest prompt
    highlighted (an indented block without a language is code, unhighlighted).
    """
    html = (site / "api.html").read_text(encoding="utf-8")
    # A doctest line outside a code block is a block quote (`>>>`); the
    # reference has no other block quote.
    assert "<blockquote>" not in html, "an example renders as a block quote"
    blocks = 0
    # Each object's documentation: from its heading to the next one.
    for section in re.split(r"(?=<h[2-6] id=)", html):
        for body in re.split(r">Examples?:<", section)[1:]:
            code = re.findall(r"<pre\b[^>]*>.*?<code\b.*?</code>", body, re.S)
            # Highlighted: the prompt is a Pygments "generic prompt" span.
            doctests = [
                block for block in code
                if '<span class="gp">&gt;&gt;&gt; </span>' in block
            ]
            assert doctests, "an example is not rendered as code: " + body[:500]
            blocks += len(doctests)
    assert blocks >= _EXAMPLE_BLOCKS_IN_REFERENCE, (
        f"the reference renders {blocks} examples as code, expected at "
        f"least {_EXAMPLE_BLOCKS_IN_REFERENCE}"
    )


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


def test_readme_links_the_pages_a_newcomer_looks_for():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as file:
        readme = file.read()
    for page in (
        "docs/first_script.md",
        "docs/which_averager.md",
        "docs/guide/custom_loops.md",
        "CHANGELOG.md",
    ):
        assert f"]({page})" in readme, f"README.md does not link {page}"


def test_make_docs_installs_only_the_docs_extra():
    """`make docs` needs the package and MkDocs, not every backend."""
    if shutil.which("make") is None:
        pytest.skip("`make` is not installed.")
    # A dry run of every recipe the target would run (-B: as if nothing
    # were installed yet).
    completed = subprocess.run(
        ["make", "--dry-run", "--always-make", "docs"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    installs = [
        line for line in completed.stdout.splitlines()
        if "pip install" in line and "--upgrade pip" not in line
    ]
    assert installs, completed.stdout
    for line in installs:
        extras = re.findall(r"\.\[([^\]]*)\]", line)
        assert extras == ["docs"], f"`make docs` runs: {line}"
    assert "mkdocs build --strict" in completed.stdout
