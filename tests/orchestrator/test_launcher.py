"""The launcher composes each combination of groups once and applies value overrides with Hydra's
private ``_apply_overrides_to_config``, to a copy or (a plain value) once to a scratch copy whose
value it sets in plain data, and reads ``key=<number>`` itself: every cell must come out as Hydra's
own composition of it would."""

import re

from orchestrator import plan
from orchestrator.compose import compose

GRID = ["dtype=int4,int8", "dtype.group_size=32,64", "quant=weight_only,w_a_dynamic", "bench.batch_size=2",
        "eval.seq_len=${bench.prompt_len},64",  # an interpolation: composed in full
        "resources.num_cpus=0.5", "seed=1,2", "experiment=int4-group-sizes"]
PLANNED = re.compile(r"^  ([0-9a-f]{16})  (.*?)  \[(.*)\]", re.M)


def test_the_launchers_cells_are_hydras_compositions(run_cli):
    proc = run_cli("run", "-m", *GRID, "hydra.launcher.plan_only=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    planned = PLANNED.findall(proc.stdout)
    assert len(planned) == 32, proc.stdout
    for key, overrides, asks in planned:
        cell = overrides.split()
        expected = plan.planned_trial(compose(*cell), cell)
        assert key == expected.spec.trial_key, f"{overrides}: the launcher's cell differs from Hydra's"
        assert asks == ", ".join(f"{k}={v}" for k, v in expected.ray_options.items())


def test_a_number_override_is_read_as_hydras_parser_reads_it():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from orchestrator.launcher import _number_override

    parser = OverridesParser.create()
    read_here = ["seed=0", "seed=17", "seed=-3", "bench.batch_size=64", "method.smoothquant.alpha=0.5",
                 "a.b_c.d1=-0.125", "x=10.0"]
    for text in read_here:
        mine, hydras = _number_override(text), parser.parse_overrides([text])[0]
        assert mine == hydras and type(mine.value()) is type(hydras.value()), text
    # Anything else is left to Hydra's parser: leading zeros and + (a string, an int), underscores, exponents,
    # other value forms, sweeps, and keys with a + or ~.
    for text in ["seed=007", "seed=+3", "seed=1_000", "x=1e-3", "x=.5", "x=5.", "x=nan", "seed=1,2", "+seed=1",
                 "~seed", "dtype=int4", "seed=range(0,3)", "x.-y=1", "séed=1"]:
        assert _number_override(text) is None, text


def test_each_cell_comes_out_as_hydra_composes_it_whatever_cells_came_before():
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import open_dict

    from orchestrator.launcher import _Combination

    base = compose()
    with open_dict(base):
        base.pop("hydra", None)
    combination, parser = _Combination(base), OverridesParser.create()
    cells = [["model.build.num_layers=2", "model.build=null"], ["model.build.num_layers=4", "model.build=null"],
             ["model.path=???"], ["++bench.extra=1"],
             ["seed=5", "seed=6"], ["seed=7", "bench.batch_size=3"], []]
    for cell in cells:
        hydras = plan.plain_config(compose(*cell))
        hydras.pop("hydra", None)
        mine = combination.cell(parser.parse_overrides(cell), ConfigLoaderImpl._apply_overrides_to_config)
        assert mine == hydras, cell
