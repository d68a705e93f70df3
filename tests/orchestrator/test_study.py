"""Adaptive sweeps (hydra/sweeper=optuna): the real CLI, embedded Ray, a local MLflow store.

The no-op backend's synthetic metrics are known functions of ``backend.noop.x`` and ``y``
(synthetic_loss is least, 0, at (0.3, -0.2)), so a study over them has a known optimum.
"""

import json
import signal
import subprocess
import sys
from collections import Counter

import pytest
from mlflow.tracking import MlflowClient

from orchestrator import study
from orchestrator.errors import ConfigError
from tests.helpers import SUMMARY, runs_by_key, tag_values, wait_for

NOOP_STUDY = ("backend=noop", "hydra/sweeper=optuna", "backend.noop.x=interval(-1,1)", "backend.noop.y=interval(-1,1)")


def _stored_study(store, parent_id: str, tmp_path) -> dict:
    client = MlflowClient(store if isinstance(store, str) else f"sqlite:///{store}")
    return json.loads(open(client.download_artifacts(parent_id, "study.json", str(tmp_path))).read())


@pytest.mark.slow
def test_a_study_finds_the_known_optimum_and_every_cell_is_a_child_run(run_cli, tmp_path):
    proc = run_cli("run", "-m", *NOOP_STUDY, "hydra.sweeper.objectives={synthetic_loss:minimize}",
                   "hydra.sweeper.n_trials=40", "hydra.sweeper.n_jobs=4", "hydra.sweeper.sampler.seed=0",
                   "hydra.sweeper.sampler.n_startup_trials=8", "hydra.sweeper.sampler.multivariate=true",
                   "+hydra.sweeper.sampler.constant_liar=true", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = SUMMARY.search(proc.stdout)
    sweep_id = summary.group(1)
    assert proc.stdout.rstrip().splitlines()[-1].startswith(f"sweep {sweep_id}:")

    client, parents, runs = runs_by_key(tmp_path / "mlflow.db")
    assert len(parents) == 1, "one sweep, one parent run, for the whole study"
    parent = parents[0]
    stored = _stored_study(tmp_path / "mlflow.db", parent.info.run_id, tmp_path)
    trials = stored["trials"]
    assert [t["number"] for t in trials] == list(range(40)) and {t["state"] for t in trials} == {"COMPLETE"}
    assert [t["batch"] for t in trials] == [1 + i // 4 for i in range(40)]
    # Every distinct cell ran once, as an ordinary trial run under the parent.
    assert len(runs) == len({t["trial_key"] for t in trials}) == int(summary.group(2))
    for (key, attempts) in runs.items():
        (run,) = attempts
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.data.tags["attempt"] == "1"
        assert run.data.tags["status"] == "FINISHED" and run.data.tags["trial_key"] == key
    # Optuna was told each cell's own metric: study.json and the runs agree.
    measured = {k: a[0].data.metrics["synthetic_loss"] for k, a in runs.items()}
    for t in trials:
        assert t["values"] == [measured[t["trial_key"]]]
        x, y = t["params"]["backend.noop.x"], t["params"]["backend.noop.y"]
        assert t["values"][0] == pytest.approx((x - 0.3) ** 2 + (y + 0.2) ** 2, rel=1e-12)
    best = min(measured.values())
    assert best < 0.01, f"TPE got within {best:.4f} of the optimum in 40 trials"
    assert client.get_run(parent.info.run_id).data.metrics["study_best_synthetic_loss"] == best
    assert "Pareto front (1):" in proc.stdout
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/study.csv", "report/study.png"} <= report


@pytest.mark.slow
def test_failed_and_refused_cells_are_told_as_failed_trials(run_cli, tmp_path):
    # Half the cells run out of memory (FAILED); a negative sleep is refused by the plan (REFUSED).
    proc = run_cli("run", "-m", "backend=noop", "hydra/sweeper=optuna", "hydra.sweeper.objectives={synthetic_loss:minimize}",
                   "backend.noop.allocate_gb=choice(0,1000000)", "backend.noop.sleep_s=choice(0,-1)",
                   "backend.noop.x=interval(-1,1)", "hydra.sweeper.n_trials=8", "hydra.sweeper.n_jobs=4",
                   "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=3")
    assert proc.returncode == 1, proc.stderr[-3000:]  # some trials failed
    _, parents, runs = runs_by_key(tmp_path / "mlflow.db")
    trials = _stored_study(tmp_path / "mlflow.db", parents[0].info.run_id, tmp_path)["trials"]
    assert len(trials) == 8
    for t in trials:
        oom, refused = t["params"]["backend.noop.allocate_gb"] == 1000000, t["params"]["backend.noop.sleep_s"] == -1
        if refused:
            assert t["state"] == "FAIL" and t["trial_key"] == "" and t["reason"].startswith("REFUSED: backend.noop.sleep_s")
        elif oom:
            assert t["state"] == "FAIL" and t["reason"].startswith("FAILED: out of memory") and t["values"] is None
            assert runs[t["trial_key"]][0].data.tags["status"] == "FAILED"
        else:
            assert t["state"] == "COMPLETE" and t["values"][0] >= 0
    assert Counter(t["state"] for t in trials)["COMPLETE"] >= 1


@pytest.mark.slow
def test_a_study_whose_driver_died_resumes_from_mlflow_without_rerunning_finished_cells(run_cli, cli_env, tmp_path):
    db = tmp_path / "mlflow.db"
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", "-m", *NOOP_STUDY,
                               "hydra.sweeper.objectives={synthetic_loss:minimize,synthetic_cost:minimize}",
                               "backend.noop.sleep_s=4", "hydra.sweeper.n_trials=9", "hydra.sweeper.n_jobs=3",
                               "hydra/sweeper/sampler=nsgaii", "hydra.sweeper.sampler.seed=0",
                               "hydra.sweeper.sampler.population_size=3"],
                              cwd=tmp_path, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # killed in its second batch: the first one's three cells FINISHED, the second's running
        wait_for(lambda: Counter(tag_values(db, "status"))["FINISHED"] >= 3 and "RUNNING" in tag_values(db, "status"),
                 180, "a first batch finished and a second one running")
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        driver.kill()
    sweep_id = tag_values(db, "sweep_id")[0]
    _, _, before = runs_by_key(db)
    finished_before = {r.info.run_id for a in before.values() for r in a if r.data.tags["status"] == "FINISHED"}

    resumed = run_cli("resume", sweep_id, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"sweep {sweep_id}: its driver is gone; closed" in resumed.stdout
    assert "asked again (their driver died before they ended)" in resumed.stderr
    assert f"sweep {sweep_id} now:" in resumed.stdout

    client, parents, runs = runs_by_key(db)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    trials = _stored_study(db, parents[0].info.run_id, tmp_path)["trials"]
    assert len(trials) == 9 and {t["state"] for t in trials} == {"COMPLETE"}
    for key, attempts in runs.items():
        assert [r.data.tags["status"] for r in attempts].count("FINISHED") == 1, key
        assert all(r.info.status != "RUNNING" for r in attempts)
    finished_after = {r.info.run_id for a in runs.values() for r in a if r.data.tags["status"] == "FINISHED"}
    assert finished_before <= finished_after, "a cell that had finished was not run again"
    assert {t["trial_key"] for t in trials} == set(runs)
    # Done: resuming again has nothing left to ask.
    again = run_cli("resume", sweep_id)
    assert again.returncode == 0 and "0 to go" in again.stderr, again.stderr[-2000:]


@pytest.mark.slow
def test_a_multi_objective_study_on_the_tiny_model(run_cli, tmp_path, tiny_model_cfg):
    proc = run_cli("run", "-m", "experiment=pareto-formats", "debug=fast", "hydra.sweeper.n_trials=6",
                   "hydra.sweeper.n_jobs=3", "hydra.sweeper.params.method=rtn", "dtype=choice(int4,int8,fp4_e2m1)",
                   "dtype.group_size=choice(32,128)", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep_id = SUMMARY.search(proc.stdout).group(1)
    client, parents, runs = runs_by_key(tmp_path / "mlflow.db")
    parent = parents[0]
    trials = _stored_study(tmp_path / "mlflow.db", parent.info.run_id, tmp_path)["trials"]
    assert len(trials) == 6 and {t["state"] for t in trials} == {"COMPLETE"}
    for t in trials:
        (run,) = runs[t["trial_key"]]
        assert t["values"] == [run.data.metrics["kl_divergence"], run.data.metrics["bits_per_element"]]
        assert run.data.params["dtype.name"] == t["params"]["dtype"] and run.data.params["method.name"] == "rtn"
    # The Pareto front found is on the parent run, and in its report.
    report = client.download_artifacts(parent.info.run_id, "report/study.csv", str(tmp_path / "report"))
    lines = open(report).read().splitlines()
    assert len(lines) == 7 and lines[0].startswith("number,batch,state,on_pareto_front,trial_key,run_id")
    assert any(",True," in line for line in lines[1:])
    assert "Pareto front (" in proc.stdout

    # Its cells are ordinary trials: the same key as the cell run as a grid, and the sweep's other commands work.
    one = trials[0]["params"]
    planned = run_cli("run", "-m", f"dtype={one['dtype']}", f"dtype.group_size={one['dtype.group_size']}",
                      "debug=fast", "hydra.launcher.plan_only=true")
    assert trials[0]["trial_key"] in planned.stdout, planned.stdout[-2000:]
    assert run_cli("resubmit", sweep_id, "--failed").stdout.strip().endswith(f"sweep {sweep_id}: nothing to re-run")
    rereport = run_cli("report", sweep_id)
    assert rereport.returncode == 0 and "study.csv" in rereport.stdout


# ---- bad input: one line, exit 2, nothing made --------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ((), "hydra.sweeper.objectives={}: no objective"),
    (("hydra.sweeper.objectives={synthetic_loss:up}",), "hydra.sweeper.objectives.synthetic_loss=up: invalid value; "
                                                        "allowed: minimize, maximize"),
    (("hydra.sweeper.objectives={a:minimize,b:minimize}", "hydra/sweeper/sampler=cmaes"),
     "hydra.sweeper.sampler=CmaEsSampler: a single-objective sampler"),
    (("hydra.sweeper.objectives={a:minimize}", "cluster.max_retries=choice(1,2)"),
     "hydra.sweeper.params=cluster.max_retries: cannot be searched"),
    (("hydra.sweeper.objectives={a:minimize}", "hydra.sweeper.sampler.nope=1"), "hydra.sweeper.sampler.nope"),
])
def test_a_bad_study_is_refused_before_anything_runs(run_cli, tmp_path, overrides, message):
    proc = run_cli("run", "-m", *NOOP_STUDY[:3], *overrides)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "mlflow.db").exists()


def _sweep_with_study(tmp_path, text: str):
    """A parent run holding ``text`` as its study.json, in a local store."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("s", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(experiment, tags={"sweep_id": "swp-000001", "kind": "sweep"})
    (tmp_path / "study.json").write_text(text)
    client.log_artifact(parent.info.run_id, str(tmp_path / "study.json"))
    return client, client.get_run(parent.info.run_id)


GOOD = {"definition": {"objectives": {"synthetic_loss": "minimize"},
                       "space": {"backend.noop.x": {"name": "UniformDistribution", "attributes": {"low": -1.0,
                                                                                                   "high": 1.0}}},
                       "fixed": {"backend": "noop"}, "sampler": {"name": "TPESampler", "kwargs": {"seed": 0}},
                       "n_trials": 4, "n_jobs": 2, "max_failure_rate": 1.0},
        "trials": [{"number": 0, "batch": 1, "params": {"backend.noop.x": 0.5}, "state": "COMPLETE",
                    "trial_key": "0123456789abcdef", "values": [0.04], "reason": "", "system_attrs": {}}]}


def _tampered(path: str, value):
    data = json.loads(json.dumps(GOOD))
    node = data
    *parents, last = path.split("/")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[last] = value
    return data


@pytest.mark.parametrize("path, value, message", [
    ("definition/sampler/name", "os.system", "sampler=os.system"),
    ("definition/fixed/tracking.uri", "http://198.51.100.7:5000", "stored override tracking.uri"),
    ("definition/fixed/hydra.callbacks.x._target_", "os.system", "stored override hydra.callbacks.x._target_"),
    ("definition/fixed/model.path", "/somewhere/else", "stored override model.path"),
    ("definition/fixed/dtype", "${oc.env:MLFLOW_TRACKING_PASSWORD}", "holds an interpolation"),
    ("definition/sampler/kwargs/seed", [1, 2], "not a plain value"),
    ("trials/0/params/backend.noop.x", 7.0, "outside its distribution"),
    ("trials/0/trial_key", "../../etc", "a bad trial key"),
    ("trials/0/number", 5, "trials out of order"),
    ("definition/n_trials", 10 ** 9, "n_trials"),
])
def test_a_tampered_stored_study_is_refused(tmp_path, path, value, message):
    client, parent = _sweep_with_study(tmp_path, json.dumps(_tampered(path, value)))
    with pytest.raises(ConfigError, match=None) as refused:
        study.read(client, parent)
    assert message in str(refused.value)


def test_a_stored_study_reads_back(tmp_path):
    client, parent = _sweep_with_study(tmp_path, json.dumps(GOOD))
    definition, trials = study.read(client, parent)
    assert definition.objectives == {"synthetic_loss": "minimize"} and trials[0].values == [0.04]
    grid = client.create_run(parent.info.experiment_id, tags={"sweep_id": "swp-000002", "kind": "sweep"})
    assert study.read(client, client.get_run(grid.info.run_id)) is None  # a grid sweep has no study


def test_the_pareto_front_is_the_non_dominated_completed_trials():
    import itertools
    import random

    definition = study.Definition({"a": "minimize", "b": "maximize"}, {}, {}, {}, 1, 1, 1.0)
    rng = random.Random(0)
    records = [study.TrialRecord(i, 1, {}, "COMPLETE" if i % 7 else "FAIL", f"{i:016x}",
                                 [rng.random(), rng.random()] if i % 7 else None) for i in range(60)]
    front = study.pareto_front(definition, records)
    done = [r for r in records if r.state == "COMPLETE"]
    for r in done:  # brute force: on the front exactly when nothing is better in one and no worse in the other
        dominated = any(q.values[0] <= r.values[0] and q.values[1] >= r.values[1] and q.values != r.values
                        for q in done)
        assert (r in front) == (not dominated)
    assert all(a.number < b.number for a, b in itertools.pairwise(front))


def test_the_noop_synthetic_metrics_and_keys():
    from jobs.noop import run
    from jobs.spec import TrialSpec
    from orchestrator import plan
    from tests.helpers import compose

    base = plan.trial_spec(compose("backend=noop"), []).config
    at = plan.trial_spec(compose("backend=noop", "backend.noop.x=0.3", "backend.noop.y=-0.2"), []).config
    result = run(TrialSpec(trial_key=plan.trial_key(at), config=at, overrides=()))
    assert result.metrics["synthetic_loss"] == pytest.approx(0.0, abs=1e-15)
    assert result.metrics["synthetic_cost"] == pytest.approx(0.13)
    # x and y at their defaults leave a no-op trial's key as it was before they existed.
    old = json.loads(json.dumps(base))
    del old["backend"]["noop"]["x"], old["backend"]["noop"]["y"]
    assert plan.trial_key(old) == plan.trial_key(base) != plan.trial_key(at)
