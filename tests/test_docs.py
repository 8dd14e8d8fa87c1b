"""The docs render the rST docstrings: math, cross-references, links, admonitions."""

from __future__ import annotations

import importlib.util
import inspect
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

import optax_stab

NO_DOCS_EXTRA = "the docs extra is not installed (.ci/run installs it)"
pytest.importorskip(
    "griffe",
    reason=NO_DOCS_EXTRA,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
PUBLIC = frozenset(optax_stab.__all__)
RST_ROLE = re.compile(r":\w+:`")
RST_DIRECTIVE = re.compile(r"^\s*\.\. [\w-]+::", re.MULTILINE)


def _load_extension():
    spec = importlib.util.spec_from_file_location(
        "griffe_rst_under_test", ROOT / "docs" / "griffe_rst.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


griffe_rst = _load_extension()


def convert(text, **kwargs):
    return griffe_rst.rst_to_markdown(text, PUBLIC, "optax_stab", **kwargs)


@pytest.mark.parametrize(
    ("rst", "markdown"),
    [
        (
            r"With :math:`n_t = \|g_t\|_2` the norm.",
            r"With \(n_t = \|g_t\|_2\) the norm.",
        ),
        (
            "See :func:`moving_average` and :class:`optax_stab.ClipByNormState`.",
            "See [`moving_average`][optax_stab.moving_average] and "
            "[`ClipByNormState`][optax_stab.ClipByNormState].",
        ),
        (
            ":func:`~optax_stab.autoclip`",
            "[`autoclip`][optax_stab.autoclip]",
        ),
        (
            "An :class:`optax.GradientTransformationExtraArgs`.",
            "An `optax.GradientTransformationExtraArgs`.",
        ),
        (
            "A :class:`optax_stab._ring.RingBuffer` and :mod:`optax_stab`.",
            "A `optax_stab._ring.RingBuffer` and `optax_stab`.",
        ),
        (
            "Seetharaman et al., `AutoClip: Adaptive Gradient Clipping for Source\n"
            "    Separation Networks <https://arxiv.org/abs/2007.14469>`_, 2020",
            "Seetharaman et al., [AutoClip: Adaptive Gradient Clipping for Source "
            "Separation Networks](https://arxiv.org/abs/2007.14469), 2020",
        ),
        ("``stat_dtype`` scalar", "`stat_dtype` scalar"),
        (
            """``"`decay` must be in [0, 1)"``""",
            """`` "`decay` must be in [0, 1)" ``""",
        ),
        (
            "call the transformation yourself::\n\n    tx.update(g, s)",
            "call the transformation yourself:\n\n    tx.update(g, s)",
        ),
    ],
)
def test_inline_markup_becomes_markdown(rst, markdown):
    assert convert(rst) == markdown


def test_optax_names_link_only_with_a_configured_prefix():
    rst = ":func:`optax.clip_by_global_norm`"
    assert convert(rst) == "`optax.clip_by_global_norm`"
    assert convert(rst, crossref_prefixes=("optax.",)) == (
        "[`optax.clip_by_global_norm`][optax.clip_by_global_norm]"
    )


def test_math_block_becomes_a_display_block_at_the_directive_indent():
    rst = (
        "Clipped to\n"
        "\n"
        "    .. math::\n"
        "        n^* = \\mu \\\\\n"
        "        m = 1,\n"
        "\n"
        "    otherwise :math:`n`."
    )
    assert convert(rst) == (
        "Clipped to\n"
        "\n"
        "\n"
        "    \\[\n"
        "    n^* = \\mu \\\\\n"
        "    m = 1,\n"
        "    \\]\n"
        "\n"
        "\n"
        "    otherwise \\(n\\)."
    )


def test_directives_become_admonitions_with_their_continuation_lines():
    rst = (
        "Text.\n"
        "\n"
        ".. note:: A leaf with :math:`\\gamma = 0`\n"
        "    is clipped; see ``optax.masked``.\n"
        "\n"
        ".. seealso:: :func:`sign_power`.\n"
        ".. versionadded:: 0.2\n"
        "    Took ``window``."
    )
    assert convert(rst) == (
        "Text.\n"
        "\n"
        '!!! note "Note"\n'
        "    A leaf with \\(\\gamma = 0\\)\n"
        "    is clipped; see `optax.masked`.\n"
        "\n"
        '!!! info "See also"\n'
        "    [`sign_power`][optax_stab.sign_power].\n"
        '!!! info "Added in version 0.2"\n'
        "    Took `window`."
    )


def test_google_sections_and_unknown_markup_are_left_alone():
    rst = "Args:\n    decay: In [0, 1).\n\n:unknown:`x`\n\n.. unknown::\n    body"
    assert convert(rst) == rst


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_no_rst_markup_survives_in_a_public_docstring(name):
    doc = inspect.getdoc(getattr(optax_stab, name))
    out = convert(doc)
    assert not RST_ROLE.search(out), RST_ROLE.findall(out)
    assert not RST_DIRECTIVE.search(out), RST_DIRECTIVE.findall(out)
    assert doc.count(":math:`") == out.count("\\(")
    for target in re.findall(r"\]\[optax_stab\.(\w+)\]", out):
        assert target in PUBLIC


def test_api_page_documents_every_public_name():
    # Every cross-reference target must have an anchor on the API page.
    api = (ROOT / "docs" / "api.md").read_text()
    documented = set(re.findall(r"^::: optax_stab\.(\w+)$", api, re.MULTILINE))
    assert documented == PUBLIC


def _build(config, site):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet"]
    return subprocess.run(
        [*cmd, "-f", str(config), "--site-dir", str(site)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_strict_build_renders_math_and_resolves_cross_references(tmp_path):
    pytest.importorskip(
        "mkdocs",
        reason=NO_DOCS_EXTRA,
    )
    pytest.importorskip(
        "mkdocstrings_handlers.python",
        reason=NO_DOCS_EXTRA,
    )
    done = _build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, done.stdout + done.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert '<div class="arithmatex">\\[' in api
    assert '<span class="arithmatex">\\(' in api
    assert re.search(
        r'<a class="autorefs[^"]*"[^>]*href="#optax_stab\.sign_power"', api
    )
    assert ":math:`" not in api
    assert ":func:`" not in api


def test_strict_quiet_build_fails_on_an_unresolved_cross_reference(tmp_path):
    pytest.importorskip(
        "mkdocs",
        reason=NO_DOCS_EXTRA,
    )
    pytest.importorskip(
        "mkdocstrings_handlers.python",
        reason=NO_DOCS_EXTRA,
    )
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    with open(tmp_path / "docs" / "api.md", "a") as f:
        f.write("\nSee [`nope`][optax_stab.nope].\n")
    done = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert done.returncode != 0
    assert "optax_stab.nope" in done.stdout + done.stderr


def test_scaling_tables_match_the_library():
    # docs/scaling.md's tables are generated from jax.eval_shape of every
    # transform's init; a changed state size must regenerate them.
    spec = importlib.util.spec_from_file_location(
        "scaling_table_under_test", ROOT / "docs" / "scaling_table.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0, "run: python docs/scaling_table.py --write"
    table = module.SCALING_MD.read_text()
    # Closed forms of two rows: adamw keeps mu and nu (2 x 4 B per float32
    # param); windowed_median(5) keeps 5 slots of each param.
    assert "| `optax.adamw(1e-3)` | baseline | 8 | 4 | 0 | 4 |" in table
    assert "| `windowed_median(5)` | W = 5 | 20 | 10 | 0 | 8 |" in table
