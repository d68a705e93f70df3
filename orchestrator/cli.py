"""The ``orchestrator`` command.

``orchestrator run [overrides]`` runs one trial; ``orchestrator run -m [overrides]`` a
sweep (Hydra's multirun, each cell a Ray task). Hydra's own flags work (``--cfg job``,
``--help``, ``--info``). Bad input prints one line naming the key, the value and what
is allowed, and exits 2 before anything is submitted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
USAGE = """usage: orchestrator <command> [args]

commands:
  run [overrides]       run one trial (a sweep of one), e.g.  orchestrator run dtype=int4
  run -m [overrides]    run a sweep, e.g.  orchestrator run -m model=tiny-llama dtype=bf16,int8,int4
                        or an experiment:  orchestrator run -m experiment=smoke
  run --help            the config groups, their options and Hydra's flags
  submit --address URL -- run -m [overrides]
                        run the sweep's driver on a Ray cluster (Ray Jobs API); prints the sweep id
  status ID [--json]    counts per status and one row per trial
  cancel ID             stop a running sweep; its open trials end CANCELLED
  report ID [--out DIR] compare the trials with their baselines: speedups and accuracy deltas on
                        each trial, a table and plots under report/ on the sweep's run
  recipe ID --budget-bits B [--out DIR]
                        from a sensitivity sweep (sweep.sensitivity.groups=...), the dtype per layer group
                        with the least predicted KL within B bits per weight, as a config file to run
  resubmit ID --failed [overrides]
                        re-run the FAILED/TIMEOUT trials as their next attempt, in the same sweep
  resubmit ID --unfinished, resume ID
                        re-run every trial with no FINISHED attempt (after the driver died)

status, cancel and report find the store as run does: tracking.uri=URI, else $MLFLOW_TRACKING_URI,
else ./mlflow.db.

Exit status: 0 all trials finished (or were unsupported here), 1 some failed, timed out
or were cancelled (or their results could not be recorded), 2 bad input (nothing
submitted), 130 interrupted."""


def _error(message: str) -> int:
    from orchestrator.credentials import mask

    print(f"orchestrator: error: {mask(message)}", file=sys.stderr)
    return EXIT_BAD_INPUT


_TASK_ERRORS: list[BaseException] = []


def _single_trial(cfg) -> None:
    """Hydra's task function for a run without -m: a sweep of one cell. Its error is handed to
    `run` rather than raised through Hydra, which would print every override (a password too)."""
    from hydra.core.hydra_config import HydraConfig

    from orchestrator import plan, sensitivity, sweep

    try:
        plan.forget_checks()
        cells, overrides = sensitivity.expand([plan.plain_config(cfg)], [HydraConfig.get().overrides.task])
        sweep.execute(plan.sweep_settings([cfg]), [plan.planned_trial(c, o) for c, o in zip(cells, overrides)])
    except Exception as error:
        _TASK_ERRORS.append(error)


def run(args: list[str]) -> int:
    import hydra

    from orchestrator import compose, schema, sweep
    from orchestrator.paths import CONF_DIR

    schema.register()
    # Let composition errors reach us as exceptions, to print them as one line and exit 2.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    entry = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_single_trial)
    sys.argv = ["orchestrator run", *args]
    before = len(sweep.COMPLETED)
    try:
        entry()
        if _TASK_ERRORS:
            raise _TASK_ERRORS.pop()
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        config_error = compose.from_hydra(exc)
        if config_error is None:
            raise
        return _error(str(config_error))
    return max((s.exit_code for s in sweep.COMPLETED[before:]), default=0)


def _tracking_uri(args: list[str]) -> tuple[str, list[str]]:
    """Every command finds the store as `run` does: a tracking.uri=... argument, else
    $MLFLOW_TRACKING_URI, else mlflow.db in the working directory."""
    from orchestrator import store

    given = [a.split("=", 1)[1] for a in args if a.startswith("tracking.uri=")]
    return store.resolve_uri(given[-1] if given else None), [a for a in args if not a.startswith("tracking.uri=")]


def _parser(command: str, description: str):
    import argparse

    parser = argparse.ArgumentParser(prog=f"orchestrator {command}", description=description,
                                     epilog="The store: tracking.uri=URI, else $MLFLOW_TRACKING_URI, else "
                                            "./mlflow.db.")
    parser.add_argument("sweep_id", help="the sweep's id (swp-xxxxxx), from its summary line or `submit`")
    return parser


def status(args: list[str]) -> int:
    from orchestrator import remote
    from orchestrator import sweep_state
    from orchestrator.errors import ConfigError

    uri, args = _tracking_uri(args)
    parser = _parser("status", "Counts per status and one row per trial of a sweep.")
    parser.add_argument("--json", action="store_true", help="print the state as JSON")
    parser.add_argument("--refresh", action="store_true",
                        help="read every trial run, not the sweep's index (after its driver died, or if runs were "
                             "edited by hand)")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                        help="Ray dashboard URL, to show a submitted sweep's job before its driver has started")
    opts = parser.parse_args(args)
    try:
        state = sweep_state.load(uri, opts.sweep_id, refresh=opts.refresh, live=True)
    except ConfigError as e:
        job = remote.job_info(opts.address, remote.submission_id(opts.sweep_id))
        if job is None:
            return _error(str(e))
        print(json.dumps({"sweep_id": opts.sweep_id, "ray_job": job}) if opts.json else
              f"sweep {opts.sweep_id}: not in {uri} yet; ray job {job['submission_id']}: {job['status']} "
              f"{job['message']}")
        return 0
    if state.live is not None:  # a running sweep read from its index: is its driver still there?
        from orchestrator import lease, store

        mlflow_client = store.client(uri)
        parent = mlflow_client.get_run(state.parent_run_id)
        try:
            holder = lease.latest(parent)
            state.live.driver = holder and lease.where_alive(holder, parent, opts.sweep_id, opts.address)
            if state.live.driver is None and mlflow_client.get_run(state.parent_run_id).info.status != "RUNNING":
                state = sweep_state.load(uri, opts.sweep_id)  # it ended as we looked: its final index
        except ConfigError as e:  # a stored lease, heartbeat or index this project does not write
            return _error(str(e))
    # The dashboard is the one this command line (or $RAY_ADDRESS) names, never an address read from the store.
    job = remote.job_info(opts.address, remote.submission_id(opts.sweep_id)) \
        if "ray_job_submission_id" in state.tags else None
    if opts.json:
        print(state.to_json())
    else:
        sweep_state.print_table(state, job)
    return 0


def cancel(args: list[str]) -> int:
    from orchestrator import remote
    from orchestrator.errors import ConfigError

    uri, args = _tracking_uri(args)
    parser = _parser("cancel", "Stop a running sweep: its open trials end CANCELLED.")
    parser.add_argument("--wait", type=float, default=60.0,
                        help="seconds to wait for the driver to stop before stopping its Ray Job (default 60)")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="Ray dashboard URL of a submitted sweep")
    opts = parser.parse_args(args)
    try:
        state = remote.cancel(uri, opts.sweep_id, opts.address, opts.wait)
    except ConfigError as e:
        return _error(str(e))
    counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(state.counts.items()))
    print(f"sweep {state.sweep_id}: {state.sweep_status.lower()} ({counts})")
    return 0 if state.sweep_status != "RUNNING" else 1


def submit(args: list[str]) -> int:
    import argparse

    from orchestrator import remote, sweep

    parser = argparse.ArgumentParser(
        prog="orchestrator submit", description="Run a sweep's driver on a Ray cluster as a Ray Job.",
        usage="orchestrator submit --address URL -- run [-m] [overrides]")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                        help="the Ray dashboard URL, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS)")
    split = args.index("--") if "--" in args else len(args)
    opts, run_args = parser.parse_args(args[:split]), args[split + 1:]  # --help: prints it, exits 0
    if "--" not in args:
        parser.print_usage(sys.stderr)
        return _error("submit: expected `-- run [overrides]` after the options")
    if not opts.address:
        return _error("--address=None: missing; allowed: the Ray dashboard URL (http://HOST:8265) or $RAY_ADDRESS")
    if not run_args or run_args[0] != "run":
        return _error(f"submit command={' '.join(run_args[:1]) or None}: only `run` can be submitted; allowed: run")
    given_uri = [a.split("=", 1)[1] for a in run_args if a.startswith("tracking.uri=")]
    uri, run_args = _tracking_uri(run_args[1:])
    if any(os.environ.get(f"MLFLOW_TRACKING_{v}") for v in ("USERNAME", "PASSWORD", "TOKEN")):
        print(f"note: the job writes to {uri} with the cluster's own MLflow credentials (MLFLOW_TRACKING_USERNAME and "
              f"MLFLOW_TRACKING_PASSWORD in its nodes' environment, see cluster/README.md); this machine's are not "
              f"sent", file=sys.stderr)
    if not given_uri and uri.startswith("sqlite:") and not _is_local(opts.address):
        print(f"warning: the sweep will write to {uri}, a file on the cluster's head node, not on this machine; "
              f"give tracking.uri=http://<mlflow server> to follow it from here", file=sys.stderr)
    # Validate every cell here, so a bad value is refused before anything is submitted.
    planned = run([*run_args, *([] if {"-m", "--multirun"} & set(run_args) else ["-m"]),
                   "hydra.launcher.plan_only=true"])
    if planned != 0:
        return planned
    sweep_id = sweep.new_sweep_id()
    job_id = remote.submit(opts.address, run_args, sweep_id, uri)
    print(f"submitted sweep {sweep_id} as ray job {job_id} to {opts.address}")
    print(f"  orchestrator status {sweep_id} tracking.uri={uri}")
    print(sweep_id)
    return 0


def resubmit(args: list[str], mode: str | None = None) -> int:
    """`resubmit ID --failed|--unfinished [overrides]`; `resume ID` is `--unfinished`."""
    from orchestrator import compose
    from orchestrator import resubmit as resubmission
    from orchestrator import sweep_state
    from orchestrator import sweep

    uri, args = _tracking_uri(args)
    command = "resume" if mode else "resubmit"
    parser = _parser(command, "Re-run a sweep's failed or unfinished trials as their next attempt, into the "
                              "same sweep.")
    if mode is None:
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("--failed", action="store_const", const="failed", dest="mode",
                           help="trials whose latest attempt is FAILED or TIMEOUT")
        which.add_argument("--unfinished", action="store_const", const="unfinished", dest="mode",
                           help="every trial with no FINISHED attempt (after a driver died)")
    parser.add_argument("--force", action="store_true", help="re-run FINISHED trials too")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                        help="Ray dashboard URL of a sweep submitted as a Ray Job, to tell whether its driver still runs")
    parser.add_argument("overrides", nargs="*", help="overrides for the re-run trials (bench.batch_size=8), "
                                                     "or cluster.* for where they run")
    opts = parser.parse_intermixed_args(args)
    mode = mode or opts.mode
    if mode == "unfinished":  # an adaptive sweep goes on asking where its driver stopped
        from orchestrator import study
        from orchestrator.errors import ConfigError

        try:
            stored = study.read(*sweep_state.open_sweep(uri, opts.sweep_id))
            resumed = stored and study.prepare_resume(uri, opts.sweep_id, stored, opts.overrides, opts.address)
        except ConfigError as e:
            return _error(str(e))
        if resumed:
            try:
                code = run(resumed.command)
            finally:
                study.finish_resume(resumed)
            if code != EXIT_BAD_INPUT:
                _say_whole_sweep(uri, opts.sweep_id)
            return code
    try:
        plan = resubmission.prepare(uri, opts.sweep_id, mode, opts.overrides, opts.force, opts.address)
    except Exception as exc:
        config_error = compose.from_hydra(exc)
        if config_error is None:
            raise
        return _error(str(config_error))
    if plan.skipped:
        print(f"{len(plan.skipped)} trials already have a FINISHED attempt: not re-run (--force to re-run them)")
    recorded = {t.trial_key for t in plan.state.trials if t.run_id}
    if unrun := sum(t.spec.trial_key not in recorded for t in plan.trials):
        print(f"{unrun} planned trials have no run (the driver died before making them): run as attempt 1")
    if not plan.trials:
        plan.release()
        print(f"sweep {opts.sweep_id}: nothing to re-run")
        return 0
    summary = sweep.execute(plan.settings, plan.trials, reopen=plan.state.parent_run_id,
                            prior_rows=[dataclasses.asdict(t) for t in plan.state.trials], holder=plan.holder)
    _say_whole_sweep(uri, opts.sweep_id)
    return summary.exit_code


def _say_whole_sweep(uri: str, sweep_id: str) -> None:
    """After more attempts: the whole sweep's counts, earlier attempts' included."""
    from orchestrator import sweep_state

    whole = sweep_state.load(uri, sweep_id)
    counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(whole.counts.items()))
    print(f"sweep {sweep_id} now: {len(whole.trials)} trials ({counts})")


def report(args: list[str]) -> int:
    from orchestrator import report as comparison
    from orchestrator.errors import ConfigError

    uri, args = _tracking_uri(args)
    parser = _parser("report", "Compare a sweep's trials with their baselines: deltas on each trial run, a table "
                               "and plots under report/ on the sweep's run.")
    parser.add_argument("--out", type=Path, help="also keep the report's files in this folder")
    opts = parser.parse_args(args)
    try:
        rows, names, recipe_lines = comparison.generate(uri, opts.sweep_id, opts.out)
    except ConfigError as e:
        return _error(str(e))
    comparison.print_table(rows, opts.sweep_id, recipe_lines)
    where = f" and in {opts.out}" if opts.out else ""
    print(f"report: {', '.join(names)} under report/ on the sweep's run{where}")
    return 0


def recipe(args: list[str]) -> int:
    from orchestrator import recipe as recipes
    from orchestrator import report as comparison
    from orchestrator import sweep_state
    from orchestrator.errors import ConfigError

    uri, args = _tracking_uri(args)
    parser = _parser("recipe", "From a finished sensitivity sweep, the dtype per layer group that least raises the "
                               "KL divergence within a bits-per-weight budget (an exact knapsack), written as an "
                               "experiment file and logged under recipes/ on the sweep's run.")
    parser.add_argument("--budget-bits", type=float, required=True,
                        help="bits per weight over the quantizable layers, scales included (e.g. 4.5)")
    parser.add_argument("--out", type=Path, default=Path("recipes"),
                        help="the folder the recipe goes in, as experiment/<name>.yaml (default: recipes)")
    parser.add_argument("--name", help="the recipe's name (default: <sweep id>-<budget>bits)")
    parser.add_argument("--family", help="which baseline's probes, where the sweep has several (the name it lists)")
    opts = parser.parse_args(args)
    try:
        client, parent = sweep_state.open_sweep(uri, opts.sweep_id)
        rows, _ = comparison.load(client, parent)
        made, path = recipes.create(client, parent, rows, opts.budget_bits, opts.out, opts.name, opts.family)
    except ConfigError as e:
        return _error(str(e))
    for line in recipes.describe(made):
        print(line)
    print(f"written: {path} (and under recipes/ on the sweep's run)")
    print(f"run it:  orchestrator run -cd {path.parent.parent} experiment={made.name}")
    return 0


def _is_local(address: str) -> bool:
    from urllib.parse import urlparse

    return urlparse(address if "://" in address else f"http://{address}").hostname in ("127.0.0.1", "localhost")


COMMANDS = {"run": run, "submit": submit, "status": status, "cancel": cancel, "report": report, "recipe": recipe,
            "resubmit": resubmit,
            "resume": lambda args: resubmit(args, mode="unfinished")}


def _bound_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that allocates its own malloc arena and returns little of a fragmented one
    to the system: a driver's writer thread, Ray's and gRPC's threads grew it by ~30 KB per trial without
    bound (10,000 no-op trials: 390 to 690 MiB). Two arenas keep it flat (docs/benchmarks.md). Like
    MALLOC_ARENA_MAX=2, set before those threads exist; a no-op off glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _bound_malloc_arenas()
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        return _error(f"command={command}: unknown command; allowed: {', '.join(COMMANDS)}")
    return COMMANDS[command](args)
