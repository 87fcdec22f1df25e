"""Bad configuration fails at start with the key named (issue 2, item 8)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException

from dist_ast.cli import compose_config
from dist_ast.config import ConfigError, RunConfig
from dist_ast.train import build_schedule


@pytest.mark.parametrize(
    "override,key",
    [
        ("ast.sparsities=[0.5,1.0]", "ast.sparsities"),
        ("ast.sparsities=[-0.1,0.5]", "ast.sparsities"),
        ("ast.sparsities=[0.9,0.8]", "ast.sparsities"),
        ("ast.sparsities=[]", "ast.sparsities"),
        ("ast.stagger=15", "ast.stagger"),  # 15 * 2 >= update_every 30
        ("model.name=vgg", "model.name"),
        ("ast.mode=slimmable", "ast.mode"),
        ("ast.mask_relation=overlap", "ast.mask_relation"),
        ("train.precision=fp8", "train.precision"),
        ("ast.initial_sparsity=0.7", "ast.initial_sparsity"),  # above the lowest target 0.5
        ("engine.zero_stage=3", "engine.zero_stage"),
        ("ast.nm_patterns=[2:4,1:4]", "ast.nm_patterns"),  # 2 patterns for 3 sub-nets
    ],
)
def test_invalid_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose_config(["experiment=demo", override])


def test_unknown_key_is_rejected():
    with pytest.raises(ConfigCompositionException, match="not_a_key"):
        compose_config(["experiment=demo", "ast.not_a_key=1"])


def test_experiments_compose():
    cfg = compose_config(["experiment=demo"])
    assert isinstance(cfg, RunConfig)
    assert cfg.ast.sparsities == [0.5, 0.8, 0.9] and cfg.ast.gradient_correction


def test_ramp_that_never_reaches_target_is_rejected():
    cfg = compose_config(
        ["experiment=demo", "ast.ramp_end_epoch=29.9", "ast.update_every=500", "ast.stagger=100"]
    )
    with pytest.raises(ConfigError, match="ramp_end_epoch"):
        build_schedule(cfg, steps_per_epoch=23)


def test_cli_exits_2_naming_the_key(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dist_ast.train",
            "experiment=demo",
            f"run_dir={tmp_path}",
            "ast.sparsities=[0.9,0.5]",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "ast.sparsities" in proc.stderr + proc.stdout
    assert not (tmp_path / "summary.json").exists()
