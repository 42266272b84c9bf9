"""Shared by the elastic tests and their 2-process script: a tiny elastic supernet and a recording controller."""

import torch
from peft import LoraConfig, get_peft_model

from flexrank.controllers import ElasticController
from flexrank.adapters.rank_layer import rank_layers, register_rank_layer
from flexrank.elastic.base_masks import BaseMasks, find_base_targets
from flexrank.elastic.search_space import base_groups_from_spec, space_from_spec

SHEARS_SPEC = {"groups": [["q_proj", "k_proj", "v_proj"], ["up_proj"], ["down_proj"]], "widths": [8, 6, 4]}


class RecordingElastic(ElasticController):
    """Records, for every pass, the optimizer step, the sampled config and the mask buffers actually set."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = []

    def before_pass(self, step, pass_index):
        super().before_pass(step, pass_index)
        masks = [int(l.lora_rank_mask["default"].sum()) for l in self.layers.values()]
        self.records.append({"step": step, "pass": pass_index, "config": dict(self.config), "masks": masks})


def elastic_supernet(model, seed=7, sandwich=False, steps_per_epoch=100, base_widths=None, distill=None):
    """`base_widths` (the recipe form, e.g. {"mlp": [1.0, 0.75, 0.5]}): elastic base widths too, applied by
    BaseMasks as flexrank.run builds them. `distill`: an elastic.distillation.Distillation."""
    cfg = register_rank_layer(LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    peft_model = get_peft_model(model, cfg)
    layers = rank_layers(peft_model)
    base = base_groups_from_spec(base_widths, find_base_targets(peft_model)) if base_widths else []
    space = space_from_spec(SHEARS_SPEC, list(layers), max_rank=8, base_groups=base)
    modules = dict(peft_model.named_modules())
    masked = space.base_module_widths(space.maximal())
    masks = BaseMasks(peft_model, {m: modules[m].in_features for m in masked}) if masked else None
    return peft_model, RecordingElastic(layers, space, seed=seed, steps_per_epoch=steps_per_epoch, sandwich=sandwich,
                                        base_masks=masks, distill=distill)


class ProgressionData(torch.utils.data.Dataset):
    """Learnable token sequences (arithmetic progressions), the same on every process."""

    def __init__(self, n=64, length=16, vocab=1000):
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        step = torch.randint(1, 7, (n, 1), generator=g)
        self.ids = (start + step * torch.arange(length)) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}
