"""Multi-stream plans (seed 003): a short independent branch runs on a side stream while
the main stream works through the other branch of a fork → join.

A side branch is a chain of steps that starts from the fork's output, feeds only the next
step of the chain, and ends in the join (ResNet's downsample convolution beside the
block's conv1 → conv2, joined by the residual add of conv3). At run time the side stream
waits for the main stream before the chain's first step, and the join waits for the side
stream (both inside the captured CUDA graph). The memory plan must not let the two streams
share bytes: every slot the chain reads or writes stays alive over the whole fork → join
span, so the arena placer keeps it apart from everything the main branch touches there.
Whether this pays is measured at build time (kiln.builder keeps the faster plan).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SideBranch:
    fork: int  # step whose output both branches read
    chain: tuple[int, ...]  # steps on the side stream, in order
    join: int  # first step reading both branches


def _slots(value: Any) -> list[int]:
    if isinstance(value, dict):
        if "slot" in value:
            return [int(value["slot"])]
        return [s for v in value.values() for s in _slots(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _slots(v)]
    return []


def reads(step: dict[str, Any]) -> set[int]:
    return set(_slots(step["args"])) | set(_slots(step["kwargs"]))


def side_branches(steps: list[dict[str, Any]], output_slots: set[int]) -> list[SideBranch]:
    """Every fork → join whose shorter branch is a chain with work beside it on the main stream."""
    producer = {slot: i for i, step in enumerate(steps) for slot in step["outputs"]}
    deps = [{producer[s] for s in reads(step) if s in producer} for step in steps]
    consumers: list[set[int]] = [set() for _ in steps]
    for i, d in enumerate(deps):
        for j in d:
            consumers[j].add(i)
    ends_graph = {producer[s] for s in output_slots if s in producer}
    taken: set[int] = set()
    found = []
    for start, d in enumerate(deps):
        if len(d) != 1 or start in taken:
            continue
        (fork,) = d
        if len(consumers[fork]) < 2:
            continue
        chain = [start]
        while len(consumers[chain[-1]]) == 1 and chain[-1] not in ends_graph:
            (nxt,) = consumers[chain[-1]]
            if deps[nxt] != {chain[-1]}:
                break
            chain.append(nxt)
        if len(consumers[chain[-1]]) != 1 or chain[-1] in ends_graph:
            continue
        (join,) = consumers[chain[-1]]
        beside = [i for i in range(fork + 1, join) if i not in chain]
        inside = set(range(fork + 1, join))
        if len(deps[join]) < 2 or len(beside) < len(chain) or taken & inside:
            continue
        found.append(SideBranch(fork, tuple(chain), join))
        taken.update(inside)
    return found


def mark(steps: list[dict[str, Any]], branches: list[SideBranch]) -> None:
    """Record the streams in the plan's steps: side steps, where the side stream forks off
    and where the main stream waits for it."""
    for b in branches:
        for i in b.chain:
            steps[i]["stream"] = 1
        steps[b.chain[0]]["fork"] = True
        steps[b.join]["join"] = True
