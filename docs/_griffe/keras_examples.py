"""A Griffe extension: the Keras-style `Example:` blocks render as code.

The docstrings follow the Keras style: an `Example:` line, a blank line,
then doctest lines (`>>>`) at the indentation of the docstring itself. The
Google-style parser of mkdocstrings reads a section only from the lines
indented under its title, so these examples were plain Markdown, where
`>>>` is a nested block quote. This extension indents everything from such a
title to the next section title (or the end of the docstring) under a Google
`Examples:` section, which mkdocstrings renders as highlighted `pycon` code
(text paragraphs between the doctests stay text). The source is unchanged:
the docstrings still read, and run as doctests, as Keras writes them.

`mkdocs.yml` loads it (`extensions:` of the Python handler); the build reads
the sources statically, so no Keras is imported.
"""

import re

import griffe

# Titles of the Google sections that can follow an example at the same
# indentation: they end it.
_SECTION_TITLE = re.compile(
    r"(Args|Arguments|Call arguments|Returns|Yields|Raises|Attributes|"
    r"Note|Notes|Warning|Warnings|References|See Also|Example|Examples)"
    r":\s*$"
)
_EXAMPLE_TITLE = re.compile(r"Examples?:\s*$")


def indent_examples(text: str) -> str:
    """Returns the docstring `text` with its unindented examples indented.

    Args:
        text: A cleaned docstring (its common indentation removed).

    Returns:
        The text with every `Example:`/`Examples:` title at column 0 whose
        body is not indented turned into an `Examples:` section holding that
        body, indented by four spaces, right under the title.
    """
    lines = text.split("\n")
    result = []
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        body = 0
        if _EXAMPLE_TITLE.match(line):
            body = _unindented_body(lines, index)
        if not body:
            result.append(line)
            continue
        # Griffe reads a section only when its body follows the title
        # without a blank line.
        while not lines[index].strip():
            index += 1
            body -= 1
        result.append("Examples:")
        for inner in lines[index:index + body]:
            result.append("    " + inner if inner.strip() else "")
        index += body
    return "\n".join(result)


def _unindented_body(lines, start):
    """The number of lines from `start` that form an example's body at
    column 0 (0 when the body is indented already, as Google style has it)."""
    end = start
    while end < len(lines) and not _SECTION_TITLE.match(lines[end]):
        end += 1
    first = next((line for line in lines[start:end] if line.strip()), "")
    if not first or first[0].isspace():
        return 0
    return end - start


class KerasExamples(griffe.Extension):
    """Indents the Keras-style examples of every docstring (see module)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = indent_examples(obj.docstring.value)
