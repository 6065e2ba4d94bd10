"""Shared test settings: one torch thread (the suite runs many tiny linear-algebra calls, where
intra-op threads only add contention on a small CI box)."""
import torch

torch.set_num_threads(1)
