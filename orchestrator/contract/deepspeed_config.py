"""The DeepSpeed JSON config, generated from the job and the layout (never hand-written).

Pure Python: the controller builds it and ships it to the workers, which pass it to
``deepspeed.initialize``. Keys follow https://www.deepspeed.ai/docs/config-json/.
"""

from __future__ import annotations

from orchestrator.config import JobConfig
from orchestrator.contract.layout import Layout


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """``auto`` becomes ``bf16`` on GPU and ``fp32`` on CPU; explicit values pass through."""
    if precision == "auto":
        return "bf16" if use_gpu else "fp32"
    return precision


def build_deepspeed_config(job: JobConfig, layout: Layout) -> dict:
    """DeepSpeed config for ``job`` under ``layout``.

    Batch identity (DeepSpeed checks it): ``train_batch_size = micro_batch * grad_accum * dp``.
    Optimizer: AdamW (Loshchilov & Hutter 2019) through ``torch.optim.AdamW`` (``torch_adam``), so
    no fused CUDA or JIT-compiled CPU kernel is needed. No DeepSpeed scheduler: the workers set
    each step's lr from :func:`workers.schedule.lr_at` (a pure function of the step, positive
    from step 1; DeepSpeed's ``WarmupCosineLR`` ran the first two steps at lr 0 and freezes on
    skipped steps).

    Example:
        >>> from orchestrator.config import JobConfig
        >>> cfg = build_deepspeed_config(JobConfig(), Layout(dp=2, zero_stage=2, micro_batch=8, grad_accum=2))
        >>> cfg["train_batch_size"], cfg["zero_optimization"]["stage"]
        (32, 2)
    """
    t = job.train
    precision = resolve_precision(t.precision, job.cluster.use_gpu)
    config: dict = {
        "train_batch_size": layout.global_batch,
        "train_micro_batch_size_per_gpu": layout.micro_batch,
        "gradient_accumulation_steps": layout.grad_accum,
        # Under DP-SGD each sequence's gradient is clipped instead (workers.privacy.dpsgd).
        "gradient_clipping": 0.0 if t.privacy is not None else t.grad_clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": list(t.betas),
                "eps": 1e-8,
                "weight_decay": t.weight_decay,
                "torch_adam": True,
            },
        },
        "zero_optimization": {"stage": layout.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
    }
    if layout.recompute != "none":
        config["activation_checkpointing"] = {
            "partition_activations": False,
            "contiguous_memory_optimization": False,
        }
    return config
