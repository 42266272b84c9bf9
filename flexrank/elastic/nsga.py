"""NSGA-II over one width index per group, exactly as NNCF BootstrapNAS set up pymoo (search/search.py, v2.19):
integer random sampling, SBX crossover and polynomial mutation on floats rounded back to integers, duplicates
eliminated; objectives (cost, -metric) both minimised. Evaluation is left to the caller (ask / tell), so it can
be cached on disk and split across processes."""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.evaluator import Evaluator
from pymoo.core.problem import Problem
from pymoo.operators.crossover.sbx import SBX
from pymoo.operators.mutation.pm import PM
from pymoo.operators.repair.rounding import RoundingRepair
from pymoo.operators.sampling.rnd import IntegerRandomSampling
from pymoo.problems.static import StaticProblem


@dataclass(frozen=True)
class NSGASettings:
    num_evals: int = 3000       # NNCF defaults
    population: int = 40
    seed: int = 0
    crossover_prob: float = 0.9
    crossover_eta: float = 10.0
    mutation_prob: float = 0.02
    mutation_eta: float = 3.0

    @property
    def generations(self) -> int:
        return self.num_evals // self.population  # NNCF floors num_evals to a multiple of the population


class _RNG:
    """pymoo < 0.6.2 draws from the global numpy / random generators (0.6.2 from its own generator, seeded by
    `setup(seed=...)`): keep the global state apart from everything that runs between ask and tell (model
    evaluation), so a seed gives the same search whatever the evaluator does, on either version."""

    def __init__(self, seed: int):
        outside = self._get()
        random.seed(seed)
        np.random.seed(seed)
        self.state = self._get()
        self._set(outside)

    @staticmethod
    def _get():
        return random.getstate(), np.random.get_state()

    @staticmethod
    def _set(state):
        random.setstate(state[0])
        np.random.set_state(state[1])

    @contextmanager
    def active(self) -> Iterator[None]:
        outside = self._get()
        self._set(self.state)
        try:
            yield
        finally:
            self.state = self._get()
            self._set(outside)


def nsga2(sizes: list[int], evaluate: Callable[[list[tuple[int, ...]]], list[tuple[float, float]]],
          settings: NSGASettings, on_generation: Callable[[int, list], None] | None = None) -> list[tuple]:
    """Run NSGA-II over index vectors x (0 <= x[i] < sizes[i]); `evaluate` maps a batch of them to
    (cost, metric) pairs, metric higher-is-better. Returns every (generation, x, cost, metric) in order."""
    problem = Problem(n_var=len(sizes), n_obj=2, xl=np.zeros(len(sizes)), xu=np.array(sizes) - 1, vtype=int)
    algorithm = NSGA2(pop_size=settings.population, sampling=IntegerRandomSampling(),
                      crossover=SBX(prob=settings.crossover_prob, eta=settings.crossover_eta, vtype=float,
                                    repair=RoundingRepair()),
                      mutation=PM(prob=settings.mutation_prob, eta=settings.mutation_eta, vtype=float,
                                  repair=RoundingRepair()),
                      eliminate_duplicates=True)
    rng = _RNG(settings.seed)
    with rng.active():
        algorithm.setup(problem, termination=("n_gen", settings.generations), seed=settings.seed, verbose=False)
    records = []
    for generation in range(settings.generations):
        with rng.active():
            if not algorithm.has_next():
                break
            pop = algorithm.ask()
        xs = [tuple(int(v) for v in np.rint(x)) for x in pop.get("X")]
        results = evaluate(xs)
        rows = [(generation, x, cost, metric) for x, (cost, metric) in zip(xs, results)]
        records += rows
        with rng.active():
            objectives = np.array([[cost, -metric] for _, (cost, metric) in zip(xs, results)], dtype=float)
            Evaluator().eval(StaticProblem(problem, F=objectives), pop)
            algorithm.tell(infills=pop)
        if on_generation is not None:
            on_generation(generation, rows)
    return records


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated (cost low, metric high) points, by cost ascending; of equal points the first."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    front, best = [], -np.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front
