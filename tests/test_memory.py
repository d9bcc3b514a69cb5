"""The memory plan: no two buffers alive at the same step share bytes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kiln
from kiln import zoo
from kiln.plan import memory

buffers = st.lists(
    st.tuples(st.integers(1, 10_000), st.integers(0, 40), st.integers(0, 10)).map(
        lambda t: memory.Buffer(nbytes=t[0], first=t[1], last=t[1] + t[2])
    ),
    max_size=60,
)


def assert_no_overlap(bufs, offsets, arena):
    for i, a in enumerate(bufs):
        assert offsets[i] % memory.ALIGNMENT == 0
        assert offsets[i] + a.nbytes <= arena
        for j in range(i):
            b = bufs[j]
            if a.alive_with(b):
                disjoint = offsets[i] + a.nbytes <= offsets[j] or offsets[j] + b.nbytes <= offsets[i]
                assert disjoint, f"buffers {i} and {j} are alive together and overlap"


@settings(max_examples=300, deadline=None)
@given(buffers)
def test_live_buffers_never_overlap(bufs):
    offsets, arena = memory.place(bufs)
    assert_no_overlap(bufs, offsets, arena)
    assert memory.peak_live_bytes(bufs) <= arena <= sum(memory.align(b.nbytes) for b in bufs)


def test_dead_buffers_are_reused():
    bufs = [memory.Buffer(1000, 0, 1), memory.Buffer(1000, 2, 3), memory.Buffer(1000, 4, 5)]
    offsets, arena = memory.place(bufs)
    assert arena == memory.align(1000) and offsets == [0, 0, 0]


@pytest.mark.parametrize("name, min_reuse", [("bert-tiny", 3), ("resnet18", 1.5)])
def test_a_real_plan_keeps_live_tensors_apart(name, min_reuse):
    entry = zoo.create(name)
    engine = kiln.build(entry.model, entry.example_inputs, config=kiln.BuildConfig(passes=[]))
    mem = engine.plan["memory"]
    bufs = [memory.Buffer(b["nbytes"], b["first"], b["last"]) for b in mem["buffers"]]
    assert_no_overlap(bufs, [b["offset"] for b in mem["buffers"]], mem["arena_bytes"])
    assert mem["arena_bytes"] * min_reuse < mem["planned_bytes"], f"{name} should reuse memory"


def test_views_keep_their_base_buffer_alive():
    class ViewOutlivesBase(torch.nn.Module):
        def forward(self, x):
            a = x * 2
            v = a.view(-1)  # a is dead after this, but v (same bytes) is read at the end
            b = x + 1
            c = b * 3
            return v.sum() + c.sum()

    x = torch.randn(8, 8)
    engine = kiln.build(ViewOutlivesBase(), (x,))
    torch.testing.assert_close(engine(x), ViewOutlivesBase()(x))
    steps = engine.plan["steps"]
    mul = next(s for s in steps if s["name"] == "mul")
    view_slot = next(s for s in steps if s["op"] == "aten.view.default")["outputs"][0]
    reader = next(i for i, s in enumerate(steps) if {"slot": view_slot} in s["args"])
    buf = next(b for b in engine.plan["memory"]["buffers"] if b["slot"] == mul["outputs"][0])
    assert reader > 2 and buf["last"] >= reader, "the view's reads must extend its base buffer's lifetime"

