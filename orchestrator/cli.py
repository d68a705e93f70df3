"""The ``orchestrator`` command.

``orchestrator run [overrides]`` runs one trial; ``orchestrator run -m [overrides]`` a
sweep (Hydra's multirun, each cell a Ray task). Hydra's own flags work (``--cfg job``,
``--help``, ``--info``). Bad input prints one line naming the key, the value and what
is allowed, and exits 2 before anything is submitted.
"""

from __future__ import annotations

import os
from collections import Counter
import sys
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
EXIT_BAD_INPUT = 2
USAGE = """usage: orchestrator <command> [args]

commands:
  run [overrides]       run one trial (a sweep of one), e.g.  orchestrator run dtype=int4
  run -m [overrides]    run a sweep, e.g.  orchestrator run -m model=tiny-llama dtype=bf16,int8,int4
                        or a preset grid:  orchestrator run -m sweep=smoke
  run --help            the config groups, their options and Hydra's flags

Exit status: 0 all trials finished (or were unsupported here), 1 some failed or timed
out, 2 bad input (nothing submitted), 130 interrupted."""


def _error(message: str) -> int:
    print(f"orchestrator: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _single_trial(cfg) -> None:
    """Hydra's task function for a run without -m: a sweep of one cell."""
    from hydra.core.hydra_config import HydraConfig

    from orchestrator import plan, sweep

    spec = plan.trial_spec(cfg, HydraConfig.get().overrides.task)
    sweep.execute(plan.sweep_settings([cfg]), [sweep.PlannedTrial(spec, plan.resources(cfg))])


def run(args: list[str]) -> int:
    import hydra

    from orchestrator import errors, schema, sweep

    schema.register()
    # Let composition errors reach us as exceptions, to print them as one line and exit 2.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    entry = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_single_trial)
    sys.argv = ["orchestrator run", *args]
    before = len(sweep.COMPLETED)
    try:
        entry()
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        config_error = errors.from_hydra(exc)
        if config_error is None:
            raise
        return _error(str(config_error))
    counts = sum((s.counts for s in sweep.COMPLETED[before:]), Counter())
    return 1 if counts["FAILED"] or counts["TIMEOUT"] else 0


COMMANDS = {"run": run}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        return _error(f"command={command}: unknown command; allowed: {', '.join(COMMANDS)}")
    return COMMANDS[command](args)
