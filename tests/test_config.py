"""Bad configuration fails at start with the key named (issue 2, item 8), every check
in the dataclasses, every default in one place (issue 12, item 4)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from hydra.errors import ConfigCompositionException

from dist_ast.cli import CONFIG_DIR as CONFIGS
from dist_ast.cli import compose_config
from dist_ast.config import (
    ASTConfig,
    ConfigError,
    DataConfig,
    EngineConfig,
    RunConfig,
    TrainConfig,
    config_as_dict,
)
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
        ("data.loader=wds", "data.loader"),  # digits are in memory
        ("ast.regrow_init=random", "ast.regrow_init"),  # authors' switches: zero | kept
        ("optim.inactive_weights=drift", "optim.inactive_weights"),  # frozen | moving
        ("optim.lr_per=batch", "optim.lr_per"),  # step | epoch
    ],
)
def test_invalid_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose_config(["experiment=demo", override])


# Checks that used to run when the trainer, the mask updater or the DeepSpeed wrapper
# was built: now in the dataclasses' __post_init__, so composing the config fails.
@pytest.mark.parametrize(
    "overrides,message",
    [
        # N:M sub-nets (were in MaskUpdater)
        (["ast.nm_patterns=[2-4,1:4,1:8]"], r"ast\.nm_patterns=.*look like '2:4'"),
        (["ast.nm_patterns=[4:4,1:4,1:8]"], r"ast\.nm_patterns=.*0 < N < M"),
        (["ast.mask_relation=completely_subset"], r"ast\.mask_relation='completely_subset'"),
        (["ast.initial_sparsity=0.5"], r"ast\.initial_sparsity=0\.5: N:M sub-nets .* start dense"),
        (
            ["ast.sparsities=[0.5,0.8,0.9]"],
            r"ast\.sparsities=\[0\.5, 0\.8, 0\.9\].*set ast\.sparsities=\[0\.5, 0\.75, 0\.875\]",
        ),
        # DeepSpeed x mode / precision (were in wrap_deepspeed)
        (["engine=deepspeed", "ast=joint"], r"engine\.name='deepspeed': ast\.mode=joint"),
        (
            ["engine=deepspeed", "engine.zero_stage=0", "train.precision=bf16"],
            r"engine\.zero_stage=0: train\.precision=bf16",
        ),
        # loader vs dataset (were ValueErrors when the loaders were built)
        (
            ["data=cifar10", "data.loader=memory"],
            r"data\.loader='memory': data=cifar10 reads shards",
        ),
        (["data=synthetic", "data.loader=dali"], r"data\.loader='dali': data=synthetic is held in"),
    ],
)
def test_checks_moved_into_the_dataclasses(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        compose_config(["experiment=r18_cifar_nm", *overrides])
    assert "\n" not in str(e.value)


def test_dataclasses_validate_without_hydra():
    """The checks live in __post_init__, so a config built in Python is checked too."""
    with pytest.raises(ConfigError, match="engine.zero_stage"):
        RunConfig(engine=EngineConfig(name="deepspeed"), train=TrainConfig(precision="fp16"))
    with pytest.raises(ConfigError, match="ast.mask_relation"):
        ASTConfig(
            sparsities=[0.5, 0.75], nm_patterns=["2:4", "1:4"], mask_relation="completely_subset"
        )
    with pytest.raises(ConfigError, match="data.loader"):
        DataConfig(name="imagenet", loader="memory")
    ok = RunConfig(
        engine=EngineConfig(name="deepspeed", zero_stage=1), train=TrainConfig(precision="bf16")
    )
    assert ok.engine.zero_stage == 1


def _restated_defaults(node: dict, defaults: dict, prefix: str) -> list[str]:
    out = []
    for key, value in node.items():
        if key in ("defaults", "hydra"):
            continue
        default = defaults.get(key, KeyError) if isinstance(defaults, dict) else KeyError
        if isinstance(value, dict):
            out += _restated_defaults(value, default, f"{prefix}{key}.")
        elif default is not KeyError and value == default and type(value) is type(default):
            out.append(f"{prefix}{key}={value!r}")
        elif default is not KeyError and isinstance(default, float) and value == default:
            out.append(f"{prefix}{key}={value!r}")  # an int written for a float default
    return out


def test_yaml_files_hold_only_what_differs_from_the_dataclasses():
    """One place for each default: no file in configs/ restates a dataclass default."""
    defaults = config_as_dict(RunConfig())
    restated = []
    for path in sorted(CONFIGS.rglob("*.yaml")):
        node = yaml.safe_load(path.read_text()) or {}
        group = path.parent.name
        section = defaults if group in ("configs", "experiment") else defaults[group]
        prefix = "" if section is defaults else f"{group}."
        restated += [
            f"{path.relative_to(CONFIGS)}: {k}" for k in _restated_defaults(node, section, prefix)
        ]
    assert not restated, restated


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
