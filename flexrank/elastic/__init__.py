"""The elastic supernet after training: what a subnet costs (cost.py: parameters and MACs per token) and the
search for the subnets that trade the task metric best against that cost (search.py: NSGA-II, as NNCF
BootstrapNAS ran it for LoNAS), the per-layer base widths of a subnet (base_shape.py) and the compact export of a
subnet as a smaller model (compact.py). The search space itself is still flexrank/trainer/search_space.py."""
