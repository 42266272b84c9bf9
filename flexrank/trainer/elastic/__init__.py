"""The elastic supernet after training: what a subnet costs (cost.py: parameters and MACs per token) and the
search for the subnets that trade the task metric best against that cost (search.py: NSGA-II, as NNCF
BootstrapNAS ran it for LoNAS). The search space itself is still flexrank/trainer/search_space.py."""
