"""From composed Hydra configs to validated TrialSpecs (the control plane's input check)."""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from jobs import data
from jobs.config import TrialConfig, uses_calibration
from jobs.config import build as build_schema
from jobs.spec import KEYED_RESOURCES, TASK_NAME, TRIAL_SECTIONS, TrialSpec, context_length
from kernels import catalog
from orchestrator import schema
from orchestrator.errors import ConfigError

# Keys that belong to the whole sweep, not to a cell: they must not vary across cells.
SWEEP_SECTIONS = ("cluster", "tracking", "sweep")


def trial_config(cfg: DictConfig | dict, rules: Optional[list[dict[str, Any]]] = None,
                 checks: Optional["_Checks"] = None) -> dict[str, Any]:
    """The resolved, plain TRIAL_SECTIONS of a composed config, and its resources (``rules``: its
    ``quant.rules`` resolved already)."""
    plain = plain_config(cfg)
    config = {k: plain[k] for k in TRIAL_SECTIONS}
    # Only the trial's own backend's and method's options: they are part of what it computes, the others' are not.
    backend = config["backend"]
    config["backend"] = {"name": backend["name"], **{k: v for k, v in backend.items() if k == backend["name"]}}
    config["quant"] = {**config["quant"], "rules": resolve_rules(plain) if rules is None else rules}
    config["method"] = _method_config(config["method"], config["dtype"], config["quant"])
    if config["quant"]["activation_scales"] == "dynamic":  # the observer chooses static scales only
        config["quant"] = {k: v for k, v in config["quant"].items() if k not in STATIC_SCALE_KEYS}
    config["resources"] = dict(plain["resources"])
    calibrated = (checks or _Checks(plain)).once("calibrates", lambda: _uses_calibration(config),
                                                 ("dtype", "quant", "method"))
    if not calibrated:
        del config["calib"]
    return config


def _uses_calibration(config: dict[str, Any]) -> bool:
    """:func:`jobs.config.uses_calibration` of a trial's config, from the only sections it reads."""
    from types import SimpleNamespace

    from jobs.config import DtypeConfig, MethodConfig, QuantConfig

    return uses_calibration(SimpleNamespace(dtype=build_schema(DtypeConfig, config["dtype"]),
                                            quant=build_schema(QuantConfig, config["quant"]),
                                            method=build_schema(MethodConfig, config["method"])))


def _method_config(method: dict[str, Any], dtype: dict[str, Any], quant: dict[str, Any]) -> dict[str, Any]:
    """The method's settings that decide what the trial computes: its rounding's options (and those of a
    rule's rounding), and each transform's only where it is on. A plain cast has no method; without
    quantized weights every rounding is the same trial (rtn), and a rotation or SmoothQuant still shapes
    the activations and KV cache."""
    if dtype["format"] is None and not any(r["dtype"]["format"] is not None for r in quant["rules"]):
        return {"name": "rtn"}
    weights = quant["weights"]
    name = method["name"] if weights else "rtn"
    roundings = dict.fromkeys([name, *(r["method"] for r in quant["rules"] if r["method"])])
    kept = {"name": name, **{n: method[n] for n in roundings if n in method}}
    if method["rotation"] != "none":
        kept.update(rotation=method["rotation"], rotation_size=method["rotation_size"])
    if method["scaling"] != "none":
        kept.update(scaling=method["scaling"], **{method["scaling"]: method[method["scaling"]]})
    if method["clip"] and weights:
        kept.update(clip=True, clip_grid=method["clip_grid"], clip_min=method["clip_min"])
    return kept


def plain_config(cfg: DictConfig | dict) -> dict[str, Any]:
    """The config as resolved plain data (Hydra's own ``hydra`` node left out)."""
    if isinstance(cfg, dict):
        return cfg
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg
                                  else cfg, resolve=True)


# Settings added after sweeps were stored: at these values they are left out of the key, so a cell
# that does not use them keeps the key it had.
# A section left empty is left out too (method=rtn: the key of a trial from before methods existed).
KEY_NEUTRAL_DEFAULTS = {"eval": {"tasks": [], "task_limit": None, "num_fewshot": None},
                        "method": {"name": "rtn"},
                        "model": {"outliers": None}, "quant": {"activation_scales": "dynamic", "rules": []},
                        "backend": {"noop": {"x": 0.0, "y": 0.0}}}
STATIC_SCALE_KEYS = ("activation_observer", "activation_percentile")


def trial_key(config: dict[str, Any]) -> str:
    """A stable hash of the canonical resolved config: same cell, same key, whatever the overrides.
    Of the resources only the GPU model counts: more CPUs or a longer timeout is the same trial."""
    keyed = {**{k: config[k] for k in TRIAL_SECTIONS if k in config},
             "resources": {k: config["resources"][k] for k in KEYED_RESOURCES}}
    keyed = _without_neutral(keyed, KEY_NEUTRAL_DEFAULTS)
    canonical = json.dumps(keyed, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _without_neutral(node: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``node`` less the keys at their key-neutral default (a dict of defaults: the same one level down);
    a section left empty goes too."""
    out = {}
    for key, value in node.items():
        neutral = defaults.get(key, _NO_DEFAULT)
        if isinstance(neutral, dict) and neutral and isinstance(value, dict):
            value = _without_neutral(value, neutral)
            if not value:
                continue
        elif key in defaults and value == neutral:
            continue
        out[key] = value
    return out


_NO_DEFAULT = object()


def trial_spec(cfg: DictConfig | dict, overrides: Sequence[str]) -> TrialSpec:
    """Validate one composed cell and make its TrialSpec; raises ConfigError."""
    plain = plain_config(cfg)
    checks = _Checks(plain)
    for section in plain:  # each against its schema
        checks.once(f"schema of {section}", lambda: schema.validate(plain, only=section), (section,))
    checks.once("model", lambda: _check_model(plain["model"]), ("model",))
    checks.once("dtype", lambda: _check_dtype(plain["dtype"], plain["quant"]), ("dtype", "quant"))
    rules = checks.once("rules", lambda: resolve_rules(plain), ("dtype", "quant"))
    resolved = {**plain, "quant": {**plain["quant"], "rules": rules}}
    checks.once("method", lambda: _check_method(resolved), ("dtype", "quant", "method", "calib", "eval"))
    checks.once("rule matches", lambda: _check_rule_matches(resolved, rules), ("model", "dtype", "quant"))
    checks.once("tasks", lambda: _check_tasks(plain["eval"]["tasks"]), ("eval",))
    config = trial_config(plain, rules, checks)
    spec = TrialSpec(trial_key=trial_key(config), config=config, overrides=cell_overrides(overrides))
    if plain["backend"]["name"] == "vllm":
        checks.once("vllm", lambda: _check_vllm(spec.settings), ("backend", "resources", "bench", "eval"))
    return spec


class _Checks:
    """Each check of a cell runs once per distinct content of the config sections it reads: the cells of
    a sweep mostly differ in a value or two, so a 10,000-cell grid costs what its distinct values cost.
    A check's result (or None) is kept by (its name, those sections' JSON); a check that fails raises,
    and is not kept. Cells share their unchanged sections (orchestrator.launcher), so a section's JSON
    is kept by the section too (with the section, so that its id is not reused)."""

    done: dict[tuple, Any] = {}
    texts: dict[int, tuple[Any, str]] = {}
    MAX_KEPT = 200_000  # then start again

    def __init__(self, plain: dict[str, Any]) -> None:
        self.plain = plain

    def once(self, name: str, check: Callable[[], Any], sections: Sequence[str]) -> Any:
        key = (name, *(self._text(self.plain[s]) for s in sections))
        if key not in self.done:
            if len(self.done) > self.MAX_KEPT:
                self.done.clear()
            self.done[key] = check()
        return self.done[key]

    def _text(self, section: Any) -> str:
        kept = self.texts.get(id(section))
        if kept is None or kept[0] is not section:
            if len(self.texts) > self.MAX_KEPT:
                self.texts.clear()
            kept = self.texts[id(section)] = section, json.dumps(section, sort_keys=True, default=str)
        return kept[1]


def forget_checks() -> None:
    """Start a plan afresh: what a check read besides the config (conf/dtype files, the working directory
    for calib.text) may have changed since the last one in this process."""
    _Checks.done.clear()
    _Checks.texts.clear()


def _check_model(model: dict[str, Any]) -> None:
    if model["source"] == "build" and model["build"] is None:
        raise ConfigError("model.build", None, "required when model.source=build", problem="missing")


def _check_tasks(tasks: list) -> None:
    for task in tasks:
        if not (isinstance(task, str) and TASK_NAME.fullmatch(task)):
            raise ConfigError("eval.tasks", task, "allowed: lm-eval task names (letters, digits, _ and -)")


def cell_overrides(overrides: Sequence[str]) -> tuple[str, ...]:
    """The overrides that make a cell what it is, for its run name and tags: not the sweep-level
    ones (the same for every cell; tracking.uri may hold a password), and with secrets masked."""
    from orchestrator.credentials import mask

    def root(override: str) -> str:
        return override.split("=", 1)[0].lstrip("+~").split("@", 1)[0].split(".", 1)[0]

    return tuple(mask(o) for o in overrides if root(o) not in (*SWEEP_SECTIONS, "hydra"))


RULE_DTYPE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")


def dtype_settings(name: str, key: str) -> dict[str, Any]:
    """The settings of ``conf/dtype/<name>.yaml``, as Hydra composes the group option (ConfigError if none)."""
    from orchestrator.paths import CONF_DIR

    names = sorted(p.stem for p in (CONF_DIR / "dtype").glob("*.yaml"))
    if not (isinstance(name, str) and RULE_DTYPE_NAME.fullmatch(name)) or name not in names:
        raise ConfigError(key, name, f"allowed: a conf/dtype name ({', '.join(names)}) or a dtype's settings "
                          "({name: ..., format: ..., ...})")
    return _dtype_file(name)


@functools.cache
def _dtype_file(name: str) -> dict[str, Any]:
    from orchestrator.paths import CONF_DIR

    loaded = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "dtype" / f"{name}.yaml"))
    loaded.pop("defaults", None)
    return loaded


def resolve_rules(plain: dict) -> list[dict[str, Any]]:
    """``quant.rules`` with each rule's dtype resolved to its full settings (its compute_dtype dropped: the
    model computes in the trial's) and checked as ``dtype`` is; and the method left out where it chooses
    nothing (no quantized weights, or a rule that keeps its layers unquantized)."""
    from jobs.config import DtypeConfig

    resolved = []
    for i, layer_rule in enumerate(plain["quant"]["rules"]):
        key = f"quant.rules[{i}]"
        match, dtype = layer_rule["match"], layer_rule["dtype"]
        if not (isinstance(match, str) and match.strip()):
            raise ConfigError(f"{key}.match", match, "allowed: a glob over layer names (*.mlp.down_proj)")
        if dtype is None:
            dtype = dict(plain["dtype"])
        elif isinstance(dtype, str):
            dtype = dtype_settings(dtype, f"{key}.dtype")
        elif not isinstance(dtype, dict):
            raise ConfigError(f"{key}.dtype", dtype, "allowed: a conf/dtype name or a dtype's settings")
        try:
            typed = build_schema(DtypeConfig, dtype, f"{key}.dtype.")
        except ValueError as e:
            raise ConfigError(str(e).split(":")[0], "?", f"allowed keys: {', '.join(schema.allowed_keys('dtype'))}",
                              problem="not a dtype setting") from None
        settings = {k: v for k, v in dataclasses.asdict(typed).items() if k != "compute_dtype"}
        schema.validate(settings | {"compute_dtype": "auto"}, DtypeConfig, f"{key}.dtype.")
        _check_dtype(settings, plain["quant"], f"{key}.dtype")
        method = layer_rule["method"] if plain["quant"]["weights"] and settings["format"] is not None else None
        resolved.append({"match": match, "dtype": settings, "method": method})
    return resolved


@functools.cache
def _layer_names(model_json: str) -> tuple[str, ...]:
    from jobs.config import ModelConfig
    from jobs.models import linear_layer_names

    model = build_schema(ModelConfig, json.loads(model_json))
    try:
        return tuple(linear_layer_names(model))
    except ValueError as e:
        raise ConfigError("model", model.name, "a model whose config can be read here (quant.rules and sensitivity "
                          "sweeps are checked against its layer names)", problem=str(e)) from None


def quantizable_layers(plain: dict) -> list[str]:
    """The names of the model's linear layers outside ``quant.skip_layers``, read from its config alone
    (a meta-device build: no weight is loaded)."""
    from jobs.config import is_skipped

    names = _layer_names(json.dumps(plain["model"], sort_keys=True))
    return [n for n in names if not is_skipped(n, plain["quant"]["skip_layers"])]


def block_index_at(parts: Sequence[str]) -> Optional[int]:
    """Where a layer name's decoder-block index is among its dotted ``parts`` (``model.layers.3.mlp``: 2),
    or None for a layer outside the indexed blocks (lm_head)."""
    return next((i for i, p in enumerate(parts) if p.isdigit()), None)


def describe_layers(names: Sequence[str], limit: int = 12) -> str:
    """Layer names with their block indexes folded (``model.layers.{0-31}.mlp.down_proj``), for messages."""
    folded: dict[str, list[int]] = {}
    for name in names:
        parts = name.split(".")
        at = block_index_at(parts)
        pattern = name if at is None else ".".join([*parts[:at], "{}", *parts[at + 1:]])
        folded.setdefault(pattern, []).append(-1 if at is None else int(parts[at]))
    shown = [p if -1 in idx else p.replace("{}", f"{{{min(idx)}-{max(idx)}}}" if len(idx) > 1 else str(idx[0]))
             for p, idx in folded.items()]
    return ", ".join(shown[:limit]) + (f", ... ({len(shown) - limit} more)" if len(shown) > limit else "")


def _check_rule_matches(plain: dict, rules: list[dict]) -> None:
    """Every rule must take at least one quantizable layer: a glob that matches none, or only layers an
    earlier rule took, is refused with the names it could have matched."""
    if not rules:
        return
    names = quantizable_layers(plain)
    taken: set[str] = set()
    for i, layer_rule in enumerate(rules):
        matched = {n for n in names if fnmatch.fnmatchcase(n, layer_rule["match"])}
        if not matched - taken:
            why = ("every layer it matches is taken by an earlier rule (first match wins)" if matched else
                   f"matches no quantizable layer of {plain['model']['name']}")
            raise ConfigError(f"quant.rules[{i}].match", layer_rule["match"],
                              f"allowed: a glob over the layer names ({describe_layers(names)}; "
                              f"quant.skip_layers={plain['quant']['skip_layers']} are not quantized)", problem=why)
        taken |= matched


def _check_dtype(dtype: DictConfig | dict, quant: DictConfig | dict, key: str = "dtype") -> None:
    """The format's knobs must exist and fit it (the same check the numerics make)."""
    if dtype["format"] is None:
        return
    try:
        catalog.check_knobs(dtype["format"], dtype["granularity"], dtype["group_size"], dtype["rounding"],
                            dtype["scale_rule"], dtype["overflow"], dtype["symmetric"])
    except catalog.KnobError as e:
        raise ConfigError(f"{key}.{e.key}", e.value, f"allowed for {dtype['format']}: "
                          f"{', '.join(map(str, e.allowed))}") from None
    if not (quant["weights"] or quant["activations"] or quant["kv_cache"]):
        raise ConfigError("quant", quant["name"], "at least one of quant.weights, quant.activations, quant.kv_cache",
                          problem="quantizes nothing")


def _check_method(plain: dict) -> None:
    """What the method and static activation scales need of each dtype the layers take, and of the scheme."""
    quant, method = plain["quant"], plain["method"]
    layers = [("dtype", plain["dtype"], method["name"]),
              *((f"quant.rules[{i}].dtype", r["dtype"], r["method"] or method["name"])
                for i, r in enumerate(quant["rules"]))]
    layers = [(key, dtype, rounding) for key, dtype, rounding in layers if dtype["format"] is not None]
    if not layers:
        return  # a plain cast: nothing is quantized, no method or scale applies
    static = quant["activation_scales"] == "static"
    if static and not quant["activations"]:
        raise ConfigError("quant.activation_scales", "static", "allowed without quant.activations: dynamic "
                          "(take quant=w_a_static)")
    for key, dtype, rounding in layers:
        if rounding != "rtn" and quant["weights"] and dtype["rounding"] != "nearest":
            raise ConfigError(f"{key}.rounding", dtype["rounding"], f"allowed with method={rounding}: nearest")
        _check_transforms(method, quant, dtype, key)
        if static and isinstance(catalog.get_format(dtype["format"]), catalog.BlockSpec):
            raise ConfigError("quant.activation_scales", "static",
                              f"allowed for {dtype['format']}{'' if key == 'dtype' else f' ({key})'}: dynamic "
                              "(static scales are for element formats: fp8, fp6, fp4, int8, int4, int3)")
        if static and not dtype["symmetric"]:
            raise ConfigError(f"{key}.symmetric", False, "allowed with quant.activation_scales=static: true")
    calib, eval_text = plain["calib"], plain["eval"]["text"]
    if calib["dataset"] is None and calib["text"] not in data.BUILTIN_TEXTS and (
            calib["text"] == eval_text or Path(calib["text"]).expanduser().resolve() ==
            Path(eval_text).expanduser().resolve()):
        raise ConfigError("calib.text", calib["text"], "allowed: any text but the eval text (eval.text); "
                          "calibrating on what is evaluated flatters the method", problem="is the eval text")


def _check_transforms(method: dict, quant: dict, dtype: dict, key: str = "dtype") -> None:
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
        for knob, allowed in (("rounding", "nearest"), ("overflow", "saturate")):
            if dtype[knob] != allowed:
                raise ConfigError(f"{key}.{knob}", dtype[knob], f"allowed with method.clip=true: {allowed}")
        if dtype["scale_rule"] == "mse":
            raise ConfigError(f"{key}.scale_rule", "mse", "allowed with method.clip=true: the format's others "
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


def sweep_settings(cells: Sequence[DictConfig | dict]) -> DictConfig:
    """The sweep-level sections, which every cell must share."""
    first = plain_config(cells[0])
    for cell in map(plain_config, cells[1:]):
        for section in SWEEP_SECTIONS:
            if cell[section] != first[section]:
                a, b = first[section], cell[section]
                key = next(k for k in a if a[k] != b.get(k))
                raise ConfigError(f"{section}.{key}", b[key], f"one value for the whole sweep (first cell: {a[key]})",
                                  problem="varies across the sweep")
    from orchestrator.pairing import BASELINE_SECTIONS

    baseline = first["sweep"]["baseline"]
    for section in baseline:
        if section not in BASELINE_SECTIONS:
            raise ConfigError(f"sweep.baseline.{section}", baseline[section],
                              f"keys of sweep.baseline: {', '.join(BASELINE_SECTIONS)}", problem="unknown key")
    if first["sweep"]["id"] is not None:
        from orchestrator.tracking import check_sweep_id

        check_sweep_id(first["sweep"]["id"], "sweep.id")
    return OmegaConf.create({section: first[section] for section in SWEEP_SECTIONS})


def is_baseline(cfg: DictConfig | dict) -> bool:
    """A cell with the choices of ``sweep.baseline`` (default: bf16 through the torch kernel on hf), and no
    per-layer rules."""
    plain = plain_config(cfg)
    return not plain["quant"]["rules"] and all(plain[section]["name"] == str(name)
                                               for section, name in plain["sweep"]["baseline"].items())


def ray_options(cfg: DictConfig | dict) -> dict[str, Any]:
    """The Ray task options that place one trial: CPUs, GPUs, memory, accelerator type."""
    res = plain_config(cfg)["resources"]
    options: dict[str, Any] = {"num_cpus": float(res["num_cpus"]), "num_gpus": float(res["num_gpus"])}
    if res["memory_gb"] is not None:
        options["memory"] = int(res["memory_gb"] * 2 ** 30)
    if res["accelerator_type"] is not None:
        options["accelerator_type"] = res["accelerator_type"]
    return options


@dataclass(frozen=True)
class PlannedTrial:
    """One validated cell, ready for :func:`orchestrator.sweep.execute`."""
    spec: TrialSpec
    ray_options: dict[str, Any]  # num_cpus, num_gpus, memory, accelerator_type
    timeout_s: Optional[float] = None
    baseline: bool = False


def planned_trial(cfg: DictConfig | dict, overrides: Sequence[str]) -> PlannedTrial:
    plain = plain_config(cfg)
    return PlannedTrial(trial_spec(plain, overrides), ray_options(plain), plain["resources"]["timeout_s"],
                        is_baseline(plain))


def print_plan(trials: Sequence) -> None:
    """One line per planned trial: key, overrides, what it asks of the cluster, and the device time its
    bench and eval need by the roofline; then the sweep's total in GPU-hours."""
    keys = {t.spec.trial_key for t in trials}
    print(f"{len(trials)} cells, {len(keys)} distinct trials, all valid:")
    total, unknown = 0.0, 0
    for t in trials:
        asks = ", ".join(f"{k}={v}" for k, v in t.ray_options.items())
        seconds, where = _device_seconds(t.spec)
        if seconds is None:
            unknown += 1
        else:
            total += seconds * max(1.0, t.ray_options["num_gpus"])
        when = "device time: n/a (no model config here)" if seconds is None else f"~{seconds:.3g} s on {where}"
        print(f"  {t.spec.trial_key}  {' '.join(t.spec.overrides) or '(defaults)'}  [{asks}]  {when}"
              f"{'  baseline' if t.baseline else ''}")
    print(f"predicted device time: {total / 3600:.3g} GPU-hours for {len(trials) - unknown} cells (the roofline of "
          f"each cell's bench and eval on its accelerator type, or an H100-SXM; loading, quantizing and host "
          f"overheads come on top){f'; {unknown} cells without a model config here' if unknown else ''}")


def _device_seconds(spec: TrialSpec) -> tuple[Optional[float], str]:
    """:func:`predicted_device_seconds` of a planned trial, once per distinct config but its seed."""
    config = spec.config
    return _Checks(config).once("device seconds", lambda: predicted_device_seconds(spec.settings),
                                [s for s in config if s != "seed"])


def predicted_device_seconds(cfg: TrialConfig) -> tuple[Optional[float], str]:
    """(the roofline's device time for the trial's bench and eval, on which accelerator), or (None, ...)
    where the model's config is not readable here."""
    from jobs.perf_model import device_seconds
    from orchestrator import accelerators

    try:
        accelerator = accelerators.by_name(cfg.resources.accelerator_type or "H100-SXM")
    except KeyError:
        accelerator = accelerators.by_name("H100-SXM")
    shape = _shape(json.dumps(dataclasses.asdict(cfg.model), sort_keys=True))
    if shape is None or cfg.backend.name == "noop":
        return (0.0 if cfg.backend.name == "noop" else None), accelerator.name
    return device_seconds(cfg, shape, accelerator.peaks()), accelerator.name


@functools.cache
def _shape(model_json: str):
    from jobs.config import ModelConfig
    from jobs.perf_model import model_shape

    return model_shape(build_schema(ModelConfig, json.loads(model_json)))

