"""LRU cache of prompt embeddings, bounded by bytes.

Product teams send templated prompts ("white sneakers on a clean background, {color}") and
the same negative prompt thousands of times; the text encoder (a 4B Qwen3 in the real model)
is then pure waste. Keys include the encoder's identity so two checkpoints never share rows.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0


class PromptEmbeddingCache:
    def __init__(self, max_bytes: int, encoder_id: str) -> None:
        self.max_bytes = max_bytes
        self.encoder_id = encoder_id
        self._rows: OrderedDict[tuple[str, int, str], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = CacheStats()

    def encode(
        self,
        prompts: Sequence[str],
        max_sequence_length: int,
        encoder: Callable[[list[str]], list[torch.Tensor]],
    ) -> list[torch.Tensor]:
        """Embeddings for ``prompts``; only the distinct misses go through ``encoder``, in one call."""
        keys = [(self.encoder_id, max_sequence_length, p) for p in prompts]
        found: dict[tuple[str, int, str], torch.Tensor] = {}
        with self._lock:
            for key in keys:
                row = self._rows.get(key)
                if row is not None:
                    self._rows.move_to_end(key)
                    found[key] = row
        missing = list(dict.fromkeys(k for k in keys if k not in found))
        with self._lock:
            self.stats.hits += len(keys) - sum(1 for k in keys if k not in found)
            self.stats.misses += len(missing)
        if missing:
            fresh = encoder([k[2] for k in missing])
            for key, row in zip(missing, fresh, strict=True):
                row = row.detach().to("cpu").contiguous()
                found[key] = row
                self._put(key, row)
        return [found[k] for k in keys]

    def _put(self, key: tuple[str, int, str], row: torch.Tensor) -> None:
        size = row.numel() * row.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._rows.pop(key, None)
            if old is not None:
                self.stats.bytes -= old.numel() * old.element_size()
            self._rows[key] = row
            self.stats.bytes += size
            while self.stats.bytes > self.max_bytes:
                _, evicted = self._rows.popitem(last=False)
                self.stats.bytes -= evicted.numel() * evicted.element_size()
                self.stats.evictions += 1
            self.stats.entries = len(self._rows)

    def clear(self) -> None:
        with self._lock:
            self._rows.clear()
            self.stats = CacheStats()
