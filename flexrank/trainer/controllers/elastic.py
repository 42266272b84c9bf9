"""Elastic LoRA supernet (LoNAS / Shears NLS): a nested sub-rank per module group, sampled per optimizer step."""

from ..rank_layer import RankLoraLinear
from ..search_space import SearchSpace
from .base import RankController

SUBNETS = ("maximal", "heuristic", "minimal")


class ElasticController(RankController):
    def __init__(self, layers: dict[str, RankLoraLinear], space: SearchSpace, seed: int,
                 steps_per_epoch: int, sandwich: bool = False, adapter: str = "default"):
        super().__init__(layers, adapter)
        self.space, self.seed, self.steps_per_epoch, self.sandwich = space, seed, steps_per_epoch, sandwich
        self.config: dict[str, int] = space.maximal()
        self.activate(self.config)
        self.history: dict[int, dict[str, int]] = {}  # optimizer step -> sampled subnet (logged by the trainer)

    def subnet(self, which: str | dict) -> dict[str, int]:
        """A named subnet (maximal / heuristic / minimal) or an explicit {group: width}, validated."""
        if isinstance(which, dict):
            return self.space.validate_subnet(which)
        return getattr(self.space, which)()

    def activate(self, which: str | dict) -> dict[str, int]:
        self.config = self.subnet(which)
        for name, width in self.space.module_widths(self.config).items():
            self.layers[name].set_width(width, self.adapter)
        return self.config

    def passes(self, step: int) -> int:
        return 3 if self.sandwich else 1

    def before_pass(self, step: int, pass_index: int) -> None:
        sampled = self.space.config_for_step(self.seed, step, self.steps_per_epoch)
        # Sandwich rule (max, min, random in one optimizer step), as in EFTNAS; else one sampled subnet.
        self.activate((["maximal", "minimal"] + [sampled])[pass_index] if self.sandwich else sampled)
        self.history[step] = sampled

    def log_metrics(self) -> dict[str, float]:
        widths = list(self.config.values())
        return {"elastic/active_rank": float(self.active_rank()),
                "elastic/mean_group_width": sum(widths) / max(len(widths), 1)}

    def state_dict(self) -> dict:
        # Sampling is a pure function of (seed, step): the seed and the active config are all there is.
        return {"seed": self.seed, "config": dict(self.config)}

    def load_state_dict(self, state: dict) -> None:
        self.seed = state["seed"]
        self.activate(state["config"])
