"""Tests of the ``optax-stab`` command itself: --version, --help, the demo extra, --out.

The subcommands' own flags are tested in test_demo.py and test_bench.py.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

import optax_stab
from optax_stab import _cli
from optax_stab import demo as demo_lib
from optax_stab.demo import cli as demo_cli

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = (ROOT / "pyproject.toml").read_text()

# Runs ``python -m optax_stab ARGV`` for several ARGVs in one interpreter whose
# import system refuses every module of the demo extra, as after a plain
# ``pip install optax_stab``; prints {argv: [exit code, stdout, stderr]}.
WITHOUT_DEMO_EXTRA = r"""
import contextlib, importlib.abc, io, json, runpy, sys

BLOCKED = {"flax", "sklearn", "matplotlib", "rich"}


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Blocker())
results = {}
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["optax-stab", *argv]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module("optax_stab", run_name="__main__", alter_sys=True)
            code = None
        except SystemExit as e:
            code = e.code
    results[" ".join(argv)] = [code, out.getvalue(), err.getvalue()]
print(json.dumps(results))
"""


def _pyproject_version() -> str:
    return re.search(r'^version = "([^"]+)"', PYPROJECT, re.M).group(1)


def _demo_extra() -> list[str]:
    line = re.search(r"^demo = \[(.*)\]", PYPROJECT, re.M).group(1)
    return [re.match(r'\s*"([A-Za-z0-9_.-]+)', d).group(1) for d in line.split(",")]


def _one_line_error(err: str, prog: str) -> None:
    assert err.startswith(f"{prog}: error: ")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_help_version_and_bench_work_without_the_demo_extra():
    runs = [
        ["--help"],
        ["--version"],
        ["bench", "--help"],
        ["bench", "--size", "0"],
        ["demo"],
        ["demo", "--help"],
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_DEMO_EXTRA, json.dumps(runs)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)

    code, out, _ = results["--help"]
    assert code == 0
    assert "demo" in out and "bench" in out and "--version" in out
    code, out, _ = results["--version"]
    assert (code, out) == (0, f"optax-stab {_pyproject_version()}\n")
    code, out, _ = results["bench --help"]
    assert code == 0 and "--size" in out and "--compile" in out
    # The benchmark parses (and so has imported all its modules) and rejects.
    code, _, err = results["bench --size 0"]
    assert code == 2
    _one_line_error(err, "optax-stab bench")
    # Every demo command, --help included, names what is missing and the fix.
    for argv in ("demo", "demo --help"):
        code, out, err = results[argv]
        assert code == 2 and out == ""
        _one_line_error(err, "optax-stab demo")
        assert "flax, scikit-learn, matplotlib, rich" in err
        assert 'pip install "optax_stab[demo]"' in err


def test_demo_without_flax_in_process_exits_2_before_importing_the_demo(
    monkeypatch, capsys
):
    # None in sys.modules makes an import fail, as if flax were not installed.
    monkeypatch.setitem(sys.modules, "flax", None)
    monkeypatch.setitem(sys.modules, "flax.linen", None)
    with pytest.raises(SystemExit) as e:
        _cli.main(["demo", "--quick"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    _one_line_error(err, "optax-stab demo")
    assert "needs flax," in err and "scikit-learn" not in err


def test_demo_requirements_are_the_demo_extra_of_pyproject():
    assert list(demo_lib.REQUIREMENTS) == _demo_extra()
    assert demo_lib.missing_requirements() == []  # the test extra includes them


def test_version_is_the_distribution_version(capsys):
    with pytest.raises(SystemExit) as e:
        _cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"optax-stab {_pyproject_version()}\n"


def test_version_of_an_uninstalled_source_tree_is_the_package_version(
    monkeypatch, capsys
):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    monkeypatch.setattr(optax_stab, "__version__", "9.8.7")
    with pytest.raises(SystemExit) as e:
        _cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == "optax-stab 9.8.7\n"


def test_package_version_matches_pyproject():
    assert optax_stab.__version__ == _pyproject_version()


def test_no_command_prints_help_and_unknown_command_exits_2(capsys):
    assert _cli.main([]) == 0
    assert "COMMAND" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        _cli.main(["nope"])
    assert e.value.code == 2
    _one_line_error(capsys.readouterr().err, "optax-stab")


def _out_cases(tmp_path):
    existing_file = tmp_path / "README.md"
    existing_file.write_text("not a folder\n")
    cases = {
        "existing file": (existing_file, "is an existing file, not a folder"),
        "under a file": (existing_file / "sub", "cannot create the folder"),
    }
    if os.path.isdir("/proc/self"):  # Linux: /proc takes no new folders
        cases["/proc"] = (pathlib.Path("/proc/x"), "cannot create the folder")
    return cases


def test_unusable_out_exits_2_with_one_line_before_any_training(
    tmp_path, monkeypatch, capsys
):
    def train(*args, **kwargs):
        raise AssertionError("training started before --out was checked")

    monkeypatch.setattr(demo_cli, "run", train)
    for name, (out, message) in _out_cases(tmp_path).items():
        with pytest.raises(SystemExit) as e:
            _cli.main(["demo", "--tasks", "linear", "--out", str(out)])
        assert e.value.code == 2, name
        err = capsys.readouterr().err
        _one_line_error(err, "optax-stab demo")
        assert f"--out {str(out)!r}" in err and message in err, name
    assert (tmp_path / "README.md").read_text() == "not a folder\n"


def test_new_out_folder_is_created_with_its_parents(tmp_path):
    out = tmp_path / "a" / "b"
    demo_cli.make_out_dir(str(out))
    assert out.is_dir()
    demo_cli.make_out_dir(str(out))  # an existing folder is fine
