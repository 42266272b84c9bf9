"""The elastic supernet (LoNAS / Shears): the search space (search_space.py: groups, widths, stages, NNCF JSON
import, per-step sampling), the base widths of a subnet and the masks that apply them (base_shape.py, base_masks.py),
the importance order of those widths' channels set before training (importance.py),
in-place distillation from the maximal subnet while training (distillation.py),
what a subnet costs (cost.py: parameters and MACs per token), the search for the subnets that trade the task metric
best against that cost (search.py, nsga.py, results.py: NSGA-II, as NNCF BootstrapNAS ran it for LoNAS) and the
compact export of a subnet as a smaller model (compact.py)."""
