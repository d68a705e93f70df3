"""From composed Hydra configs to validated TrialSpecs (the control plane's input check)."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from jobs.spec import TRIAL_SECTIONS, TrialSpec
from kernels import catalog
from orchestrator import schema
from orchestrator.errors import ConfigError

# Keys that belong to the whole sweep, not to a cell: they must not vary across cells.
SWEEP_SECTIONS = ("cluster", "tracking", "sweep")


def trial_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved, plain TRIAL_SECTIONS of a composed config."""
    return {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in TRIAL_SECTIONS}


def trial_key(config: dict[str, Any]) -> str:
    """A stable hash of the canonical resolved config: same cell, same key, whatever the overrides."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def trial_spec(cfg: DictConfig, overrides: Sequence[str]) -> TrialSpec:
    """Validate one composed cell and make its TrialSpec; raises ConfigError."""
    schema.validate(cfg)
    model = cfg.model
    if model.source == "build" and model.build is None:
        raise ConfigError("model.build", None, "required when model.source=build", problem="missing")
    _check_dtype(cfg.dtype, cfg.quant)
    config = trial_config(cfg)
    return TrialSpec(trial_key=trial_key(config), config=config, overrides=tuple(overrides))


def _check_dtype(dtype: DictConfig, quant: DictConfig) -> None:
    """The format's knobs must exist and fit it (the same check the numerics make)."""
    if dtype.format is None:
        return
    try:
        catalog.check_knobs(dtype.format, dtype.granularity, dtype.group_size, dtype.rounding, dtype.scale_rule,
                            dtype.overflow, dtype.symmetric)
    except catalog.KnobError as e:
        key = "dtype." + ("format" if e.key == "format" else e.key)
        raise ConfigError(key, e.value, f"allowed for {dtype.format}: {', '.join(map(str, e.allowed))}") from None
    if not (quant.weights or quant.activations or quant.kv_cache):
        raise ConfigError("quant", quant.name, "at least one of quant.weights, quant.activations, quant.kv_cache",
                          problem="quantizes nothing")


def sweep_settings(cells: Sequence[DictConfig]) -> DictConfig:
    """The sweep-level sections, which every cell must share."""
    first = cells[0]
    for cell in cells[1:]:
        for section in SWEEP_SECTIONS:
            if cell[section] != first[section]:
                a, b = OmegaConf.to_yaml(first[section]).strip(), OmegaConf.to_yaml(cell[section]).strip()
                raise ConfigError(section, b.replace("\n", " "), f"one value for the whole sweep (first cell: {a})",
                                  problem="varies across the sweep")
    return OmegaConf.masked_copy(first, list(SWEEP_SECTIONS))


def resources(cfg: DictConfig) -> dict[str, float]:
    return {"num_cpus": float(cfg.resources.num_cpus), "num_gpus": float(cfg.resources.num_gpus)}
