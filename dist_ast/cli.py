"""Hydra plumbing shared by the entry points: the config store, the config folder, and
turning a composed config into validated dataclasses with a clear error."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from dist_ast.config import RunConfig, to_run_config
from dist_ast.errors import as_expected, report_and_exit
from dist_ast.models import BUILTIN_MODELS

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _register() -> None:
    """The schema, and one ``model=<name>`` group option per built-in model (no YAML)."""
    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    for name in BUILTIN_MODELS:
        store.store(group="model", name=name, node={"name": name})


def compose_config(overrides: Sequence[str] = (), config_name: str = "config") -> RunConfig:
    """The validated config for these overrides, as the command line would build it."""
    _register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    return to_run_config(cfg)


def hydra_main(fn: Callable[[RunConfig], Any], config_name: str = "config") -> None:
    """Run ``fn`` on the composed config; a bad value exits 2 with the key named."""
    import hydra

    _register()
    if not CONFIG_DIR.is_dir():
        raise SystemExit(
            f"config folder {CONFIG_DIR} not found: install dist_ast from a clone with "
            "`pip install -e .` so that configs/ sits beside the package"
        )

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name)
    def _main(cfg: DictConfig) -> None:
        try:
            fn(to_run_config(cfg))
        except Exception as e:  # expected failures: one line and their exit code
            expected = as_expected(e)
            if expected is None:
                raise  # a bug: keep the traceback
            report_and_exit(expected)

    _main()
