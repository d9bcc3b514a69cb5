"""Kernel selection: each op's candidate kernels, timed on its real shapes, the fastest kept
(with a timing cache on disk)."""

from kiln.select.selection import Selection, select_kernels
from kiln.select.tune import TimingCache, default_cache_path

__all__ = ["Selection", "TimingCache", "default_cache_path", "select_kernels"]
