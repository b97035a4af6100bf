"""A bounded, thread-safe least-recently-used cache. The engine keeps its recent prompt
encodings, LoRA weights and control-image latents in one each, and face analysis its recent
pictures' faces: look up, compute outside the lock on a miss (two threads may then compute the
same entry; the later one is kept), put, and the oldest entry leaves when there are more than
`size`, or, given `max_bytes`, when the entries' sizes (as put says them) add up to more; an
entry larger than `max_bytes` alone is not kept."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any


class LruCache:
    def __init__(self, size: int, max_bytes: int | None = None):
        self.size = size
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._sizes: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, default: Any = None) -> Any:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key]
            self.misses += 1
            return default

    def put(self, key: Hashable, value: Any, nbytes: int = 0) -> None:
        with self._lock:
            self._drop(key)
            if self.max_bytes is not None and nbytes > self.max_bytes:
                return
            self._entries[key] = value
            self._sizes[key] = nbytes
            self.bytes += nbytes
            while len(self._entries) > self.size or (self.max_bytes is not None and self.bytes > self.max_bytes):
                self._drop(next(iter(self._entries)))

    def _drop(self, key: Hashable) -> None:
        if key in self._entries:
            del self._entries[key]
            self.bytes -= self._sizes.pop(key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._sizes.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)
