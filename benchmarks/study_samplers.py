"""How fast each sampler of ``hydra/sweeper=optuna`` closes in on a known optimum when asked in batches, as a
study asks: ``n_jobs`` trials per step, all told before the next step.

The objective is the no-op backend's synthetic pair (jobs/noop.py), computed here directly: what a study over
``backend.noop.x=interval(-1,1) backend.noop.y=interval(-1,1)`` is told, without Ray or MLflow, so that many
seeds are cheap. The samplers are built by orchestrator.study from the same definitions the sweeper stores.

    python benchmarks/study_samplers.py [--trials 40] [--batch 4] [--seeds 6] [--json out.json]

Single objective: the best synthetic_loss after the trials (0 is the optimum). Two objectives (synthetic_loss,
synthetic_cost): the hypervolume of the front found against the reference point (2, 2), as a fraction of the
true front's (the segment from (0.3, -0.2) to the origin).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator import study  # noqa: E402


def loss(x: float, y: float) -> float:
    return (x - 0.3) ** 2 + (y + 0.2) ** 2


def cost(x: float, y: float) -> float:
    return x ** 2 + y ** 2


def hypervolume(points: list[tuple[float, float]], ref: tuple[float, float] = (2.0, 2.0)) -> float:
    """The area the 2-D points (both minimised) dominate, up to ``ref``."""
    area, best_y = 0.0, ref[1]
    for x, y in sorted(p for p in points if p[0] < ref[0] and p[1] < ref[1]):
        if y < best_y:
            area += (ref[0] - x) * (best_y - y)
            best_y = y
    return area


def true_front_hypervolume() -> float:
    # The Pareto set is the segment t * (0.3, -0.2), t in [0, 1]: dense samples of it.
    return hypervolume([(loss(0.3 * t, -0.2 * t), cost(0.3 * t, -0.2 * t)) for t in (i / 2000 for i in range(2001))])


def run(sampler: dict, objectives: dict[str, str], trials: int, batch: int) -> list[tuple[float, ...]]:
    from optuna.distributions import UniformDistribution, distribution_to_json

    space = {k: json.loads(distribution_to_json(UniformDistribution(-1.0, 1.0))) for k in ("x", "y")}
    definition = study.Definition(objectives, space, {}, sampler, trials, batch, 1.0)
    optuna = study._optuna()
    s = optuna.create_study(directions=list(objectives.values()), sampler=study._sampler(definition))
    told = []
    distributions = study._distributions(definition, "benchmark")
    while len(told) < trials:
        asked = [s.ask(distributions) for _ in range(min(batch, trials - len(told)))]
        for t in asked:
            x, y = t.params["x"], t.params["y"]
            values = (loss(x, y),) if len(objectives) == 1 else (loss(x, y), cost(x, y))
            s.tell(t, list(values))
            told.append(values)
    return told


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args()
    single = {
        "tpe (defaults)": {"name": "TPESampler", "kwargs": {}},
        "tpe (n_startup 8, multivariate, constant_liar)": {"name": "TPESampler", "kwargs": {
            "n_startup_trials": 8, "multivariate": True, "constant_liar": True}},
        "cmaes": {"name": "CmaEsSampler", "kwargs": {}},
        "random": {"name": "RandomSampler", "kwargs": {}},
    }
    multi = {
        "tpe (n_startup 8, multivariate, constant_liar)": single["tpe (n_startup 8, multivariate, constant_liar)"],
        "nsgaii (population 8)": {"name": "NSGAIISampler", "kwargs": {"population_size": 8}},
        "motpe (n_startup 8)": {"name": "MOTPESampler", "kwargs": {"n_startup_trials": 8}},
        "random": single["random"],
    }
    results = {"trials": opts.trials, "batch": opts.batch, "seeds": opts.seeds, "single": {}, "multi": {}}
    print(f"{opts.trials} trials in batches of {opts.batch}, seeds 0..{opts.seeds - 1}")
    print("\nsynthetic_loss (minimise; optimum 0): best after the trials, median [min, max] over seeds")
    for label, sampler in single.items():
        best = [min(v[0] for v in run({**sampler, "kwargs": {**sampler["kwargs"], "seed": seed}},
                                      {"synthetic_loss": "minimize"}, opts.trials, opts.batch)) for seed in range(opts.seeds)]
        results["single"][label] = best
        print(f"  {label:50s} {statistics.median(best):.4f} [{min(best):.4f}, {max(best):.4f}]")
    whole = true_front_hypervolume()
    print("\n(synthetic_loss, synthetic_cost): hypervolume of the front found / the true front's, median [min, max]")
    for label, sampler in multi.items():
        ratios = []
        for seed in range(opts.seeds):
            told = run({**sampler, "kwargs": {**sampler["kwargs"], "seed": seed}},
                       {"synthetic_loss": "minimize", "synthetic_cost": "minimize"}, opts.trials, opts.batch)
            ratios.append(hypervolume(told) / whole)
        results["multi"][label] = ratios
        print(f"  {label:50s} {statistics.median(ratios):.4f} [{min(ratios):.4f}, {max(ratios):.4f}]")
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
