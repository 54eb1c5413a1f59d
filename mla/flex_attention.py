"""Multi-level attention on FlexAttention: the CUDA path of ``indexer="block"``.

Data flow (GPU-DESIGN.md §3.2), one ``torch.compile(fullgraph=True, dynamic=False)`` region per
call (:func:`flex_multi_level_attention`), no parameters inside:

1. no-grad block selection (:func:`mla.block_selection.select_blocks`);
2. :func:`selection_block_mask`: ``BlockMask.from_kv_blocks`` with the diagonal block as the
   only partial block (its causal mask is evaluated there), the selected earlier blocks as full
   blocks (the kernel skips ``mask_mod`` there), and a ``mask_mod`` that describes the *whole*
   pattern (eager flex, and the dense math path used by the CPU tests, read only ``mask_mod``;
   compiled flex reads only the block lists plus ``mask_mod`` on partial blocks; the two must
   agree);
3. two flex calls, each with its own softmax: the sliding window (static
   :func:`window_block_mask`, cached per ``(n, w, B, device)``) and the selected blocks;
4. the gate mix ``g * o_w + (1 - g) * o_s``; autograd gives dq, dk, dv and dg.

Block size: the BlockMask block is the selection block B of the model. The path is used on CUDA
for ``B % 128 == 0`` only (:func:`flex_backend`): 128 is flex's default block and, per
GPU-DESIGN.md §5, the only size whose backward has a valid default kernel config on SM90 under
torch 2.11. Everything here uses only arguments that torch 2.11 and 2.13 both have
(``from_kv_blocks(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, BLOCK_SIZE,
mask_mod, seq_lengths)``, ``flex_attention(q, k, v, block_mask=, scale=, enable_gqa=)``).

A training run at a fixed sequence length compiles the core once; every new ``(n, heads,
head_dim, dtype, window, global_k, block)`` compiles once more (the recompile limit is raised to
64 so a benchmark sweep never falls back to eager flex, which would build the n x n scores).
Set ``MLA_FLEX_CUDA_GRAPHS=1`` to compile with ``mode="reduce-overhead"`` (CUDA graphs).
"""

from __future__ import annotations

import functools
import math
import os

import torch

from mla.block_selection import BlockSelection, select_blocks
from mla.local_attention import DISABLE_FLEX_ENV
from mla.tensor_ops import check_qkv, num_blocks

#: Set to ``1`` to compile the core with CUDA graphs (``mode="reduce-overhead"``).
CUDA_GRAPHS_ENV = "MLA_FLEX_CUDA_GRAPHS"
#: Set to ``1`` to run no-grad CPU calls through the compiled CPU flex forward (see
#: :func:`flex_backend`).
CPU_FORWARD_ENV = "MLA_CPU_FLEX_FORWARD"
#: BlockMask block sizes the CUDA flex path accepts (multiples of flex's 128).
FLEX_BLOCK_MULTIPLE = 128


def flex_backend(q: torch.Tensor, block: int, *tensors: torch.Tensor | None) -> str:
    """Which implementation runs a block-selection call: ``"flex"`` or ``"blocked"``.

    ``"flex"`` on CUDA (fp16/bf16/fp32, ``block % 128 == 0``, FlexAttention importable, not
    disabled by ``MLA_DISABLE_FLEX=1``), and on CPU for forward-only calls (grad disabled or no
    input needing it, fp32/bf16/fp16) when ``MLA_CPU_FLEX_FORWARD=1``: the compiled CPU flex
    forward was 2.1-3.0x faster than the blocked path at n=8192 here (2 cores, H=4, d=64,
    B=64), but its first call compiles for minutes on this machine, so it is opt-in (evaluation
    loops at a fixed shape). ``"blocked"`` everywhere else (CPU training, fp64, other blocks).

    Args:
        q: Queries (device and dtype decide).
        block: Block size B, in tokens.
        tensors: The other inputs (k, v, gate), checked for ``requires_grad`` on CPU.
    """
    if os.environ.get(DISABLE_FLEX_ENV) == "1" or q.dtype not in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
    ):
        return "blocked"
    if q.is_cuda:
        ok = block % FLEX_BLOCK_MULTIPLE == 0
    else:
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, *tensors)
        )
        ok = q.device.type == "cpu" and os.environ.get(CPU_FORWARD_ENV) == "1" and not needs_grad
    if not ok:
        return "blocked"
    try:
        from torch.nn.attention.flex_attention import BlockMask  # noqa: F401
    except ImportError:
        return "blocked"
    return "flex"


def _ordered(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(..., nq, nk)`` bool table -> ``(counts (..., nq), indices (..., nq, nk))`` int32, the
    True columns first in increasing order (the layout ``BlockMask.from_kv_blocks`` reads)."""
    nk = table.shape[-1]
    key = torch.where(table, 0, nk) + torch.arange(nk, device=table.device)
    return table.sum(-1).to(torch.int32), key.argsort(dim=-1).to(torch.int32)


def window_block_tables(
    seq_len: int, window: int, block: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial and full ``(nb, nb)`` block tables of the sliding window ``i - w < j <= i``.

    Key block J meets query block I's band iff ``J <= I`` and ``J*B + B - 1 > I*B - w``; it is
    *full* (every pair inside the band) iff ``J < I`` and ``(I*B + B - 1) - J*B < w``.
    """
    nb = num_blocks(seq_len, block)
    i = torch.arange(nb, device=device).view(-1, 1)
    j = torch.arange(nb, device=device).view(1, -1)
    meets = (j <= i) & (j * block + block - 1 > i * block - window)
    full = (j < i) & ((i * block + block - 1) - j * block < window)
    return meets & ~full, full


@functools.lru_cache(maxsize=32)
def window_block_mask(seq_len: int, window: int, block: int, device: str):
    """Static sliding-window BlockMask (batch and heads broadcast), cached per ``(n, w, B, device)``.

    Args:
        seq_len: n, in tokens.
        window: w >= 1, in tokens.
        block: BlockMask block size, in tokens.
        device: Device string.

    Returns:
        ``BlockMask`` of shape ``(1, 1, n, n)`` whose ``mask_mod`` is the band
        ``(kv <= q) & (q - kv < w)`` and whose block lists match it (:func:`window_block_tables`).
    """
    from torch.nn.attention.flex_attention import BlockMask

    partial, full = window_block_tables(seq_len, window, block, device)
    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)

    def sliding_window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    return BlockMask.from_kv_blocks(
        kv_num[None, None],
        kv_idx[None, None],
        full_num[None, None],
        full_idx[None, None],
        BLOCK_SIZE=block,
        mask_mod=sliding_window,
        seq_lengths=(seq_len, seq_len),
    )


def selection_block_mask(selection: BlockSelection, seq_len: int, block: int, n_heads: int):
    """BlockMask of the global branch from a block selection (traceable; no data-dependent
    Python control flow).

    Args:
        selection: From :func:`mla.block_selection.select_blocks`, ``indices`` ``(batch,
            kv_heads, nb, width)``.
        seq_len: n, in tokens.
        block: Block size B (BlockMask block size), in tokens.
        n_heads: Query heads Hq (the mask is expanded from kv heads to query heads).

    Returns:
        ``BlockMask`` ``(batch, n_heads, n, n)``: partial blocks = the diagonal ``I``; full blocks
        = the valid selected blocks; ``mask_mod(b, h, q, kv) = (kv <= q) & allowed[b, h // G,
        q // B, kv // B]`` with ``allowed`` = diagonal or selected.
    """
    from torch.nn.attention.flex_attention import BlockMask

    idx, counts = selection
    b, hkv, nb, width = idx.shape
    group = n_heads // hkv
    ok = torch.arange(width, device=idx.device) < counts.unsqueeze(-1)
    diag = torch.arange(nb, device=idx.device).view(nb, 1)
    eye = torch.arange(nb, device=idx.device).view(1, nb) == diag
    # padding points at the diagonal (already allowed); scatter output is a realized buffer, which
    # the CPU flex template needs for a tensor captured by mask_mod
    allowed = eye.expand(b, hkv, nb, nb).clone().scatter_(-1, torch.where(ok, idx, diag), True)
    selected = allowed & ~eye

    def selected_blocks(bi, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & allowed[bi, h // group, q_idx // block, kv_idx // block]

    full_num, full_idx = _ordered(selected)
    diag_num = torch.ones(b, n_heads, nb, dtype=torch.int32, device=idx.device)
    diag_idx = _ordered(eye)[1].expand(b, n_heads, nb, nb)
    full_num = full_num.repeat_interleave(group, dim=1)
    full_idx = full_idx.repeat_interleave(group, dim=1)
    return BlockMask.from_kv_blocks(
        diag_num,
        diag_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=block,
        mask_mod=selected_blocks,
        seq_lengths=(seq_len, seq_len),
    )


def mla_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor | None,
    window_mask,
    *,
    top_k: int,
    block: int,
    flex=None,
) -> torch.Tensor:
    """Selection -> BlockMask -> two flex calls -> gate mix (the body of the compiled region).

    Args:
        q: ``(batch, heads, seq, head_dim)``; k, v: ``(batch, kv_heads, seq, head_dim)``.
        gate: ``(batch, heads, seq)`` or ``None`` (sum of the branches).
        window_mask: :func:`window_block_mask` for this ``(n, w, B)``.
        top_k: ``global_k``, the earlier-key budget.
        block: B, in tokens.
        flex: The flex_attention function to call (default: ``torch.nn.attention.flex_attention``).

    Returns:
        ``(batch, heads, seq, head_dim)``.
    """
    if flex is None:
        from torch.nn.attention.flex_attention import flex_attention as flex
    selection = select_blocks(q, k, top_k, block)
    sel_mask = selection_block_mask(selection, q.shape[-2], block, q.shape[1])
    scale = 1.0 / math.sqrt(q.shape[-1])
    gqa = q.shape[1] != k.shape[1]
    o_w = flex(q, k, v, block_mask=window_mask, scale=scale, enable_gqa=gqa)
    o_s = flex(q, k, v, block_mask=sel_mask, scale=scale, enable_gqa=gqa)
    if gate is None:
        return o_w + o_s
    g = gate.unsqueeze(-1).to(o_w.dtype)
    return g * o_w + (1 - g) * o_s


@functools.lru_cache(maxsize=4)
def compiled_core(mode: str | None = None):
    """``torch.compile(mla_core, fullgraph=True, dynamic=False, mode=mode)``, built once per mode."""
    return torch.compile(mla_core, fullgraph=True, dynamic=False, mode=mode)


def flex_multi_level_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor | None,
    *,
    window: int,
    top_k: int,
    block: int = 128,
) -> torch.Tensor:
    """Multi-level attention (block selection) through the compiled FlexAttention core.

    Args:
        q: Queries ``(batch, heads, seq, head_dim)`` (rotary embedding applied).
        k, v: ``(batch, kv_heads, seq, head_dim)``; ``kv_heads`` divides ``heads``.
        gate: ``(batch, heads, seq)`` in [0, 1], or ``None``.
        window: Local window w, in tokens.
        top_k: ``global_k``, in tokens (``ceil(top_k / block)`` selected blocks).
        block: Block size B, in tokens (a multiple of 128 on CUDA).

    Returns:
        ``(batch, heads, seq, head_dim)``.

    Raises:
        ValueError: bad shapes or sizes < 1.
    """
    check_qkv(q, k, v)
    for name, value in (("window", window), ("top_k", top_k), ("block", block)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer number of tokens")
    mode = "reduce-overhead" if os.environ.get(CUDA_GRAPHS_ENV) == "1" else None
    wmask = window_block_mask(q.shape[-2], window, block, str(q.device))
    with recompile_limit(64), _cpu_inductor_options(q):
        return compiled_core(mode)(q, k, v, gate, wmask, top_k=top_k, block=block)


def _cpu_inductor_options(q: torch.Tensor):
    """The CPU flex template rejects a fused epilogue: compile CPU calls with
    ``epilogue_fusion=False`` (GPU-DESIGN.md §3.3); nothing changes on CUDA."""
    import contextlib

    if q.is_cuda:
        return contextlib.nullcontext()
    import torch._inductor.config as inductor_config

    return inductor_config.patch(epilogue_fusion=False)


def recompile_limit(limit: int):
    """Let dynamo compile for up to ``limit`` shapes (default 8): past the limit it would silently
    run flex attention eagerly, which materialises the n x n score matrix."""
    import torch._dynamo

    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    return cfg.patch(**{name: max(limit, getattr(cfg, name))})
