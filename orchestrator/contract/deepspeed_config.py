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
    no fused CUDA or JIT-compiled CPU kernel is needed. Schedule: linear warm-up to ``lr`` over
    ``warmup_steps``, then cosine decay to ``min_lr`` at ``steps`` (DeepSpeed ``WarmupCosineLR``).

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
        "gradient_clipping": t.grad_clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": t.lr, "betas": list(t.betas), "eps": 1e-8,
                       "weight_decay": t.weight_decay, "torch_adam": True},
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {"total_num_steps": t.steps, "warmup_num_steps": t.warmup_steps,
                       "warmup_min_ratio": 0.0, "cos_min_ratio": t.min_lr / t.lr,
                       "warmup_type": "linear"},
        },
        "zero_optimization": {"stage": layout.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
    }
    if layout.recompute != "none":
        config["activation_checkpointing"] = {"partition_activations": False,
                                              "contiguous_memory_optimization": False}
    return config
