"""Memory planning: place buffers with known lifetimes in one arena.

Two buffers may share bytes only if their lifetimes (inclusive step ranges) do not
overlap. Placement is greedy by size, largest first, each at the lowest aligned
offset that clears every already-placed buffer it is alive with — the
"greedy by size" planner TensorFlow Lite and others use; it is near-optimal on
the chain-like lifetimes of inference graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

ALIGNMENT = 256  # bytes; the CUDA allocator's own granularity, and enough for any vector load


@dataclass(frozen=True)
class Buffer:
    nbytes: int
    first: int  # step that writes it
    last: int  # last step that reads it (inclusive)

    def alive_with(self, other: Buffer) -> bool:
        return self.first <= other.last and other.first <= self.last


def align(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


def place(buffers: list[Buffer], alignment: int = ALIGNMENT) -> tuple[list[int], int]:
    """Offsets for each buffer and the arena size they fit in."""
    order = sorted(range(len(buffers)), key=lambda i: (-buffers[i].nbytes, buffers[i].first))
    offsets = [0] * len(buffers)
    placed: list[int] = []
    arena = 0
    for i in order:
        b = buffers[i]
        size = align(b.nbytes, alignment)
        busy = sorted(
            (offsets[j], offsets[j] + align(buffers[j].nbytes, alignment))
            for j in placed
            if buffers[j].alive_with(b)
        )
        offset = 0
        for start, end in busy:
            if offset + size <= start:
                break
            offset = max(offset, end)
        offsets[i] = offset
        placed.append(i)
        arena = max(arena, offset + size)
    return offsets, arena


def peak_live_bytes(buffers: list[Buffer], alignment: int = ALIGNMENT) -> int:
    """The most bytes alive at any one step: no arena can be smaller."""
    if not buffers:
        return 0
    steps = range(min(b.first for b in buffers), max(b.last for b in buffers) + 1)
    return max(sum(align(b.nbytes, alignment) for b in buffers if b.first <= s <= b.last) for s in steps)
