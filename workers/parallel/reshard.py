"""Layout-independent ("consolidated") checkpoints: save under one layout, load under any other.

Format of a checkpoint folder (``RUN_DIR/checkpoints/step_NNNNNNN/<tag>/``):

* ``stage_PPP.pt`` -- one file per pipeline stage, written by the rank with ``dp_rank == 0`` and
  ``tp_rank == 0`` of that stage: ``{"param": {name: tensor}, "exp_avg": {...},
  "exp_avg_sq": {...}}`` with *full* fp32 tensors (tensor shards all-gathered, ZeRO partitions
  gathered over the data-parallel group) under :class:`mla.model.MLATransformer` names;
* ``state.json`` -- written by rank 0: the optimizer step count (AdamW's ``t``), the LR
  scheduler's state, the client state (training step) and the layout that wrote it.

Loading reads every stage file, takes the full tensors of this rank's parameters, slices its
tensor shard (:func:`workers.parallel.tensor_parallel.shard`) and writes the values into the
model, into ZeRO's fp32 master partition and into AdamW's state (creating that state when no
step has run yet). So model *and* optimizer state move between any two layouts, e.g.
``(dp, tp, pp) = (1, 2, 2) -> (4, 1, 1)``, and the ZeRO stage may change too. Atomicity comes
from :func:`workers.checkpoint.save_checkpoint` (temporary folder, then rename).

ZeRO-3 runs keep DeepSpeed's own checkpoint format (loadable under the same layout only; see
:meth:`workers.parallel.engine.ParallelEngine.save_checkpoint`). The full tensors of one stage pass through one process, which is fine up to models whose stage
fits in host memory; very large models would write per-shard files instead (DeepSpeed's
universal checkpoint does that).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from workers.parallel.pipeline import vocab_rows
from workers.parallel.tensor_parallel import pad_rows, shard, split_dim

FORMAT = "mla-consolidated-v1"
OPTIM_KEYS = ("exp_avg", "exp_avg_sq")


def _torch_optimizer(engine) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer inside DeepSpeed's wrappers."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def _zero_optimizer(engine):
    """DeepSpeed's ZeRO stage 1/2 optimizer, or ``None`` (plain optimizer, no ZeRO)."""
    opt = engine.optimizer
    return opt if hasattr(opt, "single_partition_of_fp32_groups") else None


def _full_optimizer_state(engine, p: torch.nn.Parameter, key: str) -> torch.Tensor:
    """AdamW state ``key`` of ``p``, whole over the data-parallel group (collective under ZeRO)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    if hasattr(p, "_hp_mapping"):
        return safe_get_full_optimizer_state(p, key).float()
    state = _torch_optimizer(engine).state.get(p, {})
    return state[key].float() if key in state else torch.zeros_like(p, dtype=torch.float32)


def _gather_tp(t: torch.Tensor, dim: int | None, groups) -> torch.Tensor:
    if dim is None or groups.layout.tp == 1:
        return t.detach().cpu().clone()
    parts = [torch.empty_like(t) for _ in range(groups.layout.tp)]
    dist.all_gather(parts, t.detach().contiguous(), group=groups.tp_group)
    return torch.cat(parts, dim=dim).cpu()


def adam_step(engine) -> int:
    """AdamW's step count ``t`` on this rank (0 before the first step)."""
    for state in _torch_optimizer(engine).state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def save_consolidated(adapter, folder: str | Path, client_state: dict) -> None:
    """Write this rank's share of a consolidated checkpoint into ``folder`` (collective).

    Args:
        adapter: :class:`workers.parallel.engine.ParallelEngine`.
        folder: Target folder (created).
        client_state: JSON-serialisable extra state (e.g. ``{"step": 10}``).
    """
    engine, groups = adapter.engine, adapter.groups
    folder = Path(folder)
    _ensure_optimizer_state(engine, adam_step(engine))  # also (re)links ZeRO's fragments to it
    out: dict[str, dict[str, torch.Tensor]] = {"param": {}, **{k: {} for k in OPTIM_KEYS}}
    real_rows = vocab_rows(engine.module)
    for name, p in adapter.canonical_parameters().items():
        dim, rows = split_dim(name), real_rows.get(name)
        out["param"][name] = _gather_tp(p.data.float(), dim, groups)[:rows]
        for key in OPTIM_KEYS:
            moments = _gather_tp(_full_optimizer_state(engine, p, key), dim, groups)
            out[key][name] = moments[:rows]
    if groups.dp_rank == 0 and groups.tp_rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(out, folder / f"stage_{groups.pp_rank:03d}.pt")
    if groups.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            "format": FORMAT,
            "adam_step": adam_step(engine),
            "client_state": client_state,
            "scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler else None,
            "layout": adapter.layout.to_dict(),
        }
        (folder / "state.json").write_text(json.dumps(state, indent=2))


def is_consolidated(folder: str | Path) -> bool:
    """Whether ``folder`` holds a consolidated checkpoint."""
    return (Path(folder) / "state.json").is_file()


def read_consolidated(folder: str | Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """``(state, tensors)`` of a consolidated checkpoint folder; ``tensors[kind][name]`` is full.

    Raises:
        RuntimeError: the folder holds no consolidated checkpoint.
    """
    folder = Path(folder)
    if not (folder / "state.json").is_file():
        raise RuntimeError(f"{folder} holds no consolidated checkpoint (state.json missing)")
    state = json.loads((folder / "state.json").read_text())
    tensors: dict[str, dict[str, torch.Tensor]] = {"param": {}, **{k: {} for k in OPTIM_KEYS}}
    for path in sorted(folder.glob("stage_*.pt")):
        for kind, values in torch.load(path, map_location="cpu", weights_only=True).items():
            for name, t in values.items():
                tensors[kind].setdefault(name, t)  # a tied weight: the first stage's copy
    return state, tensors


def _ensure_optimizer_state(engine, step: int) -> None:
    """Give AdamW a (zero) state for every tensor it updates, with step count ``step``."""
    opt, zero = _torch_optimizer(engine), _zero_optimizer(engine)
    targets = (
        zero.single_partition_of_fp32_groups
        if zero is not None
        else [p for g in opt.param_groups for p in g["params"]]
    )
    for t in targets:
        state = opt.state[t]
        state["step"] = torch.tensor(float(step), dtype=torch.float32)
        for key in OPTIM_KEYS:
            state.setdefault(key, torch.zeros_like(t, memory_format=torch.preserve_format))
    if zero is not None:
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()  # point each parameter's fragment at the state


def _set_optimizer_state(engine, p: torch.nn.Parameter, value: torch.Tensor, key: str) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state

    if hasattr(p, "_hp_mapping"):
        safe_set_full_optimizer_state(p, value.to(p.device), key)
    else:
        _torch_optimizer(engine).state[p][key].copy_(value)


def _local_tensor(adapter, full: torch.Tensor, name: str, p: torch.nn.Parameter) -> torch.Tensor:
    """This rank's shard of the full tensor ``full`` of parameter ``name`` (vocabulary rows
    padded back with zeros when the checkpoint kept the real rows only)."""
    groups = adapter.groups
    padded = vocab_rows(adapter.engine.module)
    if name in padded and full.size(0) == padded[name]:  # the vocabulary padding is zeros
        full = pad_rows(full, p.size(0) * groups.layout.tp)
    return shard(full, split_dim(name), groups.tp_rank, groups.layout.tp)


def write_parameters(adapter, params: dict[str, torch.Tensor], where: str) -> int:
    """Write full tensors ``params`` (canonical names) into this rank's shards: the model and
    ZeRO's fp32 master partition. Returns the number of parameters written.

    Used by a resume (:func:`load_consolidated`) and by ``model.init_from``
    (:func:`workers.init_weights.load_init_weights`).

    Raises:
        RuntimeError: a parameter of this rank is missing from ``params`` or its shape differs
            (the model shape changed); the message names the first one.
    """
    from deepspeed.utils import safe_set_full_fp32_param

    count = 0
    for name, p in adapter.canonical_parameters().items():
        if name not in params:
            raise RuntimeError(
                f"checkpoint {where} has no parameter {name!r}; was it written for another model?"
            )
        value = _local_tensor(adapter, params[name], name, p)
        if value.shape != p.shape:
            raise RuntimeError(
                f"checkpoint {where}: {name} has shape {tuple(value.shape)} for this rank, the "
                f"model {tuple(p.shape)}; the model shape changed since it was saved"
            )
        with torch.no_grad():
            p.data.copy_(value.to(p.device, p.dtype))
        safe_set_full_fp32_param(p, value.to(p.device))
        count += 1
    return count


def load_consolidated(adapter, folder: str | Path) -> dict:
    """Load a consolidated checkpoint written under any layout into this rank's engine.

    Frozen parameters (``requires_grad`` false, ``train.freeze``) get their values and no
    optimizer state (they have none).

    Returns:
        The checkpoint's client state.

    Raises:
        RuntimeError: a parameter of this rank is missing from the checkpoint or its shape
            differs (the model shape changed).
    """
    engine = adapter.engine
    state, tensors = read_consolidated(folder)
    _ensure_optimizer_state(engine, state["adam_step"])
    write_parameters(adapter, tensors["param"], str(folder))
    for name, p in adapter.canonical_parameters().items():
        if not p.requires_grad:
            continue
        for key in OPTIM_KEYS:
            _set_optimizer_state(
                engine, p, _local_tensor(adapter, tensors[key][name], name, p), key
            )
    client = state.get("client_state", {})
    if engine.lr_scheduler is not None and state.get("scheduler"):
        engine.lr_scheduler.load_state_dict(state["scheduler"])
        engine.lr_scheduler.step(
            state["scheduler"]["last_batch_iteration"]
        )  # set the lr it implies
    if "step" in client:
        engine.global_steps = int(client["step"])
        engine.global_samples = int(client["step"]) * engine.train_batch_size()
    return client
