"""scripts/mutation_check.py stays current: every mutation's source pattern occurs exactly
once in this checkout (a refactor that moves a line must update the mutation, not leave
it silently unapplied). The mutation runs themselves take ~10 minutes and are not in CI."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location(
        "mutation_check", ROOT / "scripts/mutation_check.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutation_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_mutation_pattern_matches_once():
    mc = load_script()
    assert len(mc.MUTATIONS) >= 12
    assert len({m.name for m in mc.MUTATIONS}) == len(mc.MUTATIONS)
    assert mc.check_patterns(ROOT, mc.MUTATIONS) == []
    for m in mc.MUTATIONS:  # each changes the code, and only the file it names
        assert all(old != new for old, new in m.edits), m.name
        assert (ROOT / m.path).is_file() and m.path.startswith("dist_ast/"), m.name
    assert all(Path(ROOT / t).is_file() for t in mc.FAST_TESTS)
