"""Prepared corpora (``mla prepare``): token shards read by memory map.

A prepared folder holds, per split, shards ``train-00000.bin``, ... of raw token ids (uint16 or
uint32, native little-endian, no header: ``np.memmap``-able, as nanoGPT's ``train.bin`` and
Megatron's ``.bin`` files), the run's ``tokenizer.json``, and ``manifest.json`` -- written last,
inside a folder that is renamed into place whole (:func:`mla.staged_dir.staged_dir`), so a
folder with a manifest is complete. The token stream of a split is its shards concatenated: the
same stream :func:`workers.data.load_corpus` builds in memory from the unprepared data, so the
batches (:class:`workers.data.WindowBatches`) are identical.

Workers map the shards (``mode="r"``) and read only the windows of their own data-parallel
rank; pages are read on demand, so a worker's memory does not grow with the corpus.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from orchestrator.contract.errors import DataError

MANIFEST = "manifest.json"
FORMAT = "mla-prepared-tokens"
SPLITS = ("train", "validation")


def is_prepared(path: Path) -> bool:
    """Whether ``path`` is a folder with a prepared-data manifest."""
    return path.is_dir() and (path / MANIFEST).is_file()


def read_manifest(folder: Path) -> dict:
    """The parsed ``manifest.json`` of a prepared folder.

    Raises:
        DataError: unreadable, not JSON, or not a prepared-data manifest.
    """
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{folder / MANIFEST}: unreadable ({exc}); run `mla prepare` again to rebuild {folder}"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(
            f"{folder / MANIFEST} is not an `mla prepare` manifest (format "
            f"{manifest.get('format') if isinstance(manifest, dict) else None!r}); point data.path "
            "at an `mla prepare --out` folder or at the raw text"
        )
    return manifest


class ShardedTokens:
    """One token stream over several memory-mapped shards, indexed like a 1-D array.

    Args:
        shards: The shard arrays (``np.memmap``), in stream order.

    Example:
        >>> t = ShardedTokens([np.arange(5), np.arange(5, 9)])
        >>> len(t), t[np.array([[3, 4, 5]])].tolist()
        (9, [[3, 4, 5]])
    """

    def __init__(self, shards: Sequence[np.ndarray]) -> None:
        self.shards = [s for s in shards if len(s)]
        self.ends = np.cumsum([len(s) for s in self.shards], dtype=np.int64)
        self.dtype = self.shards[0].dtype if self.shards else np.dtype(np.uint16)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        """Tokens at integer positions ``index`` (any shape); reads only those pages."""
        index = np.asarray(index, dtype=np.int64)
        if len(self.shards) == 1:
            return np.asarray(self.shards[0][index])
        flat = index.ravel()
        which = np.searchsorted(self.ends, flat, side="right")
        out = np.empty(flat.shape, dtype=self.dtype)
        starts = np.concatenate([[0], self.ends[:-1]])
        for s in np.unique(which):
            sel = which == s
            out[sel] = self.shards[s][flat[sel] - starts[s]]
        return out.reshape(index.shape)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """The whole stream in memory (``np.concatenate`` of ``mla eval --split all``)."""
        whole = np.concatenate([np.asarray(s) for s in self.shards]) if self.shards else np.empty(0)
        return whole.astype(dtype) if dtype is not None else whole


def load_prepared(folder: Path):
    """Memory-map a prepared folder as a :class:`workers.data.Corpus`.

    Raises:
        DataError: bad manifest, or a shard missing or of another size than the manifest says.
    """
    from workers.data import Corpus

    manifest = read_manifest(folder)
    dtype = np.dtype(manifest["dtype"])
    splits = {}
    for split in SPLITS:
        shards = []
        for shard in manifest["splits"][split]["shards"]:
            path = folder / shard["file"]
            want = int(shard["tokens"]) * dtype.itemsize
            size = path.stat().st_size if path.is_file() else None
            if size != want:
                raise DataError(
                    f"{path}: {'missing' if size is None else f'{size} bytes'}, the manifest "
                    f"says {want}; run `mla prepare` again to rebuild {folder}"
                )
            if want:
                shards.append(np.memmap(path, dtype=dtype, mode="r"))
        splits[split] = ShardedTokens(shards)
    return Corpus(
        splits["train"],
        splits["validation"],
        f"prepared {folder} ({manifest['source']})",
        int(manifest["documents"]["train"]) + int(manifest["documents"]["validation"]),
        int(manifest["splits"]["validation"]["bytes"]),
    )


def prepared_tokenizer_path(path: str | None) -> Path | None:
    """``DIR/tokenizer.json`` when ``path`` is a prepared folder, else ``None``."""
    if path is None:
        return None
    folder = Path(path).expanduser()
    return folder / "tokenizer.json" if is_prepared(folder) else None
