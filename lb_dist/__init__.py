"""lb_dist: CLARS and GradientMix for large-batch distributed training."""
__version__ = "0.1.0"
