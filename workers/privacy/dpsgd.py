"""DP-SGD on the DeepSpeed engine: per-sequence gradients, clipping, noise once per step.

One optimizer step over the sequences ``S`` that Poisson sampling drew (Abadi et al. 2016,
Algorithm 1; normalisation by the expected batch as in Opacus' ``DPOptimizer``):

    g_i   = grad of sequence i's mean token loss                  (torch.func vmap, below)
    gc_i  = g_i * min(1, C / (||g_i|| + 1e-6))                    (Opacus ``clip_and_accumulate``)
    G     = (sum_{i in S} gc_i + N(0, sigma^2 C^2 I)) / B         (B = expected batch)

The sum runs over all data-parallel ranks and all micro-batches. Where the noise goes: data-
parallel rank 0 alone adds one draw of ``N(0, sigma^2 C^2 I)`` to its local sum, once per
optimizer step, after all its micro-batches; every other rank adds nothing. DeepSpeed then
reduces ``G_r = (local_r + [r == 0] Z) * dp / B`` over the ranks by averaging, so the step's
gradient is ``(1/dp) sum_r G_r = (sum_i gc_i + Z) / B``: the noise on the summed gradient has
standard deviation ``sigma * C`` whatever ``dp`` and the number of micro-batches (not
``sqrt(dp)`` or ``sqrt(grad_accum)`` times it, as noising every rank or micro-batch would give).
One draw on one rank also needs no care for independent random streams across ranks.

Per-sequence gradients: ``torch.func.vmap(grad(loss of one sequence))`` over the batch, with
``functional_call`` on the engine's own module (Opacus' functorch machinery is built on the same
transforms). Opacus' ``GradSampleModule`` (hooks or ``force_functorch``) is not used: its
per-layer hooks miss the output head, which calls the tied embedding through
``EmbeddingLayer.logits`` rather than ``forward``, and its per-sample gradients of this model
disagreed with a per-example loop (checked while building this module).

Hand-off to DeepSpeed: the private gradient becomes the gradient of the surrogate loss
``sum_p <p, G_r,p>`` passed to ``engine.backward`` once per micro-step (DeepSpeed divides each
by ``grad_accum``), so DeepSpeed reduces it over the data-parallel group exactly as in ordinary
training (ZeRO 0 all-reduce, ZeRO 1 partitioned optimizer) and steps AdamW and the schedule.
DeepSpeed's own ``gradient_clipping`` is off under privacy (the controller sets it to 0).
"""

from __future__ import annotations

import secrets

import numpy as np
import torch
import torch.distributed as dist
from torch.func import functional_call, grad_and_value, vmap

from workers.privacy.accounting import PrivacyPlan

#: Added to the per-sequence norm before dividing (Opacus ``DPOptimizer.clip_and_accumulate``).
CLIP_EPS = 1e-6


def per_sequence_gradients(
    module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Gradient of each sequence's own loss.

    Args:
        module: Returns the mean token loss for ``(inputs, targets)`` (``SequentialLM``).
        x, y: Inputs and targets ``(batch, seq)`` int64.

    Returns:
        ``(grads, losses)``: parameter name -> ``(batch, *param.shape)``, and ``(batch,)`` losses.
    """
    params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    buffers = dict(module.named_buffers())

    def loss_one(p: dict, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return functional_call(module, (p, buffers), (xb.unsqueeze(0), yb.unsqueeze(0)))

    return vmap(grad_and_value(loss_one), in_dims=(None, 0, 0), randomness="different")(
        params, x, y
    )


def clip_and_sum(
    grads: dict[str, torch.Tensor], max_grad_norm: float
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Clip each sequence's gradient to L2 norm ``max_grad_norm`` (over all parameters) and sum.

    Args:
        grads: name -> ``(batch, *shape)`` per-sequence gradients.
        max_grad_norm: C; ``inf`` disables clipping.

    Returns:
        ``(summed, norms)``: name -> ``shape`` sum of clipped gradients, and ``(batch,)`` norms
        before clipping. Factor ``min(1, C / (norm + 1e-6))`` (Opacus ``clip_and_accumulate``).
    """
    flat = [g.reshape(g.shape[0], -1).float() for g in grads.values()]
    norms = torch.linalg.vector_norm(torch.cat(flat, dim=1), dim=1)
    factor = (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)
    return {n: torch.einsum("b,b...->...", factor, g.float()) for n, g in grads.items()}, norms


class DPSGD:
    """DP-SGD steps on a :class:`~workers.parallel.engine.ParallelEngine` (``tp == pp == 1``).

    Args:
        engine: The engine (DeepSpeed ZeRO 0 or 1 over the data-parallel group).
        plan: The privacy plan.
        noise_seed: Seed of the noise generator; ``None`` (training) draws one from the OS.
    """

    def __init__(self, engine, plan: PrivacyPlan, noise_seed: int | None = None):
        layout = engine.layout
        if layout.tp > 1 or layout.pp > 1 or layout.zero_stage > 1:
            raise ValueError(f"DP-SGD runs under tp=1 pp=1 ZeRO<=1 only, got {layout.describe()}")
        self.engine, self.plan, self.layout = engine, plan, layout
        self.module = engine.engine.module
        self.params = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        self.dp_rank = engine.groups.dp_rank
        self.generator = torch.Generator(device=engine.device)
        self.generator.manual_seed(secrets.randbits(63) if noise_seed is None else noise_seed)

    def local_sum(self, x: np.ndarray, y: np.ndarray) -> tuple[dict[str, torch.Tensor], float, int]:
        """This rank's sum of clipped per-sequence gradients, in micro-batches.

        Args:
            x, y: This rank's sampled sequences ``(n, seq)`` (``n`` may be 0).

        Returns:
            ``(sums, loss_sum, n)``: name -> summed clipped gradient, the sum of the sequences'
            losses and their number.
        """
        sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
        loss_sum, mb = 0.0, self.layout.micro_batch
        for i in range(0, len(x), mb):
            xb = torch.from_numpy(x[i : i + mb]).to(self.engine.device)
            yb = torch.from_numpy(y[i : i + mb]).to(self.engine.device)
            grads, losses = per_sequence_gradients(self.module, xb, yb)
            clipped, _ = clip_and_sum(grads, self.plan.max_grad_norm)
            for n in sums:
                sums[n] += clipped[n]
            loss_sum += float(losses.double().sum())
        return sums, loss_sum, len(x)

    def add_noise(self, sums: dict[str, torch.Tensor]) -> None:
        """Data-parallel rank 0 adds ``N(0, (sigma C)^2)`` to every coordinate, in place."""
        if self.dp_rank != 0 or self.plan.noise_multiplier == 0:
            return
        std = self.plan.noise_multiplier * self.plan.max_grad_norm
        for t in sums.values():
            t += torch.normal(0.0, std, size=t.shape, generator=self.generator, device=t.device)

    def backward(self, x: np.ndarray, y: np.ndarray) -> float:
        """Compute the private gradient and hand it to DeepSpeed (all micro-steps but the last
        ``engine.step()``, which :meth:`train_batch` makes). After it, DeepSpeed holds the
        step's gradient ``(sum of clipped gradients + noise) / expected_batch``.

        Returns:
            Mean loss of the step's sequences over all data-parallel ranks (not private).
        """
        sums, loss_sum, n = self.local_sum(x, y)
        self.add_noise(sums)
        scale = self.layout.dp / self.plan.expected_batch
        ds = self.engine.engine
        for micro in range(self.layout.grad_accum):
            surrogate = sum(
                (p * (sums[name] * scale).to(p.dtype)).sum() for name, p in self.params.items()
            )
            ds.backward(surrogate)
            if micro < self.layout.grad_accum - 1:
                ds.step()
        return self._mean_loss(loss_sum, n)

    def train_batch(self, x: np.ndarray, y: np.ndarray) -> float:
        """One private optimizer step on this rank's sampled sequences; returns the mean loss."""
        loss = self.backward(x, y)
        self.engine.engine.step()
        return loss

    def _mean_loss(self, loss_sum: float, n: int) -> float:
        total = torch.tensor([loss_sum, float(n)], dtype=torch.float64, device=self.engine.device)
        if self.layout.dp > 1:
            dist.all_reduce(total, group=self.engine.groups.dp_group)
        return float(total[0] / total[1]) if total[1] > 0 else float("nan")
