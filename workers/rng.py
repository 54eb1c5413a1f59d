"""Per-step random state, so that dropout is reproducible and a resumed run is exact.

Before optimizer step ``s`` every rank seeds torch's generators from ``(seed, s, dp_rank,
pp_rank)``: data-parallel replicas draw different dropout masks (they see different sequences),
tensor-parallel ranks of one replica draw the same masks for their replicated activations (as
Megatron-LM's model-parallel RNG tracker keeps them), and the masks of step ``s`` do not depend
on how many steps ran before it in this process (a restart draws the same ones).
"""

from __future__ import annotations

import numpy as np


def step_seed(seed: int, step: int, dp_rank: int, pp_rank: int = 0) -> int:
    """A 63-bit seed for ``(seed, step, dp_rank, pp_rank)`` (NumPy ``SeedSequence`` mixing)."""
    state = np.random.SeedSequence([seed, step, dp_rank, pp_rank]).generate_state(
        2, dtype=np.uint32
    )
    return (int(state[0]) << 31) ^ int(state[1])


def seed_step(seed: int, step: int, dp_rank: int, pp_rank: int = 0) -> None:
    """Seed torch's CPU and CUDA generators for optimizer step ``step``."""
    import torch

    torch.manual_seed(step_seed(seed, step, dp_rank, pp_rank))
