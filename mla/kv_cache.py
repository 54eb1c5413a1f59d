"""Per-layer KV caches for incremental decoding (prefill once, then one token at a time).

Every cache has the same interface (:class:`LayerCache`): :meth:`~LayerCache.prefill` takes the
rotated queries, keys and values of a whole (right-padded) prompt batch; :meth:`~LayerCache.attend`
takes those of one new token per row, stores them and returns that token's attention output.
Rows of a batch may hold prompts of different lengths: each row has its own position
(:class:`StepPositions`), kept on the host as well so that no step waits on the device.

* :class:`DenseKVCache` (``attention: dense``): every key and value; a new token reads them all
  (``t`` keys at position ``t - 1``).
* :class:`MLACache` (``attention: mla``), the state of both branches of
  :mod:`mla.attention`:

  - local branch: a rolling buffer of the last ``w`` keys/values (Mistral 7B's rolling-buffer
    cache, Jiang et al. 2023, Sec. 2): position ``p`` lives in slot ``p % w``, so the buffer never
    holds more than ``w`` entries, and it holds exactly the window ``p - w < j <= p``;
  - global branch, block selection (NSA's selection branch, Yuan et al. 2025, Sec. 3.3.2, as
    trained by :mod:`mla.global_attention`): all keys/values (any earlier block may be selected),
    one pooled key per completed block per key/value head (the mean of its ``B`` keys, computed
    once when the block's last token arrives), and the ``n_sel = ceil(global_k / B)`` blocks
    selected for the current query block. The selection is computed once, when a new query
    block starts (position ``p = I * B``), from the same causal pooled query as in training: the
    mean of the ``B`` queries ending at ``I * B`` (a rolling buffer of the last ``B`` queries),
    scored against the pooled keys of blocks ``J < I`` and summed over the query heads of each
    GQA group. The token then attends to its causal part of the diagonal block plus the selected
    blocks, with one softmax over them;
  - global branch, ``indexer: exact``: the exact token top-k of all cached causal keys.

Per-token attention cost (keys read per query head) at context ``t``: dense ``t``; MLA
``min(w, t) + n_sel * B + (t mod B) + 1``, plus ``t / B`` pooled keys once per block.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mla.block_selection import num_selected_blocks, pooled_keys, select_blocks
from mla.tensor_ops import num_blocks


@dataclass(frozen=True)
class StepPositions:
    """Positions of the new token of each row, on the device and on the host.

    Attributes:
        pos: ``(batch,)`` int64 positions on the cache's device.
        host: The same positions as Python ints (used for shapes and for which rows start or
            complete a block, so that no step synchronises with the device).
        rows: ``arange(batch)`` on the device (shared by every layer of the step).
    """

    pos: torch.Tensor
    host: tuple[int, ...]
    rows: torch.Tensor

    @classmethod
    def of(cls, host: list[int] | tuple[int, ...], device: torch.device | str) -> StepPositions:
        """Build from host positions."""
        return cls(
            torch.tensor(list(host), dtype=torch.long, device=device),
            tuple(int(p) for p in host),
            torch.arange(len(host), device=device),
        )


class LayerCache(abc.ABC):
    """Cache of one attention layer for a batch of rows.

    Args:
        batch: Rows.
        n_heads: Query heads H.
        kv_heads: Key/value heads (divides H; query head ``h`` reads kv head ``h // (H / kv)``).
        head_dim: Features per head d.
        capacity: Most positions a row may reach (prompt + generated tokens), in tokens.
        device, dtype: Where and in which precision the cache lives.
    """

    def __init__(
        self,
        batch: int,
        n_heads: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        if n_heads % kv_heads:
            raise ValueError(f"n_heads({n_heads}) must be a multiple of kv_heads({kv_heads})")
        self.batch, self.n_heads, self.kv_heads, self.head_dim = batch, n_heads, kv_heads, head_dim
        self.capacity, self.device, self.dtype = capacity, torch.device(device), dtype
        self.group = n_heads // kv_heads
        self.scale = 1.0 / math.sqrt(head_dim)

    @abc.abstractmethod
    def prefill(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: tuple[int, ...]
    ) -> None:
        """Store a prompt batch.

        Args:
            q: Rotated queries ``(batch, n_heads, L, head_dim)`` of the right-padded prompts.
            k, v: Rotated keys and values ``(batch, kv_heads, L, head_dim)``.
            lengths: Real prompt length of each row (``1 <= lengths[b] <= L``); positions past a
                row's length are padding and never read.
        """

    @abc.abstractmethod
    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        gate: torch.Tensor | None,
        at: StepPositions,
    ) -> torch.Tensor:
        """Store one new token per row and return its attention output.

        Args:
            q: ``(batch, n_heads, 1, head_dim)`` rotated query of the new token.
            k, v: ``(batch, kv_heads, 1, head_dim)``.
            gate: ``(batch, n_heads, 1)`` mixing weight of the local branch, or ``None`` (sum).
            at: Position of the new token of each row.

        Returns:
            ``(batch, n_heads, 1, head_dim)``.
        """

    def nbytes(self) -> int:
        """Bytes held by the cache's tensors."""
        return sum(
            t.numel() * t.element_size() for t in vars(self).values() if isinstance(t, torch.Tensor)
        )

    def _check_positions(self, at: StepPositions) -> None:
        if len(at.host) != self.batch or max(at.host) >= self.capacity or min(at.host) < 0:
            raise ValueError(
                f"positions {at.host} must be one per row (batch {self.batch}) within the "
                f"cache capacity [0, {self.capacity})"
            )

    def _grouped(self, q: torch.Tensor) -> torch.Tensor:
        """``(b, H, 1, d)`` -> ``(b, kv, group, d)`` (query heads of a kv head are contiguous)."""
        return q.reshape(self.batch, self.kv_heads, self.group, self.head_dim)

    def _ungrouped(self, o: torch.Tensor) -> torch.Tensor:
        """``(b, kv, group, d)`` -> ``(b, H, 1, d)``."""
        return o.reshape(self.batch, self.n_heads, 1, self.head_dim)


class DenseKVCache(LayerCache):
    """Plain KV cache of causal dense attention: every key and value of every position."""

    def __init__(
        self,
        batch: int,
        n_heads: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(batch, n_heads, kv_heads, head_dim, capacity, device, dtype)
        self.k = torch.zeros(batch, kv_heads, capacity, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def prefill(self, q, k, v, lengths):
        """See :meth:`LayerCache.prefill`."""
        self.k[:, :, : k.shape[2]] = k
        self.v[:, :, : v.shape[2]] = v

    def attend(self, q, k, v, gate, at):
        """Softmax over the row's keys ``0..pos`` (see :meth:`LayerCache.attend`)."""
        self._check_positions(at)
        rows = at.rows
        self.k[rows, :, at.pos] = k[:, :, 0]
        self.v[rows, :, at.pos] = v[:, :, 0]
        t = max(at.host) + 1
        keys, values = self.k[:, :, :t], self.v[:, :, :t]
        mask = None
        if min(at.host) != max(at.host):
            mask = (torch.arange(t, device=self.device) <= at.pos.view(-1, 1)).view(
                self.batch, 1, 1, t
            )
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, enable_gqa=self.group != 1
        )


class MLACache(LayerCache):
    """Cache of one multi-level attention layer (see the module docstring).

    Args:
        batch, n_heads, kv_heads, head_dim, capacity, device, dtype: See :class:`LayerCache`.
        window: Local window w, in tokens.
        top_k: ``global_k``; the block indexer keeps ``n_sel = ceil(top_k / block)`` blocks.
        block: Block size B, in tokens.
        indexer: ``"block"`` (block selection) or ``"exact"`` (token top-k of all causal keys).

    Tensors: ``k``, ``v`` ``(batch, kv, ceil(capacity / B) * B, d)`` all keys/values;
    ``local_k``, ``local_v`` ``(batch, kv, min(w, capacity), d)`` rolling buffer and
    ``local_pos`` ``(batch, min(w, capacity))`` the position in each slot (-1: empty);
    ``pooled_k`` ``(batch, kv, n_blocks, d)`` one mean key per completed block; ``q_ring``
    ``(batch, H, B, d)`` the last B queries; ``sel``, ``sel_valid`` ``(batch, kv, n_sel)`` the
    current query block's selected earlier blocks.
    """

    def __init__(
        self,
        batch: int,
        n_heads: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        *,
        window: int,
        top_k: int,
        block: int,
        indexer: str = "block",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(batch, n_heads, kv_heads, head_dim, capacity, device, dtype)
        if indexer not in ("block", "exact"):
            raise ValueError(f"indexer={indexer!r} must be 'block' or 'exact'")
        self.window, self.top_k, self.block, self.indexer = window, top_k, block, indexer
        self.n_blocks = num_blocks(capacity, block)
        self.n_sel = num_selected_blocks(top_k, block)
        self.score_dtype = torch.promote_types(
            dtype, torch.float32
        )  # as mla.block_selection scores
        self.k = torch.zeros(
            batch, kv_heads, self.n_blocks * block, head_dim, device=device, dtype=dtype
        )
        self.v = torch.zeros_like(self.k)
        self._kv_index = torch.arange(kv_heads, device=device)
        self._block_offsets = torch.arange(block, device=device)
        ring = min(window, capacity)
        self.local_k = torch.zeros(batch, kv_heads, ring, head_dim, device=device, dtype=dtype)
        self.local_v = torch.zeros_like(self.local_k)
        self.local_pos = torch.full((batch, ring), -1, dtype=torch.long, device=device)
        if indexer == "block":
            self.pooled_k = torch.zeros(
                batch, kv_heads, self.n_blocks, head_dim, device=device, dtype=self.score_dtype
            )
            self.q_ring = torch.zeros(batch, n_heads, block, head_dim, device=device, dtype=dtype)
            self.sel = torch.zeros(batch, kv_heads, self.n_sel, dtype=torch.long, device=device)
            self.sel_valid = torch.zeros(
                batch, kv_heads, self.n_sel, dtype=torch.bool, device=device
            )

    # ------------------------------------------------------------------ prefill
    def prefill(self, q, k, v, lengths):
        """See :meth:`LayerCache.prefill`."""
        n = k.shape[2]
        if max(lengths) > self.capacity or n > self.k.shape[2]:
            raise ValueError(f"prompt of {n} tokens exceeds the cache capacity {self.capacity}")
        self.k[:, :, :n], self.v[:, :, :n] = k, v
        for row, length in enumerate(lengths):
            self._fill_ring(row, k, v, length)
        if self.indexer != "block":
            return
        full = n // self.block
        if full:
            self.pooled_k[:, :, :full] = pooled_keys(k[:, :, : full * self.block], self.block)
        chosen = select_blocks(q, k, self.top_k, self.block)  # the training path's own selection
        for row, length in enumerate(lengths):
            lo = max(0, length - self.block)
            pos = torch.arange(lo, length, device=self.device)
            self.q_ring[row, :, pos % self.block] = q[row, :, lo:length]
            self._set_selection(row, chosen, (length - 1) // self.block)

    def _set_selection(self, row: int, chosen, query_block: int) -> None:
        """Copy query block ``query_block``'s selection of ``row`` from a :class:`BlockSelection`."""
        idx, counts = chosen.indices[row, :, query_block], chosen.counts[row, :, query_block]
        width = idx.shape[-1]
        self.sel[row], self.sel_valid[row] = 0, False
        if width:
            valid = torch.arange(width, device=self.device) < counts.unsqueeze(-1)
            self.sel[row, :, :width] = idx.clamp(min=0)
            self.sel_valid[row, :, :width] = valid

    def _fill_ring(self, row: int, k: torch.Tensor, v: torch.Tensor, length: int) -> None:
        ring = self.local_k.shape[2]
        lo = max(0, length - ring)
        pos = torch.arange(lo, length, device=self.device)
        self.local_pos[row] = -1
        self.local_k[row, :, pos % ring] = k[row, :, lo:length]
        self.local_v[row, :, pos % ring] = v[row, :, lo:length]
        self.local_pos[row, pos % ring] = pos

    # ------------------------------------------------------------------ one token
    def attend(self, q, k, v, gate, at):
        """Local + global branch of the new token, gated or summed (see :meth:`LayerCache.attend`)."""
        self._check_positions(at)
        self._write(q, k, v, at)
        local = self._local(q)
        glob = self._global_block(q, at) if self.indexer == "block" else self._global_exact(q, at)
        if gate is None:
            return local + glob
        g = gate.unsqueeze(-1).to(local.dtype)
        return g * local + (1 - g) * glob

    def _write(self, q, k, v, at: StepPositions) -> None:
        rows = at.rows
        self.k[rows, :, at.pos] = k[:, :, 0]
        self.v[rows, :, at.pos] = v[:, :, 0]
        slot = at.pos % self.local_k.shape[2]
        self.local_k[rows, :, slot] = k[:, :, 0]
        self.local_v[rows, :, slot] = v[:, :, 0]
        self.local_pos[rows, slot] = at.pos
        if self.indexer != "block":
            return
        self.q_ring[rows, :, at.pos % self.block] = q[:, :, 0]
        self._pool_completed(at)
        self._select_at_block_start(at)

    def _pool_completed(self, at: StepPositions) -> None:
        """Pooled key of every block whose last token just arrived (mean of its B keys)."""
        done = [r for r, p in enumerate(at.host) if (p + 1) % self.block == 0]
        if not done:
            return
        rows = torch.tensor(done, device=self.device)
        j = torch.tensor([at.host[r] // self.block for r in done], device=self.device)
        blocks = self.k.view(self.batch, self.kv_heads, self.n_blocks, self.block, -1)
        self.pooled_k[rows, :, j] = pooled_keys(blocks[rows, :, j], self.block)[:, :, 0]

    def _select_at_block_start(self, at: StepPositions) -> None:
        """Selection of each row whose new token is the first of a query block."""
        start = [r for r, p in enumerate(at.host) if p % self.block == 0]
        if not start:
            return
        first = [r for r in start if at.host[r] == 0]
        if first:
            self.sel_valid[torch.tensor(first, device=self.device)] = False
        later = [r for r in start if at.host[r] > 0]
        if later:
            rows = torch.tensor(later, device=self.device)
            order = (
                torch.arange(self.block, device=self.device) + 1
            ) % self.block  # positions p-B+1..p
            self._select(
                rows, self.q_ring[rows][:, :, order], [at.host[r] // self.block for r in later]
            )

    def _select(self, rows: torch.Tensor, q_last: torch.Tensor, query_blocks: list[int]) -> None:
        """Choose the ``n_sel`` earlier blocks of query block I for ``rows``.

        Args:
            rows: ``(r,)`` row indices.
            q_last: ``(r, H, B, d)`` the B queries ending at the block's first position ``I * B``,
                in position order (I >= 1, so all B are real). Pooled and scored as
                :mod:`mla.block_selection` does (mean per head in at least float32, summed over
                the GQA group, dot the pooled keys of blocks ``J < I``).
            query_blocks: I of each row.
        """
        r = rows.shape[0]
        means = q_last.to(self.score_dtype).sum(-2) / self.block  # (r, H, d), as pooled_queries
        q_bar = means.view(r, self.kv_heads, self.group, self.head_dim).sum(
            2
        )  # summed over the group
        scores = (q_bar.unsqueeze(-2) @ self.pooled_k[rows].transpose(-1, -2)).squeeze(
            -2
        )  # (r, kv, nb)
        qb = torch.tensor(query_blocks, device=self.device).view(r, 1, 1)
        scores = scores.masked_fill(
            torch.arange(self.n_blocks, device=self.device) >= qb, float("-inf")
        )
        m = min(self.n_sel, self.n_blocks)
        vals, chosen = scores.topk(m, dim=-1)
        sel = torch.zeros(r, self.kv_heads, self.n_sel, dtype=torch.long, device=self.device)
        valid = torch.zeros(r, self.kv_heads, self.n_sel, dtype=torch.bool, device=self.device)
        sel[..., :m], valid[..., :m] = chosen, torch.isfinite(vals)
        self.sel[rows], self.sel_valid[rows] = sel, valid

    # ------------------------------------------------------------------ branches
    def _local(self, q: torch.Tensor) -> torch.Tensor:
        """Softmax over the rolling buffer (the window ``p - w < j <= p``)."""
        s = (self._grouped(q) * self.scale) @ self.local_k.transpose(-1, -2)  # (b, kv, g, ring)
        s = s.masked_fill((self.local_pos < 0).view(self.batch, 1, 1, -1), float("-inf"))
        return self._ungrouped(s.softmax(dim=-1) @ self.local_v)

    def _global_block(self, q: torch.Tensor, at: StepPositions) -> torch.Tensor:
        """Softmax over the selected earlier blocks and the causal part of the diagonal block."""
        b, kv, bsz = self.batch, self.kv_heads, self.block
        kb = self.k.view(b, kv, self.n_blocks, -1)
        vb = self.v.view(b, kv, self.n_blocks, -1)
        bi, hi = at.rows.view(b, 1, 1), self._kv_index.view(1, kv, 1)
        diag = (at.pos // bsz).view(b, 1, 1).expand(b, kv, 1)
        blocks = torch.cat([self.sel, diag], dim=-1)  # (b, kv, n_sel + 1)
        keys = kb[bi, hi, blocks].view(b, kv, -1, self.head_dim)
        values = vb[bi, hi, blocks].view(b, kv, -1, self.head_dim)
        offs = self._block_offsets
        diag_ok = (diag * bsz + offs) <= at.pos.view(b, 1, 1)  # (b, kv, B)
        keep = torch.cat([self.sel_valid.repeat_interleave(bsz, dim=-1), diag_ok], dim=-1)
        s = (self._grouped(q) * self.scale) @ keys.transpose(-1, -2)  # (b, kv, g, C)
        s = s.masked_fill(~keep.unsqueeze(2), float("-inf"))
        return self._ungrouped(s.softmax(dim=-1) @ values)

    def _global_exact(self, q: torch.Tensor, at: StepPositions) -> torch.Tensor:
        """Softmax over the exact top-k causal keys of the cache (``indexer: exact``)."""
        t = max(at.host) + 1
        qg = self._grouped(q)
        raw = qg @ self.k[:, :, :t].transpose(-1, -2)  # (b, kv, g, t)
        raw = raw.masked_fill(
            torch.arange(t, device=self.device).view(1, 1, 1, t) > at.pos.view(-1, 1, 1, 1),
            float("-inf"),
        )
        vals, ids = raw.topk(min(self.top_k, t), dim=-1)
        p = (vals * self.scale).softmax(dim=-1)  # -inf stays -inf: not a causal key
        bi, hi = at.rows.view(-1, 1, 1, 1), self._kv_index.view(1, -1, 1, 1)
        values = self.v[bi, hi, ids]  # (b, kv, g, kk, d)
        return self._ungrouped(torch.einsum("bhgk,bhgkd->bhgd", p, values))

    def local_entries(self) -> torch.Tensor:
        """``(batch,)`` number of occupied slots of the rolling buffer (never more than w)."""
        return (self.local_pos >= 0).sum(-1)
