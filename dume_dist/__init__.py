"""dume_dist: training-free DUME MoErging of domain-expert LMs, distributed over Ray."""

__version__ = "0.1.0"
