"""The config schema: one dataclass per config group, registered in Hydra's ConfigStore.

A trial's groups are typed in ``jobs/config.py`` (the data plane reads them); the sweep's
own (cluster, tracking, sweep) here. Hydra type-checks every group against these while
composing. Value rules that types cannot express (ranges, choices) sit in each field's
metadata and are checked by :func:`validate`, so every bad value is refused before
anything is submitted.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from jobs.config import (BackendConfig, BenchConfig, CalibConfig, DtypeConfig, EvalConfig, KernelConfig,
                         MethodConfig, ModelConfig, QuantConfig, TrialConfig, nested_schema, rule, type_hints)
from orchestrator.errors import ConfigError


@dataclass
class ClusterConfig:
    name: str = "local"
    address: Optional[str] = None      # None: start an embedded local Ray
    num_cpus: Optional[int] = rule(None, ge=1)  # embedded Ray only; None: all cores
    max_retries: int = rule(3, ge=0)   # re-runs of a trial whose worker or node died (not of its own errors)
    max_concurrent_trials: Optional[int] = rule(None, ge=1)  # None: as many as the cluster fits
    # A trial that no node could ever hold is UNSUPPORTED at once, unless an autoscaler may add one.
    autoscaling: bool = False
    # One worker process per trial: its memory (and CUDA context) is freed when it ends.
    fresh_worker_per_trial: bool = True


@dataclass
class TrackingConfig:
    # None: MLflow's MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory.
    uri: Optional[str] = None
    # Writes that fail (server unreachable) are retried; at the sweep's end the driver waits
    # this long for them to land before giving up.
    flush_timeout_s: float = rule(600.0, gt=0)
    # Sample MLflow's system metrics (CPU, memory; GPU utilisation and memory with nvidia-ml-py)
    # on each trial's worker this often, into the trial's run. None: off.
    system_metrics_interval_s: Optional[float] = rule(None, gt=0)


@dataclass
class SensitivityConfig:
    """A sensitivity sweep (orchestrator/sensitivity.py): every cell becomes its baseline (the cell as
    given), one trial per layer group and candidate dtype with that group alone quantized to it and the
    rest at the cell's dtype, and one per candidate with every group at it (the uniform points)."""
    groups: str = rule("none", choices=("none", "layer", "sublayer", "block"))  # none: an ordinary sweep
    dtypes: list[str] = rule(["int4", "mxfp4", "nvfp4", "int8"])  # conf/dtype names


@dataclass
class UniformPoint:
    """A uniform configuration a recipe is held against, as its sensitivity sweep measured it."""
    dtype: str = MISSING
    bits: float = MISSING
    kl_divergence: float = MISSING
    kl_divergence_stderr: float = MISSING


@dataclass
class RecipeNote:
    """What ``orchestrator recipe`` predicted for the recipe a sweep runs (a recipe file sets it)."""
    name: str = MISSING
    source: str = MISSING          # the sensitivity sweep's id
    budget_bits: float = MISSING
    bits: float = MISSING          # the recipe's bits per weight, over the layers it covers
    predicted_kl: float = MISSING
    predicted_kl_stderr: float = MISSING
    uniform: list[UniformPoint] = rule([])


@dataclass
class SweepConfig:
    name: str = "default"  # the MLflow experiment that holds the sweep
    id: Optional[str] = None  # None: a fresh swp-xxxxxx (`orchestrator submit` picks it up front)
    # Take cells that earlier sweeps (same experiment) finished, by trial key, instead of re-running them.
    reuse: bool = False
    # The cell each trial is compared with: these choices of dtype/quant/kernel/backend, and the
    # same model, bench, eval, seed, device and GPU type as the trial. Run first.
    baseline: dict[str, str] = field(default_factory=lambda: {"dtype": "bf16", "kernel": "torch", "backend": "hf"})
    report: bool = True  # the comparison report (table and plots) on the parent run at the sweep's end
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    recipe: Optional[RecipeNote] = None


@dataclass
class RootConfig(TrialConfig):
    """A trial's config and where it runs and is recorded: the same for every cell of a sweep."""
    cluster: ClusterConfig = MISSING
    tracking: TrackingConfig = MISSING
    sweep: SweepConfig = field(default_factory=SweepConfig)


GROUP_SCHEMAS = {"model": ModelConfig, "dtype": DtypeConfig, "quant": QuantConfig, "method": MethodConfig,
                 "calib": CalibConfig, "kernel": KernelConfig,
                 "backend": BackendConfig, "bench": BenchConfig, "eval": EvalConfig,
                 "cluster": ClusterConfig, "tracking": TrackingConfig}


def register() -> None:
    """Register the root schema, one schema per group (``base_<group>``) and our sweepers'."""
    from orchestrator import sweepers

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RootConfig)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"base_{group}", node=schema)
    sweepers.register()


def _fmt_choices(choices: tuple) -> str:
    return ", ".join("null" if c is None else str(c) for c in choices)


def validate(cfg: DictConfig | dict, schema: type = RootConfig, prefix: str = "",
             only: Optional[str] = None) -> None:
    """Check every field rule (``only``: that one field's); raise :class:`ConfigError` naming the first bad key."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    hints = type_hints(schema)
    for f in dataclasses.fields(schema):
        if only is not None and f.name != only:
            continue
        key, value = prefix + f.name, cfg[f.name]
        nested = nested_schema(hints[f.name])
        if nested is not None and isinstance(value, dict):
            names = [g.name for g in dataclasses.fields(nested)]
            unknown = next((k for k in value if k not in names), None)
            if unknown is not None:  # ++key=... adds keys no schema has
                raise ConfigError(f"{key}.{unknown}", value[unknown], f"allowed keys under {key}: {', '.join(names)}",
                                  problem="unknown key")
            validate(value, nested, key + ".")
            continue
        if isinstance(value, list):
            for i, item in enumerate(value if nested is not None else ()):
                validate(item, nested, f"{key}[{i}].")
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(key, value, "allowed: a finite number")
        choices, ge, gt, le = (f.metadata.get(k) for k in ("choices", "ge", "gt", "le"))
        if choices is not None and value not in choices:
            raise ConfigError(key, value, f"allowed: {_fmt_choices(choices)}")
        if value is not None and ge is not None and value < ge:
            raise ConfigError(key, value, f"allowed: >= {ge:g}")
        if value is not None and gt is not None and value <= gt:
            raise ConfigError(key, value, f"allowed: > {gt:g}")
        if value is not None and le is not None and value > le:
            raise ConfigError(key, value, f"allowed: <= {le:g}")


def _schema_at(path: str) -> Any:
    """The dataclass (or field type) at a dotted ``path`` of the schema; None if not there."""
    node: Any = RootConfig
    for part in filter(None, path.split(".")):
        schema = nested_schema(node)
        hints = type_hints(schema) if schema else {}
        if part not in hints:
            return None
        node = hints[part]
    return node


def allowed_keys(path: str) -> list[str]:
    """The keys the schema allows under a dotted ``path`` ('' for the root)."""
    schema = nested_schema(_schema_at(path))
    return [f.name for f in dataclasses.fields(schema)] if schema else []


def type_name(path: str) -> str:
    """How the schema types the key at ``path``, for error messages ("int", "Optional[str]")."""
    tp = _schema_at(path)
    return "unknown" if tp is None else getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
