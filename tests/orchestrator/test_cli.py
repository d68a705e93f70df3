"""The command line as a user runs it: bad input is refused in one line, nothing is created."""

import re
import subprocess
import sys

import pytest

from orchestrator.paths import CONF_DIR

BAD_INPUT = [
    (["-m", "dtype=fp7"], "dtype=fp7: no such dtype config; allowed: bf16, fp16, fp4_e2m1, fp6_e2m3, fp6_e3m2, fp8_e4m3"),
    (["-m", "bench.batch_size=-1"], "bench.batch_size=-1: invalid value; allowed: >= 1"),
    (["-m", "model=nope"], "model=nope: no such model config; allowed: llama-3.1-8b, qwen2.5-7b, tiny-llama"),
    (["-m", "foo=1"], "foo=1: unknown key; allowed keys at the top level: model, dtype, quant, kernel, backend"),
    (["-m", "bench.warmpu=1"], "bench.warmpu=1: unknown key; allowed keys under bench: batch_size, prompt_len"),
    (["bench.batch_size=abc"], "bench.batch_size=abc: wrong type; allowed: int"),
    (["-m", "dtype=bf16,int4,fp7"], "dtype=fp7: no such dtype config"),
    (["-m", "dtype=int8,int4", "bench.repeats=0"], "bench.repeats=0: invalid value; allowed: >= 1"),
    (["-m", "dtype=int8", "tracking.uri=sqlite:///a.db,sqlite:///b.db"], "tracking.uri=sqlite:///b.db: varies across the sweep; one value for the whole sweep (first cell: sqlite:///a.db)"),
    (["-m", "experiment=smok"], "experiment=smok: no such experiment config; allowed: int4-group-sizes, llama-8b-gpu, pareto-formats, rotations, sensitivity, smoke"),
    (["-m", "+experiment=smoke"], "+experiment=smoke: already in the defaults list; allowed: experiment=smoke (drop the +"),
    (["-m", "sweep=smoke"], "sweep=smoke: wrong type; allowed: sweep.<key>=<value>, keys: name, id, reuse"),
    (["-m", "sweep.name=résumé"], "sweep.name=résumé: cannot be parsed; allowed: key=value in Hydra's override syntax"),
    (["-m", "seed=range(0,"], "seed=range(0,: cannot be parsed"),
    (["+dtype=int4"], "+dtype=int4: already in the defaults list; allowed: dtype=int4"),
    (["-m", "seed=-1"], "seed=-1: invalid value; allowed: >= 0"),
    (["-m", "eval=lm_eval", "eval.tasks=[arc_easy,../x]"], "eval.tasks=../x: invalid value; allowed: lm-eval task names"),
    (["-m", "resources.memory_gb=1e300"], "resources.memory_gb=1e+300: invalid value; allowed: <= 100000"),
    (["-m", "resources.timeout_s=nan"], "resources.timeout_s=nan: invalid value; allowed: a finite number"),
    (["-m", "resources.num_cpus=inf"], "resources.num_cpus=inf: invalid value; allowed: a finite number"),
    (["-m", "backend=noop", "backend.noop.sleep_s=-inf"], "backend.noop.sleep_s=-inf: invalid value; allowed: a finite"),
]


@pytest.mark.parametrize("args,message", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_exits_2_with_one_line_and_creates_nothing(run_cli, tmp_path, args, message):
    proc = run_cli("run", *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("orchestrator: error: ") and message in lines[0], proc.stderr
    assert list(tmp_path.iterdir()) == [], "no MLflow store, no run, no output folder"


@pytest.mark.parametrize("command", [["run", "backend=noop"], ["status", "swp-123456"], ["resume", "swp-123456"]])
def test_a_dead_tracking_uri_is_refused_in_seconds(run_cli, tmp_path, command):
    import time

    from tests.conftest import free_port

    started = time.monotonic()
    proc = run_cli(*command, f"tracking.uri=http://127.0.0.1:{free_port()}")
    assert time.monotonic() - started < 10, "fails fast"
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert ": unreachable (Connection refused); allowed: a reachable MLflow tracking server" in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_every_experiment_composes_and_validates_every_cell(run_cli, experiment):
    proc = run_cli("run", "-m", f"experiment={experiment}", "hydra.launcher.plan_only=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^\d+ cells, \d+ distinct trials, all valid:", proc.stdout, re.M), proc.stdout


def test_submit_help_is_help(run_cli):
    proc = run_cli("submit", "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: orchestrator submit --address URL"), proc.stderr


def test_unknown_command_exits_2(run_cli):
    proc = run_cli("launch")
    assert proc.returncode == 2 and "command=launch: unknown command; allowed: run" in proc.stderr


def test_hydra_flags_work(run_cli):
    proc = run_cli("run", "dtype=int4", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "format: int4" in proc.stdout and "group_size: 128" in proc.stdout
    help_text = run_cli("run", "--help").stdout
    assert help_text.startswith("orchestrator run is powered by Hydra") and "== Configuration groups ==" in help_text


def test_importing_the_control_plane_loads_no_torch_triton_or_vllm():
    code = ("import sys, orchestrator, orchestrator.cli, orchestrator.schema, orchestrator.plan, "
            "orchestrator.launcher, orchestrator.errors, orchestrator.tracking, orchestrator.sweep, "
            "hydra_plugins.quantsweep_launcher.launcher; "
            "print([m for m in ('torch', 'triton', 'vllm', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
