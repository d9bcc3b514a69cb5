"""The closed vocabulary at load (kiln.runtime.validate): a crafted plan cannot run anything but
side-effect-free compute, and every violation is an EngineFileError naming the step and the rule.

Each crafted file is written by kiln's own writer, so its digest is right: only validation
stands between the edit and the runtime."""

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

import kiln
from engine_files import make_canaries, rewrite, tiny_conv_net, writes_confined_to
from kiln.kernels import KERNELS, resolve_op
from kiln.runtime import validate
from kiln.runtime.validate import ALLOWED_OPS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, inputs = tiny_conv_net()
    engine = kiln.build(model, inputs, device="cpu")
    path = tmp_path_factory.mktemp("tiny") / "tiny.kiln"
    engine.save(path)
    return path, inputs, engine(*inputs)


def _steps(header):
    return header["plan"]["steps"]


def _step(header, op):
    return next((i, s) for i, s in enumerate(_steps(header)) if s["op"] == op)


def _refused(path, *patterns):
    with pytest.raises(kiln.EngineFileError) as info:
        kiln.load(path)
    message = str(info.value)
    for pattern in patterns:
        assert pattern in message, f"{pattern!r} not in {message!r}"
    return message


# -- the table itself --------------------------------------------------------------------------------


def test_every_allowed_aten_op_is_a_functional_overload_of_this_torch():
    for name in sorted(n for n in ALLOWED_OPS if n.startswith("aten.")):
        op = resolve_op(name)  # exists in this torch
        schema = op._schema
        assert not name.split(".")[1].endswith("_"), f"{name} is an in-place op"
        assert not any(a.is_out for a in schema.arguments), f"{name} is an out= overload"
        assert not any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments), name
        assert not any("Generator" in str(a.real_type) for a in schema.arguments), f"{name} takes a Generator"
        if torch.Tag.nondeterministic_seeded in op.tags:
            assert name in validate.OP_RULES, f"{name} draws random numbers and has no rule forbidding it"


def test_dangerous_ops_are_not_allowed():
    dangerous = [
        "aten.from_file.default", "aten.copy_.default", "aten.add.out", "aten.set_.source_Storage",
        "aten.resize_.default", "aten.rand.default", "aten.randn.default", "aten.bernoulli.p",
        "aten.native_dropout.default", "aten.empty.memory_format", "aten.empty_strided.default",
        "aten._native_batch_norm_legit.default", "aten._print.default", "aten.fill_.Scalar",
        "aten.index_put_.default", "aten.normal.Tensor_float", "aten.uniform_.default", "aten._assert_async.msg",
    ]
    assert not set(dangerous) & ALLOWED_OPS


def test_every_kiln_op_has_been_reviewed():
    """Every kiln:: op kiln's own modules define (imported in a fresh process, so ops that tests
    register do not count) is either allowed in plans or explicitly reviewed and refused."""
    import subprocess
    import sys

    script = (
        "import importlib, pkgutil, torch, kiln\n"
        "for m in pkgutil.walk_packages(kiln.__path__, 'kiln.'):\n"
        "    if m.name.endswith('__main__'):\n"
        "        continue\n"
        "    try:\n"
        "        importlib.import_module(m.name)\n"
        "    except (Exception, SystemExit):\n"
        "        pass\n"
        "print('\\n'.join(n for n in torch._C._dispatch_get_all_op_names() if n.startswith('kiln::')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    names = set(out.stdout.split())
    assert {"kiln::conv_bias_act", "kiln::pointwise"} <= names, "kiln's ops were not found: the test proves nothing"
    for qualified in sorted(names):
        base, _, overload = qualified.removeprefix("kiln::").partition(".")
        name = f"kiln.{base}.{overload or 'default'}"
        assert name in ALLOWED_OPS or name in validate.REVIEWED_NOT_ALLOWED, (
            f"{name} is a kiln op no one has reviewed for engine files: review it and add it to "
            "kiln.runtime.validate.ALLOWED_OPS (or REVIEWED_NOT_ALLOWED)"
        )


# -- representative models: the allowlist covers everything the builder emits -----------------------


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0), 2)
        self.head = nn.Linear(32, 5)

    def forward(self, ids):
        return self.head(self.enc(self.emb(ids))).softmax(-1)


class PointwiseChain(nn.Module):
    """Elementwise chains kiln fuses into kiln::pointwise programs, around a conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x, y):
        h = self.conv(x)
        gate = torch.sigmoid(h.mean((2, 3), keepdim=True))
        z = (h * gate + y).clamp(-2, 2) * 0.5 - torch.tanh(y) / (1 + y.abs())
        return z, torch.cat([z.exp(), z.amax(1, keepdim=True)], 1)


class GrabBag(nn.Module):
    """Many ATen ops the core decompositions keep: indexing, sorting, pooling, norms, resampling."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.gn = nn.GroupNorm(2, 8)
        self.ln = nn.LayerNorm(8)

    def forward(self, idx, x):
        e = self.ln(self.emb(idx))
        c = torch.cumsum(torch.softmax(e, -1) + torch.log_softmax(e, -1), 1)
        v, i = torch.topk(c, 2, dim=-1)
        img = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        up = torch.nn.functional.interpolate(img, scale_factor=2, mode="bilinear", align_corners=False)
        pooled = torch.nn.functional.max_pool2d(self.gn(up), 2) + torch.nn.functional.avg_pool2d(up[:, :8], 2)
        return (v, torch.gather(c, 2, i), torch.sort(c, -1).values, torch.flip(c, [1]), c.argmax(-1),
                pooled.amax((2, 3)), torch.where(c > 0.5, c, -c).var(-1), x.repeat(1, 2, 1, 1)[:, ::2])


class BatchStatistics(nn.Module):
    """Normalization over the input's own statistics, not running ones: instance norm and
    F.batch_norm without running stats export as aten._native_batch_norm_legit.no_stats."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.InstanceNorm2d(4, affine=True)

    def forward(self, x):
        y = self.norm(self.conv(x))
        return torch.nn.functional.batch_norm(y, None, None, training=True)


class SliceUpdate(nn.Module):
    """An in-place add into a slice (MViT's relative positions): functionalized, slice_scatter
    and copy return tensors with their input's strides, gaps included ([.., 5, 6] at stride 6·6)."""

    def __init__(self):
        super().__init__()
        self.rel = nn.Parameter(torch.randn(5, 5))

    def forward(self, q, k):
        attn = q @ k.transpose(-2, -1)
        attn[:, :, 1:, 1:] += self.rel
        return attn.softmax(-1)


def _zoo(name, shape=None):
    from kiln import zoo

    entry = zoo.create(name, input_shape=shape)
    return entry.model, entry.example_inputs


REPRESENTATIVE = {
    "tiny_conv_net": tiny_conv_net,
    "tiny_transformer": lambda: (TinyTransformer().eval(), (torch.randint(0, 50, (2, 6)),)),
    "pointwise_fusion": lambda: (PointwiseChain().eval(), (torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8))),
    "grab_bag": lambda: (GrabBag().eval(), (torch.randint(0, 20, (2, 5)), torch.randn(1, 8, 6, 6))),
    "batch_statistics": lambda: (BatchStatistics().eval(), (torch.randn(2, 3, 8, 8),)),
    "slice_update": lambda: (SliceUpdate().eval(), (torch.randn(2, 2, 6, 4), torch.randn(2, 2, 6, 4))),
    "resnet18": lambda: _zoo("resnet18", (3, 64, 64)),
    "bert-tiny": lambda: _zoo("bert-tiny"),
}


@pytest.mark.parametrize("name", sorted(REPRESENTATIVE))
def test_every_op_a_build_emits_is_allowed_and_loads(name, tmp_path):
    model, inputs = REPRESENTATIVE[name]()
    engine = kiln.build(model, inputs, device="cpu")
    ops = {s["op"] for s in engine.plan["steps"]}
    assert ops, "an empty plan proves nothing"
    assert ops <= ALLOWED_OPS, f"{name}: ops the builder emits but the loader refuses: {sorted(ops - ALLOWED_OPS)}"
    if name == "pointwise_fusion":
        assert "kiln.pointwise.default" in ops, "the pointwise case must actually fuse"
    path = tmp_path / "m.kiln"
    engine.save(path)
    loaded = kiln.load(path)
    for got, want in zip(torch.utils._pytree.tree_leaves(loaded(*inputs)),
                         torch.utils._pytree.tree_leaves(engine(*inputs))):
        assert torch.equal(got, want)


def test_normalization_over_batch_statistics_saves_loads_and_matches_eager(tmp_path):
    model, inputs = REPRESENTATIVE["batch_statistics"]()
    engine = kiln.build(model, inputs, device="cpu")
    assert "aten._native_batch_norm_legit.no_stats" in {s["op"] for s in engine.plan["steps"]}
    engine.save(tmp_path / "m.kiln")
    with torch.no_grad():
        expected = model(*inputs)
    torch.testing.assert_close(kiln.load(tmp_path / "m.kiln")(*inputs), expected, rtol=1e-5, atol=1e-5)


# -- crafted plans ---------------------------------------------------------------------------------------


def test_file_reading_op_is_refused_and_touches_nothing(tiny, tmp_path, tmp_path_factory):
    path, inputs, _ = tiny
    canaries = make_canaries(tmp_path_factory.mktemp("canary"))
    victim = canaries / "victim.py"

    def change(h):
        _steps(h)[0].update(op="aten.from_file.default", kernel="aten", out_variant=None,
                    args=[str(victim), True, 64], kwargs={"dtype": {"dtype": "uint8"}})

    bad = rewrite(path, tmp_path / "from_file.kiln", change)
    with writes_confined_to(tmp_path, [canaries]):
        message = _refused(bad, "aten.from_file.default", "closed vocabulary", "step 0")
    assert "(" in message.split("step 0", 1)[1][:3], "the error names the step's name too"


def test_in_place_write_into_a_weight_is_refused(tiny, tmp_path):
    path, _, _ = tiny

    def change(h):
        step = _steps(h)[-1]
        weight = next(a for a in json.loads(json.dumps(step["args"])) if isinstance(a, dict) and "weight" in a)
        step.update(op="aten.copy_.default", args=[weight, {"slot": 0}], kwargs={}, out_variant=None)

    _refused(rewrite(path, tmp_path / "copy.kiln", change), "aten.copy_.default", "closed vocabulary")


def test_out_overload_as_a_step_op_is_refused(tiny, tmp_path):
    path, _, _ = tiny

    def change(h):
        _steps(h)[0].update(op="aten.add.out", kernel="aten")

    _refused(rewrite(path, tmp_path / "out.kiln", change), "aten.add.out", "closed vocabulary")


@pytest.mark.parametrize("op", ["aten.rand.default", "aten.empty.memory_format", "aten.native_dropout.default",
                                "torch.ops.aten.relu", "builtins.eval", "os.system.default", 42])
def test_ops_outside_the_vocabulary_are_refused(tiny, tmp_path, op):
    path, _, _ = tiny
    _refused(rewrite(path, tmp_path / "op.kiln", lambda h: _steps(h)[0].update(op=op)), "closed vocabulary")


def test_validation_runs_before_any_kernel_is_made(tiny, tmp_path, monkeypatch):
    """The aten kernel resolves whatever op it is given: it must never see a refused one."""
    path, _, _ = tiny
    made = []
    for name, kernel in list(KERNELS.items()):
        def spy(op, out, _make=kernel.make):
            made.append(op)
            return _make(op, out)
        monkeypatch.setitem(KERNELS, name, dataclasses.replace(kernel, make=spy))
    bad = rewrite(path, tmp_path / "rand.kiln",
                  lambda h: _steps(h)[-1].update(op="aten.rand.default", args=[[4]], kwargs={}, out_variant=None))
    _refused(bad, "aten.rand.default")
    assert made == [], f"kernels were made before validation refused the file: {made}"


def test_kernel_must_implement_the_op(tiny, tmp_path):
    path, _, _ = tiny
    i, step = next((i, s) for i, s in enumerate(_steps(kiln.runtime.engine_file.read(path)[0])) if
                   s["op"].startswith("kiln."))
    _refused(rewrite(path, tmp_path / "k.kiln", lambda h: _steps(h)[i].update(kernel="aten")),
             f"step {i}", "does not implement")
    _refused(rewrite(path, tmp_path / "k2.kiln", lambda h: _steps(h)[i].update(kernel="no.such.kernel")),
             "not in this kiln's kernel catalog")


def test_out_variant_must_be_the_ops_own(tiny, tmp_path):
    path, _, _ = tiny
    header = kiln.runtime.engine_file.read(path)[0]
    i, step = next((i, s) for i, s in enumerate(_steps(header)) if s["out_variant"])
    for out, pattern in [({"op": "aten.mul.out", "out_args": ["out"]}, "not an overload"),
                         ({"op": step["out_variant"]["op"], "out_args": ["self"]}, "out_args"),
                         ({"op": "aten.copy_.default", "out_args": ["out"]}, "not an overload")]:
        bad = rewrite(path, tmp_path / "ov.kiln", lambda h, out=out: _steps(h)[i].update(out_variant=out))
        _refused(bad, f"step {i}", pattern)


@pytest.mark.parametrize("edit, pattern", [
    (lambda s: s["args"].__setitem__(0, {"slot": 10**6}), "must be an integer in"),
    (lambda s: s["args"].__setitem__(0, {"slot": -1}), "must be an integer in"),
    (lambda s: s["args"].__setitem__(0, {"weight": "nope"}), "does not hold"),
    (lambda s: s["args"].__setitem__(0, "a string"), "tensor reference"),
    (lambda s: s["args"].__setitem__(0, {"slot": 0, "weight": "x"}), "tensor reference"),
    (lambda s: s["args"].append(1), "positional arguments"),
    (lambda s: s["kwargs"].update(out={"slot": 0}), "has no argument 'out'"),
    (lambda s: s["args"].__setitem__(0, [[[[1]]]]), "tensor reference"),
    (lambda s: s.update(outputs=[0]), "a graph input"),
    (lambda s: s.update(multi="yes"), "multi"),
    (lambda s: s.update(name="\x1b[2Jowned"), "control characters"),
    (lambda s: s.update(source="x" * 100_000), "longer than"),
])
def test_malformed_step_fields_are_refused(tiny, tmp_path, edit, pattern):
    path, _, _ = tiny
    _refused(rewrite(path, tmp_path / "s.kiln", lambda h: edit(_steps(h)[-1])), pattern)


def test_reading_a_slot_before_it_is_written_is_refused(tiny, tmp_path):
    path, _, _ = tiny
    header = kiln.runtime.engine_file.read(path)[0]
    last_slot = _steps(header)[-1]["outputs"][0]
    _refused(rewrite(path, tmp_path / "early.kiln",
                     lambda h: _steps(h)[0]["args"].__setitem__(0, {"slot": last_slot})),
             "step 0", "before any step writes it")


@pytest.mark.parametrize("edit, pattern", [
    (lambda p: p["memory"].update(arena_bytes=8 << 30), "larger than its slots need"),
    (lambda p: p["memory"].update(arena_bytes=1 << 40), "arena_bytes must be an integer"),
    (lambda p: p["memory"].update(arena_bytes=-1), "arena_bytes"),
    (lambda p: p["slots"][-1].update(shape=[1 << 20, 1 << 20, 1 << 10], stride=[1 << 30, 1 << 10, 1]), "limit"),
    (lambda p: p["slots"][-1].update(shape=[2**70]), "must be an integer"),
    (lambda p: p["slots"][-1].update(dtype="float128"), "dtype"),
    (lambda p: p["inputs"][0].update(shape=[1 << 40, 1 << 40]), "limit"),
    (lambda p: p["slots"][0].update(kind="heap"), "graph input"),
    (lambda p: p["last_use"].__setitem__(p["output_refs"][0]["slot"], 0), "frees output slot"),
    (lambda p: p["output_refs"].__setitem__(0, {"slot": 0}), "shape"),
    (lambda p: p.update(structure={"leaf": 7}), "structure"),
    (lambda p: p.update(structure={"tuple": [{"leaf": 0}, {"leaf": 0}]}), "structure"),
    (lambda p: p.update(output_refs=[]), "output_refs"),
])
def test_malformed_plan_fields_are_refused(tiny, tmp_path, edit, pattern):
    path, _, _ = tiny
    _refused(rewrite(path, tmp_path / "p.kiln", lambda h: edit(h["plan"])), pattern)


class ScattersIntoAStridedSlice(nn.Module):
    """slice_scatter into a slice of a wider tensor (Funnel's relative-position shift): the CPU
    kernel allocates its result with its input's strides, gaps included."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x * 2.0
        return torch.slice_scatter(wide[..., :7], x[..., :3] + 1.0, 3, 0, 3) * 3.0


def test_a_heap_slot_with_gaps_saves_loads_and_runs(tmp_path):
    """A kernel's own result may leave gaps (a heap slot), but never overlap itself; the engine
    saves, loads and matches eager exactly (fp32, the same ATen ops)."""
    model, x = ScattersIntoAStridedSlice().eval(), torch.randn(2, 3, 4, 8)
    engine = kiln.build(model, (x,), device="cpu")
    gapped = [i for i, s in enumerate(engine.plan["slots"])
              if s["kind"] == "heap" and validate._span(s["shape"], s["stride"]) > math.prod(s["shape"])]
    assert gapped, "the test needs a heap slot with gaps"
    path = tmp_path / "gaps.kiln"
    engine.save(path)
    torch.testing.assert_close(kiln.load(path)(x), model(x), rtol=0, atol=0)
    # gaps the op does not leave are refused (a file could otherwise declare any span)
    wider = lambda h: h["plan"]["slots"][gapped[0]]["stride"].__setitem__(0, 10**6)  # noqa: E731
    _refused(rewrite(path, tmp_path / "wider.kiln", wider), f"slot {gapped[0]}: a heap slot spans")

    def one_more(header):  # still within the plan's largest tensor, but not the op's own layout
        header["plan"]["slots"][gapped[0]]["stride"][0] += 1

    _refused(rewrite(path, tmp_path / "one_more.kiln", one_more), f"heap slot {gapped[0]} declares stride")


@pytest.mark.parametrize("shape, stride, overlaps", [
    ((2, 2, 16, 31), (512, 1024, 31, 1), False),  # gaps
    ((4, 3), (3, 1), False),
    ((4, 3), (2, 1), True),
    ((4, 3), (0, 1), True),  # expanded
    ((1, 3), (0, 1), False),
])
def test_overlap_check(shape, stride, overlaps):
    assert validate._overlaps(shape, stride) is overlaps


def test_planned_slot_outside_the_arena_is_refused(tiny, tmp_path):
    path, _, _ = tiny
    header = kiln.runtime.engine_file.read(path)[0]
    slot = next(i for i, s in enumerate(header["plan"]["slots"]) if s["kind"] == "buffer")
    arena = header["plan"]["memory"]["arena_bytes"]
    _refused(rewrite(path, tmp_path / "off.kiln", lambda h: h["plan"]["slots"][slot].update(offset=arena)),
             "arena")
    _refused(rewrite(path, tmp_path / "misaligned.kiln", lambda h: h["plan"]["slots"][slot].update(offset=1)),
             "not aligned")
    _refused(rewrite(path, tmp_path / "short.kiln", lambda h: h["plan"]["slots"][slot].update(nbytes=4)),
             "more than its nbytes")


def test_heap_slots_may_leave_gaps_but_never_overlap(tmp_path):
    model, inputs = REPRESENTATIVE["slice_update"]()
    engine = kiln.build(model, inputs, device="cpu")
    engine.save(tmp_path / "gaps.kiln")
    with torch.no_grad():
        expected = model(*inputs)
    torch.testing.assert_close(kiln.load(tmp_path / "gaps.kiln")(*inputs), expected, rtol=1e-5, atol=1e-6)
    header = kiln.runtime.engine_file.read(tmp_path / "gaps.kiln")[0]
    slot = next(i for i, s in enumerate(header["plan"]["slots"]) if s["kind"] == "heap" and s["shape"][-1] == 6)
    _refused(rewrite(tmp_path / "gaps.kiln", tmp_path / "overlap.kiln",
                     lambda h: h["plan"]["slots"][slot].update(stride=[72, 36, 1, 1])), "heap slot", "overlaps")


def test_constant_that_changes_a_shape_is_caught_on_the_meta_device(tiny, tmp_path):
    """A conv stride edited from 1 to 2: the op's result no longer fits the slot the plan declares."""
    path, _, _ = tiny
    header = kiln.runtime.engine_file.read(path)[0]
    i, step = next((i, s) for i, s in enumerate(_steps(header)) if s["op"] == "kiln.conv_bias_act.default")
    assert step["args"][3] == [1, 1]
    _refused(rewrite(path, tmp_path / "stride.kiln", lambda h: _steps(h)[i]["args"].__setitem__(3, [2, 2])),
             f"step {i}", "declares")


def test_unknown_activation_is_refused(tiny, tmp_path):
    path, _, _ = tiny
    header = kiln.runtime.engine_file.read(path)[0]
    i, _ = next((i, s) for i, s in enumerate(_steps(header)) if s["op"] == "kiln.conv_bias_act.default")
    _refused(rewrite(path, tmp_path / "act.kiln", lambda h: _steps(h)[i]["args"].__setitem__(7, "__import__")),
             "unknown activation")


def test_build_info_is_checked(tiny, tmp_path):
    path, _, _ = tiny
    _refused(rewrite(path, tmp_path / "b.kiln", lambda h: h["build"].update(device_type="tpu")), "device_type")
    _refused(rewrite(path, tmp_path / "b2.kiln", lambda h: h["build"].pop("precision")), "precision")
    _refused(rewrite(path, tmp_path / "b3.kiln", lambda h: h.pop("plan")), "no 'plan'")


def test_deeply_nested_header_is_refused(tiny, tmp_path):
    path, _, _ = tiny
    deep = nested = []
    for _ in range(200):
        nested.append([])
        nested = nested[0]
    _refused(rewrite(path, tmp_path / "deep.kiln", lambda h: h["build"].update(extra=deep)), "deeper than")


@pytest.fixture(scope="module")
def transformer(tmp_path_factory):
    model, inputs = TinyTransformer().eval(), (torch.randint(0, 50, (2, 6)),)
    path = tmp_path_factory.mktemp("tr") / "tr.kiln"
    kiln.build(model, inputs, device="cpu").save(path)
    return path


def test_attention_with_dropout_is_refused(transformer, tmp_path):
    header = kiln.runtime.engine_file.read(transformer)[0]
    i, step = next((i, s) for i, s in enumerate(_steps(header)) if "scaled_dot_product" in s["op"])

    def change(h):
        step = _steps(h)[i]
        if "dropout_p" in step["kwargs"] or len(step["args"]) < 4:
            step["kwargs"]["dropout_p"] = 0.5
        else:
            step["args"].extend([None] * (5 - len(step["args"])))
            step["args"][4] = 0.5

    _refused(rewrite(transformer, tmp_path / "dropout.kiln", change), f"step {i}", "dropout_p must be 0")


def test_invalid_pointwise_program_is_refused(tmp_path):
    model, inputs = PointwiseChain().eval(), (torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8))
    path = tmp_path / "pw.kiln"
    kiln.build(model, inputs, device="cpu").save(path)
    header = kiln.runtime.engine_file.read(path)[0]
    i, step = _step(header, "kiln.pointwise.default")
    program = json.loads(step["args"][1])
    program["body"][0][0] = "system"
    _refused(rewrite(path, tmp_path / "bad.kiln", lambda h: _steps(h)[i]["args"].__setitem__(1, json.dumps(program))),
             f"step {i}", "invalid pointwise program")


class RMSNorm(nn.Module):
    """An RMS norm written out in ops: fuse_rowwise makes it one kiln::rowwise step."""

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_invalid_rowwise_program_is_refused(tmp_path):
    path = tmp_path / "rw.kiln"
    kiln.build(RMSNorm().eval(), (torch.randn(2, 8, 16),), device="cpu").save(path)
    header = kiln.runtime.engine_file.read(path)[0]
    i, step = _step(header, "kiln.rowwise.default")
    _refused(rewrite(path, tmp_path / "bad.kiln", lambda h: _steps(h)[i]["args"].__setitem__(1, '{"not": 1}')),
             f"step {i}", "invalid rowwise program")


def test_saving_refuses_a_plan_the_loader_would_refuse(tiny, tmp_path):
    path, inputs, _ = tiny
    engine = kiln.load(path)
    engine.header["plan"]["steps"][0]["op"] = "aten.from_file.default"
    with pytest.raises(kiln.EngineFileError, match="closed vocabulary"):
        engine.save(tmp_path / "never.kiln")
    assert not (tmp_path / "never.kiln").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["tiny_transformer", "pointwise_fusion", "resnet18", "bert-tiny"])
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_cuda_plans_validate_and_reload_identically(name, precision, tmp_path):
    """On CUDA, plans hold backend ops (attention variants), Triton/cuBLASLt/cuDNN kernels and
    concatenations done in place: all must pass validation, including each kernel's supports()."""
    model, inputs = REPRESENTATIVE[name]()
    inputs = tuple(x.cuda() for x in inputs)
    engine = kiln.build(model.cuda(), inputs, precision=precision, device="cuda")
    ops = {s["op"] for s in engine.plan["steps"]}
    assert ops <= ALLOWED_OPS, f"{name}: ops the builder emits but the loader refuses: {sorted(ops - ALLOWED_OPS)}"
    path = tmp_path / "m.kiln"
    engine.save(path)
    loaded = kiln.load(path)
    for got, want in zip(torch.utils._pytree.tree_leaves(loaded(*inputs)),
                         torch.utils._pytree.tree_leaves(engine(*inputs))):
        assert torch.equal(got, want)
