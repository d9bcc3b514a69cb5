"""kiln.shapes: dims, size expressions as data, binding inputs, plan specialization, the
per-shape LRU cache and bucketing."""

from __future__ import annotations

import json

import pytest
import sympy
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from kiln.errors import InputError
from kiln.shapes import (
    MAX_NODES,
    Buckets,
    Dim,
    InputShape,
    ShapeCache,
    ShapeExprError,
    awkward_size,
    bind,
    bucket_binding,
    check_bindable,
    dims_from_json,
    dims_of,
    evaluate,
    from_sympy,
    make,
    nondecreasing,
    pad_to,
    probe_bindings,
    render,
    render_shape,
    specialize_plan,
    substitute,
    unpad,
    validate,
    validate_plan,
)

BATCH = Dim("batch", min=1, opt=8, max=64)
SEQ = Dim("seq", min=16, opt=128, max=512)
DIMS = {"batch": BATCH, "seq": SEQ}

# -- Dim ----------------------------------------------------------------------------------------


def test_dim_json_round_trip_and_repr():
    again = Dim.from_json(json.loads(json.dumps(BATCH.to_json())))
    assert again == BATCH and hash(again) == hash(BATCH)
    assert repr(BATCH) == "kiln.Dim('batch', min=1, opt=8, max=64)"
    assert BATCH.describe() == "batch 1..64 (opt 8)"
    assert Dim("b", max=4).opt is None and Dim("b", max=4).with_opt(3).opt == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "batch"}, "needs max="),
        ({"name": "2x", "max": 4}, "identifier"),
        ({"name": "b", "min": 0, "max": 4}, "1 <= min <= max"),
        ({"name": "b", "min": 5, "max": 4}, "1 <= min <= max"),
        ({"name": "b", "min": 2, "opt": 1, "max": 4}, "min <= opt <= max"),
        ({"name": "b", "min": 1, "opt": 9, "max": 4}, "min <= opt <= max"),
        ({"name": "b", "min": True, "max": 4}, "must be an int"),
        ({"name": "b", "min": 1, "max": 4.0}, "must be an int"),
        ({"name": "b", "max": 2**31}, "1 <= min <= max"),
    ],
)
def test_dim_rejects_bad_ranges(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Dim(**kwargs)


def test_dim_is_immutable():
    with pytest.raises(AttributeError):
        BATCH.max = 128


@pytest.mark.parametrize(
    "obj",
    [
        {"name": "b", "min": 1, "max": 4},
        {"name": "b", "min": 1, "opt": None, "max": 4},
        {"name": "b", "min": 1, "opt": 2, "max": 4, "extra": 1},
        {"name": "b", "min": "1", "opt": 2, "max": 4},
        ["b", 1, 2, 4],
    ],
)
def test_dim_from_json_refuses_malformed(obj):
    with pytest.raises(ValueError):
        Dim.from_json(obj)


def test_dims_from_json_refuses_duplicates():
    assert dims_from_json([BATCH.to_json(), SEQ.to_json()]) == DIMS
    with pytest.raises(ValueError, match="twice"):
        dims_from_json([BATCH.to_json(), BATCH.to_json()])


def test_dim_parse_cli_ranges():
    assert Dim.parse("batch", "1:8:64") == BATCH
    assert Dim.parse("batch", "16") == 16
    for bad in ("1:64", "a:b:c", "0", "1:8:64:2", "8:1:64"):
        with pytest.raises(ValueError):
            Dim.parse("batch", bad)


# -- expressions ----------------------------------------------------------------------------------

NAMES = ("batch", "seq")


def expressions(max_leaves: int = 12) -> st.SearchStrategy:
    leaves = st.one_of(st.integers(-64, 64), st.sampled_from(NAMES))

    def extend(children: st.SearchStrategy) -> st.SearchStrategy:
        many = st.lists(children, min_size=1, max_size=3)
        return st.one_of(
            st.builds(lambda a: {"add": a}, many),
            st.builds(lambda a: {"mul": a}, many),
            st.builds(lambda a: {"max": a}, many),
            st.builds(lambda a: {"min": a}, many),
            st.builds(lambda a, b: {"floordiv": [a, b]}, children, st.integers(1, 9)),
            st.builds(lambda a, b: {"mod": [a, b]}, children, st.integers(1, 9)),
        )

    return st.recursive(leaves, extend, max_leaves=max_leaves)


bindings = st.fixed_dictionaries({"batch": st.integers(1, 64), "seq": st.integers(16, 512)})


def to_sympy(e, symbols):
    from torch.utils._sympy.functions import FloorDiv, PythonMod

    if isinstance(e, int):
        return sympy.Integer(e)
    if isinstance(e, str):
        return symbols[e]
    (op, args), = e.items()
    parts = [to_sympy(a, symbols) for a in args]
    if op == "add":
        return sympy.Add(*parts)
    if op == "mul":
        return sympy.Mul(*parts)
    if op == "max":
        return sympy.Max(*parts)
    if op == "min":
        return sympy.Min(*parts)
    if op == "floordiv":
        return FloorDiv(*parts)
    return PythonMod(*parts)


@settings(max_examples=200, deadline=None)
@given(expressions(), bindings)
def test_expressions_survive_json_and_validate(expr, binding):
    again = json.loads(json.dumps(expr))
    assert validate(again, NAMES) == expr
    assert evaluate(again, binding) == evaluate(expr, binding)
    assert dims_of(expr) <= set(NAMES)


@settings(max_examples=200, deadline=None)
@given(expressions(), bindings)
@example(expr={"floordiv": [{"max": [{"min": [2, "seq"]}, {"min": [3, "seq"]}]}, 2]}, binding={"batch": 1, "seq": 16})
def test_from_sympy_agrees_with_sympy(expr, binding):
    symbols = {"batch": sympy.Symbol("s0", integer=True, positive=True),
               "seq": sympy.Symbol("s1", integer=True, positive=True)}
    s = to_sympy(expr, symbols)
    want = int(s.subs({symbols[k]: v for k, v in binding.items()}).doit())  # doit: nested Max/Min stay unevaluated
    back = from_sympy(s, {"s0": "batch", "s1": "seq"})
    assert validate(back, NAMES) == back
    assert evaluate(back, binding) == want == evaluate(expr, binding)


@settings(max_examples=300, deadline=None)
@given(expressions(), bindings, bindings)
def test_nondecreasing_is_sound(expr, a, b):
    """Wherever nondecreasing() says yes, growing the dims never shrinks the value."""
    lows = {"batch": 1, "seq": 16}
    assume(nondecreasing(expr, lows))
    low = {k: min(a[k], b[k]) for k in a}
    high = {k: max(a[k], b[k]) for k in a}
    assert evaluate(expr, low) <= evaluate(expr, high)


def test_nondecreasing_on_real_shapes():
    lows = {"h": 64, "batch": 1}
    conv_out = make("add", [make("floordiv", [make("add", ["h", -1]), 2]), 1])  # (h - 1)//2 + 1
    assert nondecreasing(make("mul", [4, "batch", conv_out, conv_out]), lows)
    assert nondecreasing({"min": [128, {"mul": [128, "batch"]}]}, lows)
    assert not nondecreasing({"mul": [-1, "batch"]}, lows)
    assert not nondecreasing({"mod": ["h", 7]}, lows)
    assert not nondecreasing({"mul": [{"add": ["batch", -5]}, "h"]}, lows)  # negative factor at the low end


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ({"pow": ["batch", 2]}, "unknown shape operation"),
        ({"floordiv": ["batch"]}, "takes 2 arguments"),
        ({"add": []}, "1 or more"),
        ({"add": "batch"}, "takes"),
        ({"add": ["batch"], "mul": [2]}, "not a shape expression"),
        ("heads", "not one of"),
        ("not a name", "not a dim name"),
        (2**63, "out of range"),
        (True, "not a shape expression"),
        (1.5, "not a shape expression"),
        (None, "not a shape expression"),
        ({"add": ["batch"] * (MAX_NODES + 1)}, "more than"),
    ],
)
def test_validate_refuses(expr, message):
    with pytest.raises(ShapeExprError, match=message):
        validate(expr, NAMES)


def test_validate_refuses_deep_nesting():
    expr = "batch"
    for _ in range(40):
        expr = {"add": [expr, 1]}
    with pytest.raises(ShapeExprError, match="nested"):
        validate(expr, NAMES)


def test_evaluate_errors_name_the_problem():
    with pytest.raises(ShapeExprError, match="'seq' has no value"):
        evaluate({"mul": [128, "seq"]}, {"batch": 2})
    with pytest.raises(ShapeExprError, match="division by zero"):
        evaluate({"floordiv": ["batch", 0]}, {"batch": 2})


def test_make_folds_constants_and_flattens():
    assert make("mul", [2, "b", 64]) == {"mul": [128, "b"]}
    assert make("add", ["b", 0]) == "b"
    assert make("mul", ["b", 0]) == 0
    assert make("add", [{"add": ["b", 1]}, 2]) == {"add": ["b", 3]}
    assert make("floordiv", [9, 2]) == 4
    assert make("max", [{"mul": [128, "s"]}, 128]) == {"max": [{"mul": [128, "s"]}, 128]}


def test_render():
    assert render({"mul": [128, "seq", "batch"]}) == "128*seq*batch"
    assert render(make("add", [make("floordiv", [make("add", ["h", -1]), 2]), 1])) == "(h - 1)//2 + 1"
    assert render({"min": [128, {"mul": [128, "seq"]}]}) == "min(128, 128*seq)"
    assert render({"mul": [{"add": ["a", "b"]}, 2]}) == "(a + b)*2"
    assert render_shape(["batch", 3, 224, 224]) == "(batch, 3, 224, 224)"
    assert render_shape(["batch"]) == "(batch,)"


def test_from_sympy_on_an_exported_model():
    """Every size torch.export gives a small transformer block's values converts, and
    evaluates to what the model really produces at other sizes."""
    from kiln.dims import normalize

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
            self.proj = torch.nn.Linear(16, 8)

        def forward(self, x):
            y = self.attn(x, x, x, need_weights=False)[0]
            return self.proj(y.flatten(0, 1)).view(x.shape[0], -1)

    x = torch.randn(3, 5, 16)
    spec = normalize(({0: Dim("batch", max=8), 1: Dim("seq", min=2, max=32)},), (x,))
    program = torch.export.export(Block().eval(), (x,), dynamic_shapes=spec.to_torch_export())
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    names = spec.symbol_names([placeholders[-1].meta["val"]])
    exprs = set()
    for node in program.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            for size in (*val.shape, *val.stride()):
                exprs.add(json.dumps(spec.expr(size, names)))
    out_node = next(n for n in program.graph.nodes if n.op == "output").args[0][0]
    out_shape = [spec.expr(d, names) for d in out_node.meta["val"].shape]
    assert out_shape == ["batch", {"mul": [8, "seq"]}]
    assert any("seq" in e and "batch" in e for e in exprs)
    got = Block().eval()(torch.randn(5, 7, 16)).shape
    assert [evaluate(d, {"batch": 5, "seq": 7}) for d in out_shape] == list(got)


# -- binding inputs -----------------------------------------------------------------------------------

INPUTS = [InputShape("input_ids", ("batch", "seq")), InputShape("mask", ("batch", 1, 1, "seq"))]


def test_bind_reads_dims_off_inputs():
    assert bind([(4, 100), (4, 1, 1, 100)], INPUTS, DIMS) == {"batch": 4, "seq": 100}
    assert bind([(1, 16), (1, 1, 1, 16)], INPUTS, DIMS) == {"batch": 1, "seq": 16}
    assert bind([(64, 512), (64, 1, 1, 512)], INPUTS, DIMS) == {"batch": 64, "seq": 512}


def test_bind_out_of_range_names_the_range():
    with pytest.raises(InputError, match=r"input 0 \('input_ids'\) has batch = 65.*from 1 to 64.*"
                                         r"kiln.Dim\('batch', min=1, opt=8, max=64\).*larger max"):
        bind([(65, 100), (65, 1, 1, 100)], INPUTS, DIMS)
    with pytest.raises(InputError, match=r"seq = 8 .*from 16 to 512.*min=8"):
        bind([(4, 8), (4, 1, 1, 8)], INPUTS, DIMS)


def test_bind_inconsistent_inputs():
    with pytest.raises(InputError, match=r"input 1 \('mask'\) has seq = 99 \(axis 3\), but input 0 \('input_ids'\) "
                                         r"axis 1 has seq = 100"):
        bind([(4, 100), (4, 1, 1, 99)], INPUTS, DIMS)


def test_bind_fixed_axes_and_rank():
    with pytest.raises(InputError, match=r"size 2 at axis 1.*built for 1.*fixed"):
        bind([(4, 100), (4, 2, 1, 100)], INPUTS, DIMS)
    with pytest.raises(InputError, match=r"rank 3.*rank 2, shape \(batch, seq\)"):
        bind([(4, 100, 1), (4, 1, 1, 100)], INPUTS, DIMS)
    with pytest.raises(InputError, match="takes 2 input"):
        bind([(4, 100)], INPUTS, DIMS)


def test_bind_checks_derived_axes():
    inputs = [InputShape("x", ("batch", "seq")), InputShape("pairs", ("batch", {"mul": [2, "seq"]}))]
    assert bind([(2, 20), (2, 40)], inputs, DIMS) == {"batch": 2, "seq": 20}
    with pytest.raises(InputError, match=r"2\*seq = 40 here"):
        bind([(2, 20), (2, 41)], inputs, DIMS)


def test_check_bindable():
    check_bindable(INPUTS, DIMS)
    with pytest.raises(ShapeExprError, match="no input's whole axis"):
        check_bindable([InputShape("x", ({"mul": [2, "seq"]},)), InputShape("y", ("batch",))], DIMS)
    with pytest.raises(ShapeExprError, match="appear on no input"):
        check_bindable([InputShape("x", ("batch", 3))], DIMS)
    with pytest.raises(ShapeExprError, match="not one of"):
        check_bindable([InputShape("x", ("heads",))], DIMS)


def test_probe_bindings_cover_the_corners_and_an_awkward_size():
    found = probe_bindings([BATCH, SEQ])
    assert found[0] == {"batch": 8, "seq": 128}
    for want in ({"batch": 1, "seq": 16}, {"batch": 64, "seq": 512}, {"batch": 61, "seq": 128},
                 {"batch": 8, "seq": 509}, {"batch": 1, "seq": 128}):
        assert want in found
    assert len(found) == len({json.dumps(b, sort_keys=True) for b in found})
    assert probe_bindings([]) == [{}]
    assert awkward_size(Dim("b", min=1, opt=2, max=3)) is None
    assert awkward_size(Dim("b", min=1, opt=8, max=8)) == 7


# -- specializing a plan ------------------------------------------------------------------------------


def toy_plan() -> dict:
    """A plan shaped like the planner's: input [batch, seq], a buffer of [batch*seq, 32]
    planned at the max, a slice into it, a view whose shape comes from a size argument."""
    rows = {"mul": ["batch", "seq"]}
    return {
        "dims": [BATCH.to_json(), SEQ.to_json()],
        "inputs": [{"name": "x", "shape": ["batch", "seq"], "dtype": "float32"}],
        "graph_inputs": [{"name": "x", "shape": ["batch", "seq"], "dtype": "float32"}],
        "outputs": [{"name": "output_0", "shape": ["batch", "seq", 32], "dtype": "float32"}],
        "output_refs": [{"slot": 2}],
        "slots": [
            {"shape": ["batch", "seq"], "stride": ["seq", 1], "dtype": "float32", "kind": "input"},
            {"shape": [rows, 32], "stride": [32, 1], "dtype": "float32", "kind": "buffer", "offset": 0,
             "nbytes": {"mul": [128, rows]}},
            {"shape": ["batch", "seq", 32], "stride": [{"mul": [32, "seq"]}, 32, 1], "dtype": "float32",
             "kind": "view"},
            {"shape": [rows, 16], "stride": [32, 1], "dtype": "float32", "kind": "slice", "base": 1,
             "base_offset": 16, "offset": 64, "nbytes": {"add": [{"mul": [128, rows]}, -64]}},
        ],
        "steps": [
            {"name": "mm", "op": "aten.mm.default", "args": [{"slot": 0}, {"weight": "w"}], "kwargs": {},
             "outputs": [1]},
            {"name": "view", "op": "aten.view.default",
             "args": [{"slot": 1}, [{"sym": "batch"}, {"sym": "seq"}, 32]],
             "kwargs": {"sym": {"sym": "seq"}, "dtype": {"dtype": "float32"}}, "outputs": [2]},
            {"name": "arange", "op": "aten.arange.start", "args": [0, {"sym": {"mul": [2, "seq"]}}],
             "kwargs": {"size": {"tuple": [{"sym": "batch"}, 3]}}, "outputs": [3]},
        ],
        "memory": {"arena_bytes": 128 * 64 * 512},
    }


def test_specialize_plan_evaluates_every_size():
    plan = toy_plan()
    validate_plan(plan, DIMS)
    before = json.dumps(plan, sort_keys=True)
    flat = specialize_plan(plan, {"batch": 2, "seq": 20})
    assert json.dumps(plan, sort_keys=True) == before  # the dynamic plan is untouched
    assert flat["inputs"][0]["shape"] == [2, 20]
    assert flat["outputs"][0]["shape"] == [2, 20, 32]
    assert flat["slots"][1] == {**plan["slots"][1], "shape": [40, 32], "stride": [32, 1], "nbytes": 5120}
    assert flat["slots"][2]["stride"] == [640, 32, 1]
    assert flat["slots"][3]["nbytes"] == 5120 - 64 and flat["slots"][3]["base_offset"] == 16
    assert flat["steps"][1]["args"] == [{"slot": 1}, [2, 20, 32]]
    assert flat["steps"][1]["kwargs"] == {"sym": 20, "dtype": {"dtype": "float32"}}
    assert flat["steps"][2]["args"] == [0, 40]
    assert flat["steps"][2]["kwargs"] == {"size": {"tuple": [2, 3]}}
    leftover = json.dumps([[s["args"] for s in flat["steps"]], flat["slots"], flat["inputs"], flat["outputs"]])
    assert '"sym"' not in leftover and '"batch"' not in leftover and '"seq"' not in leftover


def test_specialize_plan_refuses_a_slot_past_the_arena():
    plan = toy_plan()
    plan["memory"]["arena_bytes"] = 1000
    with pytest.raises(ShapeExprError, match="past the 1000-byte arena"):
        specialize_plan(plan, {"batch": 2, "seq": 20})


@pytest.mark.parametrize(
    ("path", "bad", "where"),
    [
        (("slots", 1, "shape", 0), {"pow": ["batch", 2]}, "slot 1 shape"),
        (("slots", 3, "nbytes"), "heads", "slot 3 nbytes"),
        (("inputs", 0, "shape", 1), {"add": []}, "inputs"),
        (("steps", 1, "args", 1, 0), {"sym": "heads"}, "step 'view' args"),
        (("steps", 2, "kwargs", "size"), {"tuple": [{"sym": {"exp": [1]}}]}, "step 'arange' kwargs"),
    ],
)
def test_validate_plan_names_where_the_bad_expression_is(path, bad, where):
    plan = toy_plan()
    target = plan
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = bad
    with pytest.raises(ShapeExprError, match=where):
        validate_plan(plan, DIMS)


def test_substitute_leaves_other_values_alone():
    value = [{"slot": 3}, {"float": "inf"}, "relu", {"tuple": [1, {"sym": "batch"}]}, [{"sym": 5}]]
    assert substitute(value, {"batch": 7}) == [{"slot": 3}, {"float": "inf"}, "relu", {"tuple": [1, 7]}, [5]]


# -- the per-shape cache ----------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 4), st.lists(st.integers(0, 6), max_size=40))
def test_shape_cache_is_an_lru(capacity, keys):
    evicted = []
    cache: ShapeCache[int, str] = ShapeCache(capacity, on_evict=lambda k, v: evicted.append((k, v)))
    model: list[int] = []  # least recently used first
    for key in keys:
        value = cache.get_or_create(key, lambda key=key: f"v{key}")
        assert value == f"v{key}"
        if key in model:
            model.remove(key)
        model.append(key)
        while len(model) > capacity:
            gone = model.pop(0)
            assert evicted[-1] == (gone, f"v{gone}")
        assert cache.keys() == model
    assert cache.hits + cache.misses == len(keys)
    assert cache.evictions == len(evicted) == cache.misses - len(cache)


def test_shape_cache_clear_and_capacity():
    dropped = []
    cache = ShapeCache(2, on_evict=lambda k, v: dropped.append(k))
    cache.put((1,), "a")
    cache.put((2,), "b")
    assert (1,) in cache and len(cache) == 2
    cache.clear()
    assert dropped == [(1,), (2,)] and len(cache) == 0
    assert cache.stats()["capacity"] == 2
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            ShapeCache(bad)


# -- bucketing ---------------------------------------------------------------------------------------------


def test_buckets_pick_the_next_size_up():
    b = Buckets(BATCH, [1, 8, 16, 64])
    assert [b.bucket(n) for n in (1, 2, 8, 9, 16, 17, 64)] == [1, 8, 8, 16, 16, 64, 64]
    with pytest.raises(InputError, match="outside this engine's range 1..64"):
        b.bucket(65)
    assert bucket_binding({"batch": 9, "seq": 100}, {"batch": b}) == {"batch": 16, "seq": 100}
    assert Buckets.powers_of_two(Dim("b", min=3, opt=12, max=40)).sizes == (3, 4, 8, 12, 16, 32, 40)
    assert b.to_json() == {"dim": "batch", "sizes": [1, 8, 16, 64]}


@pytest.mark.parametrize(("sizes", "message"), [([1, 8], "must be its max"), ([0, 64], "outside"), ([], "non-empty")])
def test_buckets_refuse_bad_lists(sizes, message):
    with pytest.raises(ValueError, match=message):
        Buckets(BATCH, sizes)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=6), st.integers(1, 64))
def test_bucket_is_the_smallest_that_holds(sizes, n):
    b = Buckets(BATCH, sizes + [64])
    got = b.bucket(n)
    assert got >= n and got in b.sizes
    assert all(s < n for s in b.sizes if s < got)


def test_pad_and_unpad():
    x = torch.arange(6).reshape(3, 2)
    edge = pad_to(x, 0, 5)
    assert edge.tolist() == [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]]
    assert pad_to(x, 1, 3, mode="zeros").tolist() == [[0, 1, 0], [2, 3, 0], [4, 5, 0]]
    assert pad_to(x, 0, 3) is x
    assert torch.equal(unpad(edge, 0, 3), x)
    with pytest.raises(ValueError, match="down to"):
        pad_to(x, 0, 2)
    with pytest.raises(ValueError, match="pad mode"):
        pad_to(x, 0, 4, mode="reflect")


def test_padding_a_batch_does_not_change_the_real_rows():
    """What bucketing relies on: rows of a batch-independent model do not see the padding."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 3)).eval()
    x = torch.randn(5, 4)
    with torch.no_grad():
        padded = model(pad_to(x, 0, Buckets(BATCH, [8, 64]).bucket(5)))
        torch.testing.assert_close(unpad(padded, 0, 5), model(x))
