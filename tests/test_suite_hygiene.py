"""Rules of the test suite itself (issue 15, items 6 and 7), checked on its source: a
pinned dependency that is missing fails instead of skipping, test files do not import
each other (shared code lives in helper modules and conftest fixtures), and Hypothesis
runs without deadlines and with the same examples on every run."""

from __future__ import annotations

import ast
from pathlib import Path

from hypothesis import settings

TESTS = Path(__file__).resolve().parent


def _test_files() -> list[Path]:
    files = sorted(TESTS.glob("test_*.py"))
    assert len(files) > 20
    return files


def test_no_importorskip_a_missing_dependency_fails():
    offenders = [
        f"{f.name}:{node.lineno}"
        for f in _test_files()
        for node in ast.walk(ast.parse(f.read_text()))
        if isinstance(node, ast.Attribute) and node.attr == "importorskip"
    ]
    assert not offenders, f"use tests.deps.require or a plain import instead: {offenders}"


def test_no_test_module_imports_another():
    names = {f.stem for f in _test_files()}
    offenders = []
    for f in _test_files():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            hit = [m for m in mods if m.removeprefix("tests.") in names]
            offenders += [f"{f.name}:{node.lineno} imports {m}" for m in hit]
    assert not offenders, offenders


def test_hypothesis_profile_has_no_deadline_and_is_derandomized():
    s = settings.default  # conftest.py loads the "dist_ast" profile
    assert s.deadline is None
    assert s.derandomize and s.database is None


def test_no_import_fallbacks_helpers_import_as_tests_modules():
    """``pythonpath = ["."]`` (pyproject) puts the repository root on sys.path for every
    way of running pytest, so a ``try/except ImportError`` fallback hides a real error."""
    offenders = [
        f"{f.name}:{node.lineno}"
        for f in sorted(TESTS.glob("*.py"))
        for node in ast.walk(ast.parse(f.read_text()))
        if isinstance(node, ast.ExceptHandler)
        and isinstance(node.type, ast.Name)
        and node.type.id in ("ImportError", "ModuleNotFoundError")
    ]
    assert not offenders, offenders
