"""Private training as the training loop sees it: batches, steps, epsilon, checkpoint state.

:class:`PrivateTraining` draws each step's sequences by Poisson sampling, runs the DP-SGD step
(:class:`~workers.privacy.dpsgd.DPSGD`), keeps the accountant history, reports the epsilon spent
so far, and saves/restores the history through the checkpoint's ``meta.json`` so that a resumed
run continues the accountant where its checkpoint left it (steps an interrupted attempt ran past
its last checkpoint are discarded with that attempt's weights and not counted).
"""

from __future__ import annotations

from workers.privacy.accounting import PrivacyPlan, add_steps, spent_epsilon
from workers.privacy.dpsgd import DPSGD
from workers.privacy.sampling import poisson_sample, rank_share


class PrivateTraining:
    """DP-SGD for one worker.

    Args:
        plan: The privacy plan (``PrivacyPlan.to_dict()`` form accepted).
        engine: The :class:`~workers.parallel.engine.ParallelEngine`.
        batches: The train :class:`~workers.data.WindowBatches` (its ``n_windows`` is N).
        seed: Data seed (``train.seed``): Poisson draws are a function of it and the step.
        noise_seed: Noise seed for tests; ``None`` draws one from the OS.

    Raises:
        ValueError: the plan's N differs from the corpus the worker loaded.
    """

    def __init__(
        self, plan: PrivacyPlan | dict, engine, batches, seed: int, noise_seed: int | None = None
    ):
        self.plan = plan if isinstance(plan, PrivacyPlan) else PrivacyPlan(**plan)
        if batches.n_windows != self.plan.n_sequences:
            raise ValueError(
                f"the worker's corpus has {batches.n_windows} training sequences, the privacy plan "
                f"{self.plan.n_sequences}: the data changed between planning and training"
            )
        self.engine, self.batches, self.seed = engine, batches, seed
        self.dpsgd = DPSGD(engine, self.plan, noise_seed)
        self.history: list = []

    def train_step(self, step_index: int) -> float:
        """Optimizer step ``step_index`` (0-based) on its Poisson sample; returns the mean loss."""
        layout = self.engine.layout
        chosen = poisson_sample(self.seed, step_index, self.plan.n_sequences, self.plan.sample_rate)
        x, y = self.batches.windows(rank_share(chosen, self.dpsgd.dp_rank, layout.dp))
        loss = self.dpsgd.train_batch(x, y)
        self.history = add_steps(self.history, self.plan.noise_multiplier, self.plan.sample_rate, 1)
        return loss

    def epsilon(self) -> float:
        """Epsilon spent so far at the plan's delta."""
        return spent_epsilon(self.plan.accountant, self.history, self.plan.delta)

    def state(self) -> dict:
        """JSON-friendly accountant state for ``meta.json``."""
        return {
            "accountant": self.plan.accountant,
            "history": [list(h) for h in self.history],
            "delta": self.plan.delta,
            "epsilon": self.epsilon(),
        }

    def load_state(self, state: dict | None) -> None:
        """Continue from a checkpoint's accountant state (``None``: a fresh accountant)."""
        self.history = [tuple(h) for h in (state or {}).get("history", [])]


def build_private_training(
    plan: PrivacyPlan | dict | None, engine, batches, seed: int
) -> PrivateTraining | None:
    """:class:`PrivateTraining` for a worker plan's ``"privacy"`` entry, or ``None`` without one."""
    return None if plan is None else PrivateTraining(plan, engine, batches, seed)
