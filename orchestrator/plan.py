"""From composed Hydra configs to validated TrialSpecs (the control plane's input check)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from jobs import data
from jobs.config import TrialConfig, uses_calibration
from jobs.spec import KEYED_RESOURCES, TASK_NAME, TRIAL_SECTIONS, TrialSpec, context_length
from kernels import catalog
from orchestrator import schema
from orchestrator.errors import ConfigError

# Keys that belong to the whole sweep, not to a cell: they must not vary across cells.
SWEEP_SECTIONS = ("cluster", "tracking", "sweep")


def trial_config(cfg: DictConfig | dict) -> dict[str, Any]:
    """The resolved, plain TRIAL_SECTIONS of a composed config, and its resources."""
    plain = _plain(cfg)
    config = {k: plain[k] for k in TRIAL_SECTIONS}
    # Only the trial's own backend's and method's options: they are part of what it computes, the others' are not.
    backend = config["backend"]
    config["backend"] = {"name": backend["name"], **{k: v for k, v in backend.items() if k == backend["name"]}}
    config["method"] = _method_config(config["method"], config["dtype"], config["quant"])
    if config["quant"]["activation_scales"] == "dynamic":  # the observer chooses static scales only
        config["quant"] = {k: v for k, v in config["quant"].items() if k not in STATIC_SCALE_KEYS}
    config["resources"] = dict(plain["resources"])
    if not uses_calibration(TrialConfig.from_dict(config)):
        del config["calib"]
    return config


def _method_config(method: dict[str, Any], dtype: dict[str, Any], quant: dict[str, Any]) -> dict[str, Any]:
    """The method's settings that decide what the trial computes: its rounding's options, and each
    transform's only where it is on. A plain cast has no method; without quantized weights every rounding
    is the same trial (rtn), and a rotation or SmoothQuant still shapes the activations and KV cache."""
    if dtype["format"] is None:
        return {"name": "rtn"}
    weights = quant["weights"]
    name = method["name"] if weights else "rtn"
    kept = {"name": name, **({name: method[name]} if name in method else {})}
    if method["rotation"] != "none":
        kept.update(rotation=method["rotation"], rotation_size=method["rotation_size"])
    if method["scaling"] != "none":
        kept.update(scaling=method["scaling"], **{method["scaling"]: method[method["scaling"]]})
    if method["clip"] and weights:
        kept.update(clip=True, clip_grid=method["clip_grid"], clip_min=method["clip_min"])
    return kept


def _plain(cfg: DictConfig | dict) -> dict[str, Any]:
    """The config as resolved plain data (Hydra's own ``hydra`` node left out)."""
    if isinstance(cfg, dict):
        return cfg
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg
                                  else cfg, resolve=True)


# Settings added after sweeps were stored: at these values they are left out of the key, so a cell
# that does not use them keeps the key it had.
# A section left empty is left out too (method=rtn: the key of a trial from before methods existed).
KEY_NEUTRAL_DEFAULTS = {"eval": {"tasks": [], "task_limit": None, "num_fewshot": None},
                        "quant": {"activation_scales": "dynamic"}, "method": {"name": "rtn"},
                        "model": {"outliers": None}}
STATIC_SCALE_KEYS = ("activation_observer", "activation_percentile")


def trial_key(config: dict[str, Any]) -> str:
    """A stable hash of the canonical resolved config: same cell, same key, whatever the overrides.
    Of the resources only the GPU model counts: more CPUs or a longer timeout is the same trial."""
    keyed = {**{k: config[k] for k in TRIAL_SECTIONS if k in config},
             "resources": {k: config["resources"][k] for k in KEYED_RESOURCES}}
    for section, defaults in KEY_NEUTRAL_DEFAULTS.items():
        if section in keyed:
            keyed[section] = {k: v for k, v in keyed[section].items() if k not in defaults or v != defaults[k]}
            if not keyed[section]:
                del keyed[section]
    canonical = json.dumps(keyed, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def trial_spec(cfg: DictConfig, overrides: Sequence[str]) -> TrialSpec:
    """Validate one composed cell and make its TrialSpec; raises ConfigError."""
    plain = _plain(cfg)
    schema.validate(plain)
    model = plain["model"]
    if model["source"] == "build" and model["build"] is None:
        raise ConfigError("model.build", None, "required when model.source=build", problem="missing")
    _check_dtype(cfg.dtype, cfg.quant)
    _check_method(plain)
    for task in plain["eval"]["tasks"]:
        if not (isinstance(task, str) and TASK_NAME.fullmatch(task)):
            raise ConfigError("eval.tasks", task, "allowed: lm-eval task names (letters, digits, _ and -)")
    config = trial_config(plain)
    spec = TrialSpec(trial_key=trial_key(config), config=config, overrides=cell_overrides(overrides))
    if plain["backend"]["name"] == "vllm":
        _check_vllm(spec.settings)
    return spec


def cell_overrides(overrides: Sequence[str]) -> tuple[str, ...]:
    """The overrides that make a cell what it is, for its run name and tags: not the sweep-level
    ones (the same for every cell; tracking.uri may hold a password), and with secrets masked."""
    from orchestrator.credentials import mask

    def root(override: str) -> str:
        return override.split("=", 1)[0].lstrip("+~").split("@", 1)[0].split(".", 1)[0]

    return tuple(mask(o) for o in overrides if root(o) not in (*SWEEP_SECTIONS, "hydra"))


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


def _check_method(plain: dict) -> None:
    """What the method and static activation scales need of the dtype and scheme."""
    dtype, quant, method = plain["dtype"], plain["quant"], plain["method"]["name"]
    if dtype["format"] is None:
        return  # a plain cast: nothing is quantized, no method or scale applies
    if method != "rtn" and quant["weights"] and dtype["rounding"] != "nearest":
        raise ConfigError("dtype.rounding", dtype["rounding"], f"allowed with method={method}: nearest")
    _check_transforms(plain["method"], quant, dtype)
    if quant["activation_scales"] == "static":
        if not quant["activations"]:
            raise ConfigError("quant.activation_scales", "static", "allowed without quant.activations: dynamic "
                              "(take quant=w_a_static)")
        if isinstance(catalog.get_format(dtype["format"]), catalog.BlockSpec):
            raise ConfigError("quant.activation_scales", "static",
                              f"allowed for {dtype['format']}: dynamic (static scales are for element formats: "
                              "fp8, fp6, fp4, int8, int4, int3)")
        if not dtype["symmetric"]:
            raise ConfigError("dtype.symmetric", False, "allowed with quant.activation_scales=static: true")
    calib, eval_text = plain["calib"], plain["eval"]["text"]
    if calib["dataset"] is None and calib["text"] not in data.BUILTIN_TEXTS and (
            calib["text"] == eval_text or Path(calib["text"]).expanduser().resolve() ==
            Path(eval_text).expanduser().resolve()):
        raise ConfigError("calib.text", calib["text"], "allowed: any text but the eval text (eval.text); "
                          "calibrating on what is evaluated flatters the method", problem="is the eval text")


def _check_transforms(method: dict, quant: dict, dtype: dict) -> None:
    """Transforms that would do nothing, or undo each other, are refused with the reason."""
    scaling = method["scaling"]
    if scaling != "none" and method["rotation"] != "none":
        raise ConfigError("method.scaling", scaling, f"allowed with method.rotation={method['rotation']}: none "
                          "(a rotation spreads every channel over all the others: no outlier channel is left to "
                          "rescale, and scales applied first would be spread with it)")
    if scaling == "smoothquant" and not quant["activations"]:
        raise ConfigError("method.scaling", "smoothquant", f"allowed with quant={quant['name']} (weights only): "
                          "none or awq (SmoothQuant moves the difficulty of quantized activations into the weights; "
                          "take quant=w_a_dynamic or w_a_static)")
    if scaling == "awq" and not quant["weights"]:
        raise ConfigError("method.scaling", "awq", f"allowed with quant={quant['name']} (weights not quantized): "
                          "none or smoothquant (AWQ chooses scales for the weights' rounding)")
    if method["clip"] and quant["weights"]:
        for key, allowed in (("rounding", "nearest"), ("overflow", "saturate")):
            if dtype[key] != allowed:
                raise ConfigError(f"dtype.{key}", dtype[key], f"allowed with method.clip=true: {allowed}")
        if dtype["scale_rule"] == "mse":
            raise ConfigError("dtype.scale_rule", "mse", "allowed with method.clip=true: the format's others "
                              "(mse clips on the weights' own error; method.clip searches the output's)")


def _check_vllm(cfg: TrialConfig) -> None:
    """What the engine would refuse only once it is up, refused before anything is submitted."""
    backend, num_gpus = cfg.backend.vllm, cfg.resources.num_gpus
    if backend.logprobs_top_k == 0:
        raise ConfigError("backend.vllm.logprobs_top_k", 0, "allowed: -1 (the whole vocabulary) or >= 1")
    tp = backend.tensor_parallel_size
    if tp > 1 and num_gpus < tp:
        raise ConfigError("backend.vllm.tensor_parallel_size", tp,
                          f"allowed: <= resources.num_gpus ({num_gpus:g}); a tensor-parallel trial runs on the GPUs "
                          "Ray gives its task, on one node; set resources.num_gpus too")
    needed = context_length(cfg.bench, cfg.eval)
    if backend.max_model_len is not None and backend.max_model_len < needed:
        raise ConfigError("backend.vllm.max_model_len", backend.max_model_len,
                          f"allowed: >= {needed} (bench.prompt_len + 1 + bench.decode_tokens, and eval.seq_len + 1)")


def sweep_settings(cells: Sequence[DictConfig]) -> DictConfig:
    """The sweep-level sections, which every cell must share."""
    first = cells[0]
    for cell in cells[1:]:
        for section in SWEEP_SECTIONS:
            if cell[section] != first[section]:
                a, b = (OmegaConf.to_container(c[section], resolve=True) for c in (first, cell))
                key = next(k for k in a if a[k] != b.get(k))
                raise ConfigError(f"{section}.{key}", b[key], f"one value for the whole sweep (first cell: {a[key]})",
                                  problem="varies across the sweep")
    from orchestrator.pairing import BASELINE_SECTIONS

    for section in first.sweep.baseline:
        if section not in BASELINE_SECTIONS:
            raise ConfigError(f"sweep.baseline.{section}", first.sweep.baseline[section],
                              f"keys of sweep.baseline: {', '.join(BASELINE_SECTIONS)}", problem="unknown key")
    if first.sweep.id is not None:
        from orchestrator.tracking import check_sweep_id

        check_sweep_id(first.sweep.id, "sweep.id")
    return OmegaConf.masked_copy(first, list(SWEEP_SECTIONS))


def is_baseline(cfg: DictConfig) -> bool:
    """A cell with the choices of ``sweep.baseline`` (default: bf16 through the torch kernel on hf)."""
    return all(cfg[section].name == str(name) for section, name in cfg.sweep.baseline.items())


def ray_options(cfg: DictConfig) -> dict[str, Any]:
    """The Ray task options that place one trial: CPUs, GPUs, memory, accelerator type."""
    res = cfg.resources
    options: dict[str, Any] = {"num_cpus": float(res.num_cpus), "num_gpus": float(res.num_gpus)}
    if res.memory_gb is not None:
        options["memory"] = int(res.memory_gb * 2 ** 30)
    if res.accelerator_type is not None:
        options["accelerator_type"] = res.accelerator_type
    return options


@dataclass(frozen=True)
class PlannedTrial:
    """One validated cell, ready for :func:`orchestrator.sweep.execute`."""
    spec: TrialSpec
    ray_options: dict[str, Any]  # num_cpus, num_gpus, memory, accelerator_type
    timeout_s: Optional[float] = None
    baseline: bool = False


def planned_trial(cfg: DictConfig, overrides: Sequence[str]) -> PlannedTrial:
    return PlannedTrial(trial_spec(cfg, overrides), ray_options(cfg), cfg.resources.timeout_s, is_baseline(cfg))


def print_plan(trials: Sequence) -> None:
    """One line per planned trial: key, overrides, what it asks of the cluster."""
    keys = {t.spec.trial_key for t in trials}
    print(f"{len(trials)} cells, {len(keys)} distinct trials, all valid:")
    for t in trials:
        asks = ", ".join(f"{k}={v}" for k, v in t.ray_options.items())
        print(f"  {t.spec.trial_key}  {' '.join(t.spec.overrides) or '(defaults)'}  [{asks}]"
              f"{'  baseline' if t.baseline else ''}")

