"""The launcher composes each combination of groups once and applies value overrides to a copy,
with Hydra's private ``_apply_overrides_to_config``: every cell must come out as Hydra's own
composition of it would."""

import re

from orchestrator import plan
from orchestrator.compose import compose

GRID = ["dtype=int4,int8", "dtype.group_size=32,64", "quant=weight_only,w_a_dynamic", "bench.batch_size=2",
        "resources.num_cpus=0.5", "seed=1,2", "experiment=int4-group-sizes"]
PLANNED = re.compile(r"^  ([0-9a-f]{16})  (.*?)  \[(.*)\]", re.M)


def test_the_launchers_cells_are_hydras_compositions(run_cli):
    proc = run_cli("run", "-m", *GRID, "hydra.launcher.plan_only=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    planned = PLANNED.findall(proc.stdout)
    assert len(planned) == 16, proc.stdout
    for key, overrides, asks in planned:
        cell = overrides.split()
        expected = plan.planned_trial(compose(*cell), cell)
        assert key == expected.spec.trial_key, f"{overrides}: the launcher's cell differs from Hydra's"
        assert asks == ", ".join(f"{k}={v}" for k, v in expected.ray_options.items())
