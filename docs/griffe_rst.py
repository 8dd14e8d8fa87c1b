"""Griffe extension: rewrites the reStructuredText markup of docstrings to Markdown.

The docstrings follow STYLE.md, which writes them for Sphinx and mkdocstrings
alike: ``:math:`` roles, ``.. math::`` blocks, ``:func:`` / ``:class:`` roles,
````literals```` and ```Title <url>`_`` links. mkdocstrings renders docstring text
as Markdown, so once the package is loaded (before any docstring is parsed) this
extension rewrites every docstring of it:

* ``:math:`x``` -> ``\\(x\\)`` and a ``.. math::`` block -> ``\\[ ... \\]``, the
  syntax of ``pymdownx.arithmatex`` in generic mode (MathJax renders them);
* ``:func:`` / ``:class:`` / ``:data:`` / ``:mod:`` (and ``:meth:``, ``:attr:``,
  ``:obj:``, ``:exc:``) on a name in the package's ``__all__`` -> an autorefs
  cross-reference ``[`name`][package.name]``, which the strict build checks;
  any other name -> inline code (or a cross-reference when it starts with one
  of the ``crossref_prefixes`` option, for packages with a configured
  inventory);
* ```text <url>`_`` -> ``[text](url)`` and ````code```` -> ```code```;
* ``.. note::``, ``.. seealso::``, ``.. warning::``, ``.. versionadded::`` and
  ``.. versionchanged::`` -> Markdown admonitions;
* a paragraph ending in ``::`` (an rST literal block follows) -> ``:`` (or
  nothing after a space); the indented block is already Markdown code.

Unknown roles and directives are left as they are, so ``tests/test_docs.py``
(which asserts that none remains in a public docstring) names them.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from typing import Any

import griffe

_XREF_ROLES = "func|class|data|mod|meth|attr|obj|exc"
_MATH_ROLE = re.compile(r":math:`([^`]*)`")
_XREF_ROLE = re.compile(rf":(?:py:)?(?:{_XREF_ROLES}):`(~?)([^`]+)`")
_LINK = re.compile(r"`([^`<]+?)\s*<([^>`\s]+)>`__?")
_LITERAL = re.compile(r"``((?:(?!\n[ \t]*\n).)+?)``", re.DOTALL)
_LITERAL_BLOCK = re.compile(r"^(?![ \t]*\.\. )(.*\S)( ?)::$", re.MULTILINE)
_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. (?P<name>[\w-]+)::[ \t]*(?P<arg>.*)$")
_ADMONITIONS = {
    "note": ("note", "Note"),
    "seealso": ("info", "See also"),
    "warning": ("warning", "Warning"),
    "versionadded": ("info", "Added in version {arg}"),
    "versionchanged": ("info", "Changed in version {arg}"),
}


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block(lines: Sequence[str], start: int, indent: int) -> tuple[list[str], int]:
    """The lines after a directive that are blank or indented past ``indent``."""
    end = start
    while end < len(lines) and (
        not lines[end].strip() or _indent_of(lines[end]) > indent
    ):
        end += 1
    while end > start and not lines[end - 1].strip():
        end -= 1  # trailing blank lines stay in the text
    body = list(lines[start:end])
    depth = min((_indent_of(s) for s in body if s.strip()), default=0)
    return [s[depth:] for s in body], end


def _code(text: str) -> str:
    if "`" in text:
        return f"`` {text} ``"
    return f"`{text}`"


def _inline(
    text: str, public: Collection[str], package: str, prefixes: Sequence[str]
) -> str:
    def math(m: re.Match) -> str:
        return r"\(" + " ".join(m[1].split()) + r"\)"

    def xref(m: re.Match) -> str:
        name = m[2].strip()
        local = name.removeprefix(package + ".")
        shown = name.rsplit(".", 1)[-1] if m[1] else name
        if local in public:
            return f"[`{shown if m[1] else local}`][{package}.{local}]"
        if any(name.startswith(p) for p in prefixes):
            return f"[`{shown}`][{name}]"
        return _code(shown)

    def link(m: re.Match) -> str:
        return f"[{' '.join(m[1].split())}]({m[2]})"

    text = _MATH_ROLE.sub(math, text)
    text = _XREF_ROLE.sub(xref, text)
    text = _LINK.sub(link, text)
    text = _LITERAL.sub(lambda m: _code(m[1]), text)
    return _LITERAL_BLOCK.sub(lambda m: m[1] + ("" if m[2] else ":"), text)


def rst_to_markdown(
    text: str,
    public: Collection[str] = (),
    package: str = "optax_stab",
    crossref_prefixes: Sequence[str] = (),
) -> str:
    """Rewrites the rST markup of one docstring to Markdown (see the module doc).

    Args:
        text: The docstring, already dedented (as ``inspect.cleandoc`` gives it).
        public: Names exported by ``package``; roles on them become
            cross-references to ``package.name``.
        package: The documented package.
        crossref_prefixes: Dotted prefixes (``"optax."``) of other packages whose
            names become cross-references too; only for packages whose
            inventory the mkdocstrings handler loads.

    Returns:
        The docstring in Markdown.
    """
    lines = text.splitlines()
    out: list[str] = []
    prose: list[str] = []

    def flush() -> None:
        if prose:
            out.append(_inline("\n".join(prose), public, package, crossref_prefixes))
            prose.clear()

    i = 0
    while i < len(lines):
        m = _DIRECTIVE.match(lines[i])
        name = m["name"] if m else None
        if name != "math" and name not in _ADMONITIONS:
            prose.append(lines[i])
            i += 1
            continue
        pad, arg = m["indent"], m["arg"].strip()
        body, i = _block(lines, i + 1, len(pad))
        flush()
        if name == "math":
            maths = ([arg] if arg else []) + body
            out.append(
                "\n".join(["", pad + r"\[", *(pad + s for s in maths), pad + r"\]", ""])
            )
            continue
        kind, title = _ADMONITIONS[name]
        if name.startswith("version"):
            title, arg = title.format(arg=arg), ""
        inner = rst_to_markdown(
            "\n".join(([arg] if arg else []) + body), public, package, crossref_prefixes
        )
        out.append(
            "\n".join(
                [
                    f'{pad}!!! {kind} "{title}"',
                    *(
                        pad + "    " + s if s.strip() else ""
                        for s in inner.splitlines()
                    ),
                ]
            )
        )
    flush()
    return "\n".join(out)


class RstDocstrings(griffe.Extension):
    """Rewrites every docstring of a loaded package with :func:`rst_to_markdown`."""

    def __init__(self, crossref_prefixes: Sequence[str] = ()) -> None:
        super().__init__()
        self.crossref_prefixes = tuple(crossref_prefixes)

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        del kwargs
        public = {str(name) for name in pkg.exports or ()}
        stack: list[griffe.Object | griffe.Alias] = [pkg]
        while stack:
            obj = stack.pop()
            if obj.is_alias:
                continue
            if obj.docstring is not None:
                obj.docstring.value = rst_to_markdown(
                    obj.docstring.value, public, pkg.name, self.crossref_prefixes
                )
            stack.extend(obj.members.values())
