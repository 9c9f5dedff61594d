"""Training side of GLSCL: the only package that touches DeepSpeed and torch.distributed."""
