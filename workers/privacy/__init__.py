"""Differentially private training (DP-SGD, Abadi et al. 2016, Algorithm 1) for the workers.

* :mod:`workers.privacy.accounting` -- the plan that crosses from the controller (noise
  multiplier, clipping norm, sampling rate, delta) and the privacy accountant (Opacus' RDP and
  PRV accountants). Pure Python at import, so the controller uses it before launch.
* :mod:`workers.privacy.sampling` -- Poisson sampling of each step's sequences (numpy).
* :mod:`workers.privacy.dpsgd` -- per-sequence gradients (``torch.func``), clipping, noise, and
  the hand-off of the private gradient to DeepSpeed.
* :mod:`workers.privacy.session` -- what the training loop calls: batches, steps, epsilon,
  checkpoint state.
"""
