"""A cell's config composed as `orchestrator run` composes it, and Hydra's composition errors
as one-line :class:`~orchestrator.errors.ConfigError`s."""

from __future__ import annotations

import re

from omegaconf import DictConfig

from orchestrator import schema
from orchestrator.errors import ConfigError
from orchestrator.paths import CONF_DIR


def compose(*overrides: str) -> DictConfig:
    """The composed config of one cell: ``conf/config.yaml`` with ``overrides``, through Hydra's compose API."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    schema.register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def from_hydra(exc: BaseException) -> ConfigError | None:
    """A :class:`ConfigError` for a Hydra/OmegaConf composition error, or None if not one."""
    from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

    if isinstance(exc, ConfigError):
        return exc
    if isinstance(exc, OverrideParseException):
        key, _, value = (exc.override or "?").partition("=")
        return ConfigError(key, value or "?", "allowed: key=value in Hydra's override syntax; quote a value with "
                           "spaces or non-ASCII letters (key='a b'), sweep with commas (key=1,2) or range(1,4)",
                           problem="cannot be parsed")
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file and "/" in exc.missing_cfg_file:
        group, _, option = exc.missing_cfg_file.rpartition("/")
        # base_<group> are the schemas registered for the YAML files to extend, not choices.
        options = ", ".join(o for o in exc.options or () if not o.startswith("base_")) or "(none)"
        return ConfigError(group, option, f"allowed: {options}", problem=f"no such {group} config")
    cause = exc.__cause__ if isinstance(exc, ConfigCompositionException) else exc
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and getattr(cause, "full_key", None):
        parent, _, _ = cause.full_key.rpartition(".")
        keys = schema.allowed_keys(parent)
        where = f"under {parent}" if parent else "at the top level"
        return ConfigError(cause.full_key, _override_value(exc, cause.full_key),
                           f"allowed keys {where}: {', '.join(keys)}", problem="unknown key")
    if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
        key, keys = cause.full_key, schema.allowed_keys(cause.full_key)
        allowed = f"{key}.<key>=<value>, keys: {', '.join(keys)}" if keys else schema.type_name(key)
        return ConfigError(key, getattr(cause, "value", "?"), f"allowed: {allowed}", problem="wrong type")
    if isinstance(exc, (HydraException, OmegaConfBaseException)):
        # Any other composition error is bad input too: its own first line, named by the override it quotes.
        text = str(exc).strip()
        quoted = _NO_MATCH.search(text)
        if quoted:
            return ConfigError(quoted["key"], _override_value(exc, quoted["key"]),
                               f"allowed: +{quoted['key']}=... to add a config that the defaults do not have",
                               problem="not in the defaults list")
        twice = _ALREADY_THERE.search(text)
        if twice:
            group, option = twice["group"], twice["option"]
            return ConfigError(f"+{group}", option, f"allowed: {group}={option} (drop the +: the defaults "
                               f"already choose a {group})", problem="already in the defaults list")
        return ConfigError("overrides", "?", "see orchestrator run --help",
                           problem=(text.splitlines() or [type(exc).__name__])[0][:300])
    return None


_NO_MATCH = re.compile(r"Could not override '(?P<key>[^']+)'\. No match in the defaults list")
_ALREADY_THERE = re.compile(r"Multiple values for (?P<group>[\w/.-]+)\. To override a value use "
                            r"'override (?P=group): (?P<option>[^']*)'")


def _override_value(exc: BaseException, key: str) -> str:
    # Hydra's message quotes the override ("... use +foo=1"); recover its value for the line.
    text = str(exc)
    marker = f"+{key}="
    return text.split(marker, 1)[1].split()[0] if marker in text else "?"
