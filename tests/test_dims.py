"""kiln.dims: the user's dynamic_shapes → a checked DynamicSpec → torch.export, including
min=1 despite torch.export's 0/1 specialization."""

from __future__ import annotations

import pytest
import torch

from kiln.dims import DynamicSpec, constraint_lines, forward_arg_names, normalize, resize
from kiln.shapes import Dim, InputShape, ShapeExprError, bind


class TwoInputs(torch.nn.Module):
    def forward(self, input_ids, attention_mask):
        return input_ids * attention_mask


IDS = torch.randint(0, 100, (4, 32))
MASK = torch.ones(4, 32, dtype=torch.long)
BATCH = Dim("batch", min=1, opt=8, max=64)
SEQ = Dim("seq", min=16, max=512)  # opt from the examples


def test_tuple_and_name_forms_agree():
    by_position = normalize(({0: BATCH, 1: SEQ}, {0: BATCH, 1: SEQ}), (IDS, MASK))
    by_name = normalize({"attention_mask": {0: BATCH, 1: SEQ}, "input_ids": [BATCH, SEQ]}, (IDS, MASK),
                        forward_arg_names(TwoInputs()))
    assert by_position == by_name
    assert by_position.dims == {"batch": BATCH, "seq": SEQ.with_opt(32)}
    assert by_position.axes == ({0: "batch", 1: "seq"}, {0: "batch", 1: "seq"})
    assert by_position.to_json() == [BATCH.to_json(), {"name": "seq", "min": 16, "opt": 32, "max": 512}]
    shapes = by_position.input_shapes((IDS, MASK), ["input_ids", "attention_mask"])
    assert shapes == [InputShape("input_ids", ("batch", "seq")), InputShape("attention_mask", ("batch", "seq"))]


def test_static_and_partial_specs():
    assert not normalize(None, (IDS,)).dynamic
    spec = normalize(({-1: SEQ}, None), (IDS, MASK))
    assert spec.axes == ({1: "seq"}, {})
    assert spec.to_torch_export()[1] is None
    fixed = normalize(({0: Dim("batch", min=2, max=2)},), (IDS,))
    assert not fixed.dynamic and fixed.fixed == ({0: 2},)
    assert fixed.export_inputs((IDS,))[0].shape == (2, 32)
    assert fixed.input_shapes((IDS,), ["x"]) == [InputShape("x", (2, 32))]


def test_torch_export_dims_are_accepted():
    spec = normalize(({0: torch.export.Dim("batch", min=1, max=64)},), (IDS,))
    assert spec.dims == {"batch": Dim("batch", 1, 4, 64)}
    with pytest.raises(ValueError, match="no finite max"):
        normalize(({0: torch.export.Dim("batch")},), (IDS,))
    with pytest.raises(ValueError, match="kiln needs a range"):
        normalize(({0: torch.export.Dim.AUTO},), (IDS,))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (({0: BATCH},), "2 example input"),
        ({"ids": {0: BATCH}}, "names argument 'ids'"),
        ([{3: BATCH}, None], "not an axis of a rank-2"),
        ([{0: BATCH, -2: BATCH}, None], "gives axis 0 twice"),
        ([[BATCH], None], "lists 1 axes"),
        ([{0: BATCH}, {0: Dim("batch", min=2, max=64)}], "two different Dims are named 'batch'"),
        ([{0: Dim("batch", min=5, max=64)}, None], "outside kiln.Dim"),
        ([{0: "batch"}, None], "kiln needs a range"),
        ([BATCH, None], "must be None"),
        ("batch", "must be a tuple"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        normalize(spec, (IDS, MASK), ["input_ids", "attention_mask"])


def test_examples_must_agree_on_a_dim_without_opt():
    with pytest.raises(ValueError, match="seq is 16 at input 1 axis 1 but 32 at input 0 axis 1"):
        normalize(({1: SEQ}, {1: SEQ}), (IDS, MASK[:, :16]))
    spec = normalize(({1: SEQ.with_opt(64)}, {1: SEQ.with_opt(64)}), (IDS, MASK[:, :16]))
    assert [x.shape for x in spec.export_inputs((IDS, MASK[:, :16]))] == [(4, 64), (4, 64)]


def test_export_size_avoids_zero_one_specialization():
    spec = normalize(({0: Dim("batch", min=1, opt=1, max=64)},), (IDS,))
    assert spec.export_size("batch") == 2
    assert spec.export_inputs((IDS,))[0].shape == (2, 32)
    assert spec.opt_binding() == {"batch": 1}
    assert normalize(({0: BATCH},), (IDS,)).export_size("batch") == 8


def test_resize_cycles_and_truncates_values():
    x = torch.tensor([[1, 2, 3]])
    assert resize(x, 1, 7).tolist() == [[1, 2, 3, 1, 2, 3, 1]]
    assert resize(x, 1, 2).tolist() == [[1, 2]]
    assert resize(x, 0, 3).tolist() == [[1, 2, 3]] * 3
    assert resize(x, 1, 3) is x


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(y.mean((2, 3)))


def export(model: torch.nn.Module, spec: DynamicSpec, inputs: tuple[torch.Tensor, ...]):
    return torch.export.export(model, spec.export_inputs(inputs), dynamic_shapes=spec.to_torch_export())


@pytest.mark.parametrize("opt", [1, 8])
def test_min_one_exports_and_runs_at_one(opt):
    """torch.export is told the range starts at 1 and traced at a size >= 2; the program then
    runs at 1, at opt and at max (the graph is shape-generic here)."""
    model = ConvNet().eval()
    spec = normalize(({0: Dim("batch", min=1, opt=opt, max=16)},), (torch.randn(3, 3, 8, 8),))
    program = export(model, spec, (torch.randn(3, 3, 8, 8),))
    (placeholder,) = [n for n in program.graph.nodes if n.op == "placeholder" and n.name == "x"]
    names = spec.symbol_names([placeholder.meta["val"]])
    assert list(names.values()) == ["batch"]
    out = next(n for n in program.graph.nodes if n.op == "output").args[0][0]
    assert [spec.expr(d, names) for d in out.meta["val"].shape] == ["batch", 5]
    for n in (1, opt, 16):
        x = torch.randn(n, 3, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x))


def test_shared_dim_binds_from_either_input():
    spec = normalize(({0: BATCH}, {0: BATCH}), (IDS, MASK))
    program = export(TwoInputs(), spec, (IDS, MASK))
    vals = [n.meta["val"] for n in program.graph.nodes if n.op == "placeholder"]
    names = spec.symbol_names(vals)
    assert set(names.values()) == {"batch"} and len(names) == 1
    shapes = spec.input_shapes((IDS, MASK), ["input_ids", "attention_mask"])
    assert bind([(5, 32), (5, 32)], shapes, spec.dims) == {"batch": 5}


def test_size_one_branch_is_silently_specialized():
    """Why a build must check a dynamic engine at min=1: torch.export traces at a size >= 2 and
    assumes the size is never 1 where the model branches on it, without an error."""

    class Branchy(torch.nn.Module):
        def forward(self, x):
            return x * 2 if x.shape[0] == 1 else x + 1

    spec = normalize(({0: Dim("batch", min=1, opt=4, max=8)},), (torch.randn(4, 3),))
    program = export(Branchy(), spec, (torch.randn(4, 3),))
    x = torch.full((1, 3), 3.0)
    assert not torch.equal(program.module()(x), Branchy()(x))  # the hazard: wrong at 1, silently
    x = torch.full((3, 3), 3.0)
    assert torch.equal(program.module()(x), Branchy()(x))


def test_a_dim_forced_to_a_value_is_reported():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x.view(4, -1)

    spec = normalize(({0: Dim("batch", min=1, max=8)},), (torch.randn(4, 3),))
    with pytest.raises(Exception) as info:
        export(Fixed(), spec, (torch.randn(4, 3),))
    lines = constraint_lines(info.value)
    assert lines[0].startswith("- You marked batch as dynamic but your code specialized it to be a constant (4)")


def test_constraint_lines_name_the_failing_range():
    class Guarded(torch.nn.Module):
        def forward(self, x):
            return x.sum() if x.shape[0] > 16 else x.mean()

    spec = normalize(({0: Dim("batch", min=2, opt=4, max=32)},), (torch.randn(4, 3),))
    with pytest.raises(Exception) as info:
        export(Guarded(), spec, (torch.randn(4, 3),))
    lines = constraint_lines(info.value)
    assert lines and all(line.startswith("- ") for line in lines)
    assert any(line.startswith("- Not all values of batch") and "batch <= 32" in line for line in lines)
    assert "- torch.export suggests: batch = Dim('batch', max=16)" in lines


def test_symbol_names_refuses_a_fixed_axis():
    spec = normalize(({0: BATCH},), (IDS,))
    with pytest.raises(ShapeExprError, match="not as a free size"):
        spec.symbol_names([torch.empty(8, 32)])


def test_size_arg_builds_sizes_from_the_inputs():
    """A pass that needs a symbolic size in a new node's arguments gets graph nodes for it,
    and the graph then runs at any size."""
    from kiln.dims import size_arg

    class Relu(torch.nn.Module):
        def forward(self, x):
            return x.relu()

    x = torch.randn(4, 6, 8)
    spec = normalize(({0: Dim("batch", max=16), 1: Dim("seq", min=2, max=32)},), (x,))
    program = export(Relu(), spec, (x,))
    gm = program.graph_module  # flat inputs and outputs
    g = gm.graph
    relu = next(n for n in g.nodes if n.target == torch.ops.aten.relu.default)
    out = next(n for n in g.nodes if n.op == "output")
    b, s, _ = relu.meta["val"].shape
    rows = size_arg(g, b * s * 8 // 2, out)
    assert size_arg(g, 7, out) == 7
    with g.inserting_before(out):
        view = g.call_function(torch.ops.aten.view.default, (relu, [rows, 2]))
        wide = g.call_function(torch.ops.aten.view.default, (relu, [size_arg(g, b, out), -1]))
    out.args = ((view, wide),)
    gm.recompile()
    assert sum(n.target == torch.ops.aten.sym_size.int for n in g.nodes) == 2  # one per axis, reused
    for n, m in ((1, 2), (3, 17), (16, 32)):
        y = torch.randn(n, m, 8)
        flat, per_row = gm(y)
        torch.testing.assert_close(flat, y.relu().reshape(-1, 2))
        torch.testing.assert_close(per_row, y.relu().reshape(n, -1))
