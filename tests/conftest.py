"""Shared test settings: one BLAS and one torch thread. The suite runs many tiny linear-algebra
calls, where intra-op threads only add contention on a small CI box."""
import torch

torch.set_num_threads(1)
try:
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
except ImportError:  # threadpoolctl is optional; without it only the speed changes
    pass
