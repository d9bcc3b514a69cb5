"""Each pass on a tiny graph: the graph changes as intended and outputs do not."""

import pytest
import torch
from torch import nn

import kiln
from kiln.capture.export import capture
from kiln.passes import PASSES, copy_graph, count_ops, default_passes, run_passes


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 4)

    def forward(self, x):
        return self.used(x).relu()


def with_dead_code(graph):
    """Plant an unused op and an unused weight (export already drops the model's own)."""
    g = graph.module.graph
    x = next(n for n in g.nodes if n.op == "placeholder")
    with g.inserting_after(x):
        g.call_function(torch.ops.aten.sigmoid.default, (x,))
    graph.module.register_buffer("unused_weight", torch.zeros(3))
    with g.inserting_after(x):
        g.get_attr("unused_weight")
    graph.module.recompile()
    return graph


def _ops(graph):
    return [str(n.target) for n in graph.module.graph.nodes if n.op == "call_function"]


def test_dead_code_removes_unused_ops_and_weights():
    x = torch.randn(2, 4)
    before = with_dead_code(capture(Tiny().eval(), (x,), device=torch.device("cpu")))
    after, _ = run_passes(before, ["dead_code"])
    assert "aten.sigmoid.default" in _ops(before) and "aten.sigmoid.default" not in _ops(after)
    assert count_ops(after) == count_ops(before) - 1
    assert "unused_weight" not in dict(after.module.named_buffers())
    torch.testing.assert_close(after.run(x), before.run(x))


def test_dead_code_bypasses_identities_and_eval_dropout():
    class Identities(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.drop = nn.Dropout(0.1)

        def forward(self, x):
            y = self.drop(self.fc(x)).clone()  # on CUDA, eval dropout exports as a clone too
            y = y.reshape(2, 3, 6)[:, 0:3].permute(0, 1, 2)  # a same-shape view, a whole slice, no permutation
            return y.sum(-1), y.transpose(1, 2).contiguous()  # this copy changes the layout: it stays

    x = torch.randn(6, 6)
    before = _capture(Identities(), x)
    after, _ = run_passes(before, ["dead_code"])
    kept = _ops(after)
    assert "aten.alias.default" in _ops(before) and "aten.alias.default" not in kept
    assert kept.count("aten.permute.default") < _ops(before).count("aten.permute.default")
    assert _ops(before).count("aten.clone.default") == 2 and kept.count("aten.clone.default") == 1
    for got, want in zip(after.run(x), before.run(x)):
        torch.testing.assert_close(got, want)


def test_dead_code_bypasses_a_padding_by_nothing():
    class Windows(nn.Module):
        def forward(self, x):  # Swin pads each stage to whole windows: by 0 where it already fits
            w = 4
            pad_h, pad_w = -x.shape[1] % w, -x.shape[2] % w
            return torch.nn.functional.pad(x, (0, 0, 0, pad_w, 0, pad_h)).relu(), torch.nn.functional.pad(x, (1, 0))

    x = torch.randn(2, 8, 8, 3)
    before = _capture(Windows(), x)
    after, _ = run_passes(before, ["dead_code"])
    assert _ops(before).count("aten.constant_pad_nd.default") == 2
    assert _ops(after).count("aten.constant_pad_nd.default") == 1, "a real padding stays"
    for got, want in zip(after.run(x), before.run(x)):
        torch.testing.assert_close(got, want)


def test_bypassed_clone_of_an_input_still_returns_fresh_memory():
    class Copies(nn.Module):
        def forward(self, x):
            return x.clone(), x * 2

    x = torch.randn(3, 4)
    engine = kiln.build(Copies().eval(), (x,), device="cpu")
    assert [s["op"] for s in engine.plan["steps"]] == ["aten.mul.Tensor"], "the clone is an identity"
    same, doubled = engine(x)
    assert torch.equal(same, x) and same.data_ptr() != x.data_ptr()
    torch.testing.assert_close(doubled, x * 2)


def test_run_passes_reports_op_counts_per_pass():
    x = torch.randn(2, 4)
    graph = with_dead_code(capture(Tiny().eval(), (x,), device=torch.device("cpu")))
    _, report = run_passes(graph)
    assert report[0]["pass"] == "capture" and [r["pass"] for r in report[1:]] == default_passes()
    assert set(default_passes()) < set(PASSES), "opt-in passes are registered but not run by default"
    assert report[-1]["ops"] < report[0]["ops"]


def test_unknown_pass_is_named():
    graph = capture(Tiny().eval(), (torch.randn(2, 4),), device=torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown pass.*nope"):
        run_passes(graph, ["nope"])


def _capture(model, *inputs, rewrites=None):
    return capture(model.eval(), inputs, device=torch.device("cpu"), rewrites=rewrites)


def test_constant_fold_computes_weight_only_ops_at_build():
    class ScaledLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 6))

        def forward(self, x):
            return x @ (self.w.t() * 0.5)  # transpose and scale of a weight: both foldable

    x = torch.randn(3, 4 * 1 + 2)
    before = _capture(ScaledLinear(), x)
    after, _ = run_passes(before, ["constant_fold"])
    assert {"aten.permute.default", "aten.mul.Tensor"} & set(_ops(before))
    assert not {"aten.permute.default", "aten.mul.Tensor"} & set(_ops(after))
    torch.testing.assert_close(after.run(x), before.run(x))


def test_constant_fold_folds_a_window_mask_but_not_a_huge_broadcast():
    class WindowBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.row = nn.Buffer(torch.arange(64.0).view(64, 1, 1))
            self.col = nn.Buffer(torch.arange(49.0).view(1, 1, 49))
            self.bias = nn.Parameter(torch.randn(1, 3, 49, 49))
            self.big = nn.Parameter(torch.randn(1, 1, 1024))

        def forward(self, x):
            # [64, 1, 49, 49]: a batch-independent shift mask (153,664 elements) plus a bias, as Swin's
            mask = torch.where(self.row.unsqueeze(1) == self.col.unsqueeze(1), 0.0, -100.0).expand(64, 1, 49, 49)
            scores = x + (mask + self.bias)
            return scores, self.big.expand(2048, 1, 1024)  # 2M elements from 1,024: stays a broadcast

    x = torch.randn(64, 3, 49, 49)
    before = _capture(WindowBias(), x)
    after, _ = run_passes(before, ["constant_fold"])
    assert "aten.where.self" in _ops(before) and "aten.where.self" not in _ops(after)
    assert _ops(after).count("aten.add.Tensor") == 1, "only the input-dependent add is left"
    assert "aten.expand.default" in _ops(after), "the huge expand is not materialized"
    for got, want in zip(after.run(x), before.run(x)):
        torch.testing.assert_close(got, want)


def test_constant_fold_folds_an_op_with_several_results_over_weights():
    """Weight standardization (timm's ScaledStdConv2d: F.batch_norm over the weight with batch
    statistics) exports as _native_batch_norm_legit.no_stats, three results read by getitem."""

    class StdConv(nn.Conv2d):
        def forward(self, x):
            w = torch.nn.functional.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                                               training=True, momentum=0.0, eps=1e-6).reshape_as(self.weight)
            return torch.nn.functional.conv2d(x, w, self.bias)

    x = torch.randn(2, 3, 8, 8)
    before = _capture(StdConv(3, 4, 3), x)
    after, _ = run_passes(before, ["constant_fold"])
    norm = "aten._native_batch_norm_legit.no_stats"
    assert norm in _ops(before) and norm not in _ops(after)
    assert _ops(after) == ["aten.convolution.default"]
    torch.testing.assert_close(after.run(x), before.run(x), rtol=1e-5, atol=1e-5)


def test_constant_fold_leaves_input_dependent_ops():
    x = torch.randn(2, 4)
    before = _capture(Tiny(), x)
    after, _ = run_passes(before, ["constant_fold"])
    assert "aten.addmm.default" in _ops(after) and "aten.relu.default" in _ops(after)


class ConvBN(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(8)
        self.pre = nn.BatchNorm2d(3)  # not after a conv: becomes scale + shift

    def forward(self, x):
        return torch.relu(self.bn(self.conv(self.pre(x))))


def _randomize_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("bias", [True, False])
def test_fold_batchnorm_into_conv_and_affine(bias):
    x = torch.randn(2, 3, 8, 8)
    before = _capture(_randomize_bn(ConvBN(bias)), x)
    after, _ = run_passes(before, ["fold_batchnorm"])
    bn = "aten._native_batch_norm_legit_no_training.default"
    assert _ops(before).count(bn) == 2 and bn not in _ops(after)
    assert "aten.mul.Tensor" in _ops(after) and "aten.add.Tensor" in _ops(after)
    torch.testing.assert_close(after.run(x), before.run(x), atol=1e-5, rtol=1e-5)


def test_fold_batchnorm_uses_fp32_masters_of_fp16_weights():
    model = _randomize_bn(ConvBN())
    graph = capture(model.eval(), (torch.randn(2, 3, 8, 8),), device=torch.device("cpu"), compute_dtype=torch.float16)
    assert graph.masters["conv_weight"].dtype == torch.float32
    after, _ = run_passes(graph, ["fold_batchnorm"])
    conv = next(n for n in after.module.graph.nodes if n.target == torch.ops.aten.convolution.default)
    folded = getattr(after.module, conv.args[1].target)
    scale = model.bn.weight / torch.sqrt(model.bn.running_var + model.bn.eps)
    exact = (model.conv.weight * scale.reshape(-1, 1, 1, 1)).detach()
    assert folded.dtype == torch.float16
    torch.testing.assert_close(folded, exact.half(), atol=0, rtol=0)


class ConvBlock(nn.Module):
    """conv → ReLU, conv + residual → ReLU, conv → SiLU, linear → GELU: every fusion pattern."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.c3 = nn.Conv2d(4, 6, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.relu(self.c2(h) + x)
        h = nn.functional.silu(self.c3(h))
        return nn.functional.gelu(self.fc(h.mean(dim=(2, 3))))


def test_fuse_conv_covers_bias_residual_and_activations():
    x = torch.randn(2, 4, 8, 8)
    before = _capture(ConvBlock(), x)
    after, _ = run_passes(before, ["fuse_conv"])
    fused = [n for n in after.module.graph.nodes if n.target == torch.ops.kiln.conv_bias_act.default]
    assert [n.args[7] for n in fused] == ["relu", "relu", "silu"]
    assert fused[1].args[8] is not None, "the residual add joins the second conv"
    assert "aten.convolution.default" not in _ops(after) and "aten.relu.default" not in _ops(after)
    torch.testing.assert_close(after.run(x), before.run(x), atol=1e-5, rtol=1e-5)


def test_fuse_conv_takes_silu_computed_in_fp32_between_casts():
    x = torch.randn(2, 4, 8, 8)
    before = capture(ConvBlock().eval(), (x,), device=torch.device("cpu"), compute_dtype=torch.float16)
    assert "aten._to_copy.default" in _ops(before), "fp16 SiLU exports as cast → x·sigmoid(x) → cast"
    after, _ = run_passes(before, ["fuse_conv"])
    fused = [n for n in after.module.graph.nodes if n.target == torch.ops.kiln.conv_bias_act.default]
    assert [n.args[7] for n in fused] == ["relu", "relu", "silu"]
    assert "aten.sigmoid.default" not in _ops(after)
    torch.testing.assert_close(after.run(x), before.run(x), atol=2e-3, rtol=2e-3)


def test_squeeze_excitation_gate_stays_for_the_pointwise_product():
    class SqueezeExcite(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            return y * torch.sigmoid(self.fc(y.mean((2, 3), keepdim=True)))

    x = torch.randn(2, 4, 6, 6)
    before = _capture(SqueezeExcite(), x)
    after, _ = run_passes(before, ["fuse_conv", "fuse_pointwise"])
    convs = [n for n in after.module.graph.nodes if n.target == torch.ops.kiln.conv_bias_act.default]
    assert [n.args[7] for n in convs] == ["relu", "none"], "the gate's sigmoid is not the convolution's"
    (gate,) = [n for n in after.module.graph.nodes if n.target == torch.ops.kiln.pointwise.default]
    assert '"sigmoid"' in gate.args[1] and '"mul"' in gate.args[1]
    torch.testing.assert_close(after.run(x), before.run(x), atol=1e-5, rtol=1e-5)


def test_fuse_linear_takes_the_activation():
    x = torch.randn(2, 4, 8, 8)
    before = _capture(ConvBlock(), x)
    after, _ = run_passes(before, ["constant_fold", "fuse_linear"])
    linear = [n for n in after.module.graph.nodes if n.target == torch.ops.kiln.linear_act.default]
    assert len(linear) == 1 and linear[0].args[3] == "gelu"
    assert "aten.gelu.default" not in _ops(after)
    torch.testing.assert_close(after.run(x), before.run(x), atol=1e-5, rtol=1e-5)


class PreNormBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2, self.fc = nn.LayerNorm(8), nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x, y):
        s = x + y
        return self.ln1(s) + self.fc(self.ln2(s + x))  # s is used after its layer norm too


def test_fuse_layer_norm_keeps_the_sum_for_later_users():
    x, y = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    before = _capture(PreNormBlock(), x, y)
    after, _ = run_passes(before, ["fuse_layer_norm"])
    assert "aten.native_layer_norm.default" not in _ops(after)
    assert _ops(after).count("kiln.add_layer_norm.default") == 2
    torch.testing.assert_close(after.run(x, y), before.run(x, y), atol=1e-5, rtol=1e-5)


def test_channels_last_converts_input_and_weights_once():
    from kiln.passes.channels_last import to_channels_last

    class Flattening(nn.Module):  # a view after the convs needs the reshape rewrite
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4 * 6 * 6, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).view(x.shape[0], -1))

    x = torch.randn(2, 3, 8, 8)
    before = _capture(Flattening(), x)
    after = to_channels_last(copy_graph(before))
    clones = [n for n in after.module.graph.nodes if n.target == torch.ops.aten.clone.default]
    assert len(clones) == 1 and clones[0].kwargs["memory_format"] == torch.channels_last
    conv = next(n for n in after.module.graph.nodes if n.target == torch.ops.aten.convolution.default)
    assert conv.meta["val"].is_contiguous(memory_format=torch.channels_last)
    assert "aten.view.default" not in _ops(after)
    torch.testing.assert_close(after.run(x), before.run(x), atol=1e-5, rtol=1e-5)
    cpu, _ = run_passes(before, ["channels_last"])
    assert "aten.clone.default" not in _ops(cpu), "CPU graphs keep their layout"


def test_batched_weight_matmul_becomes_one_gemm():
    class BatchFirstAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    x = torch.randn(3, 5, 16)
    before = _capture(BatchFirstAttention(), x, rewrites=[])  # the traced F.multi_head_attention_forward
    after, _ = run_passes(before, ["batched_weight_matmul"])
    assert "aten.bmm.default" in _ops(before) and "aten.bmm.default" not in _ops(after)
    assert "aten.addmm.default" in _ops(after), "the in-projection bias joins the GEMM"
    torch.testing.assert_close(after.run(x), before.run(x), atol=1e-5, rtol=1e-5)


def test_batched_weight_matmul_keeps_the_shape_of_a_linear_over_a_4d_permute():
    """A linear over the heads of [B, H, N, N] scores (CaiT's talking heads): Core ATen's bmm is
    [B·N, N, H] and its bias add is in the 4-D view [B, N, N, H]; the GEMM's result must come back
    in the add's shape, not the bmm's (it was [B·N, N, H], and the permute after it failed)."""

    class TalkingHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj_l = nn.Linear(4, 4)

        def forward(self, attn):
            return self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).softmax(-1)

    x = torch.randn(2, 4, 6, 6)
    before = _capture(TalkingHeads(), x)
    after, _ = run_passes(before, ["batched_weight_matmul"])
    assert "aten.bmm.default" in _ops(before) and "aten.addmm.default" in _ops(after)
    torch.testing.assert_close(after.run(x), before.run(x), atol=1e-6, rtol=1e-5)


def test_channels_last_skips_models_that_are_mostly_matmuls():
    from kiln.passes.channels_last import is_convolutional

    assert is_convolutional(_capture(ConvBlock(), torch.randn(2, 4, 8, 8)))

    class PatchThenLinears(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, 8, 4, stride=4)
            self.mlp = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))

        def forward(self, x):
            return self.mlp(self.patch(x).flatten(2).transpose(1, 2))

    graph, _ = run_passes(_capture(PatchThenLinears(), torch.randn(2, 3, 8, 8)), ["constant_fold", "fuse_linear"])
    assert not is_convolutional(graph)


class ThreeProjections(nn.Module):
    def __init__(self, widths=(8, 8, 8), act=False):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(8, w) for w in widths)
        self.act = act

    def forward(self, x):
        outs = [p(x) for p in self.proj]
        if self.act:
            outs = [torch.relu(o) for o in outs]
        return outs[0].sum(-1) + outs[1].sum(-1) * outs[2].sum(-1)


@pytest.mark.parametrize("widths, act, wide_op", [
    ((8, 8, 8), False, "aten.baddbmm.default"),  # equal widths: one batched GEMM, dense slices
    ((8, 4, 6), False, "kiln.linear_act.default"),  # mixed widths: one wide GEMM split in columns
    ((8, 8, 8), True, "kiln.linear_act.default"),
])
def test_horizontal_fuse_merges_sibling_linears(widths, act, wide_op):
    x = torch.randn(5, 8)
    before, _ = run_passes(_capture(ThreeProjections(widths, act), x), ["constant_fold", "fuse_linear"])
    after, _ = run_passes(before, ["horizontal_fuse"])
    assert _ops(before).count("kiln.linear_act.default") == 3
    assert _ops(after).count("kiln.linear_act.default") == (1 if wide_op.startswith("kiln") else 0)
    assert wide_op in _ops(after)
    torch.testing.assert_close(after.run(x), before.run(x), atol=1e-5, rtol=1e-5)


class GatedMLP(nn.Module):
    def __init__(self, act=torch.nn.functional.silu, gated=True):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(8, 16, bias=False), nn.Linear(8, 16, bias=False), nn.Linear(16, 8)
        self.act, self.gated = act, gated

    def forward(self, x):
        if self.gated:  # SwiGLU / GeGLU: act(x W1) * (x W2)
            return self.down(self.act(self.gate(x)) * self.up(x))
        return self.act(self.gate(x)).sum(-1), self.up(x)  # the activated output is not a gate


@pytest.mark.parametrize("act", [torch.nn.functional.silu, torch.nn.functional.gelu, torch.relu])
def test_horizontal_fuse_merges_a_gated_mlp_and_fuses_its_activation_into_the_product(act):
    x = torch.randn(2, 5, 8)
    before, _ = run_passes(_capture(GatedMLP(act), x), ["dead_code", "constant_fold", "fuse_linear"])
    assert _ops(before).count("kiln.linear_act.default") == 3
    after, _ = run_passes(before, ["horizontal_fuse"])
    assert _ops(after).count("kiln.linear_act.default") == 1, "gate and up are one GEMM; down stays"
    assert "aten.bmm.default" in _ops(after)
    torch.testing.assert_close(after.run(x), before.run(x), atol=1e-5, rtol=1e-5)
    fused, _ = run_passes(after, ["fuse_pointwise"])
    assert "kiln.pointwise.default" in _ops(fused) and "aten.mul.Tensor" not in _ops(fused)
    torch.testing.assert_close(fused.run(x), before.run(x), atol=1e-5, rtol=1e-5)


def test_horizontal_fuse_keeps_an_activation_that_gates_nothing_in_its_gemm():
    x = torch.randn(5, 8)
    before, _ = run_passes(_capture(GatedMLP(gated=False), x), ["dead_code", "constant_fold", "fuse_linear"])
    after, _ = run_passes(before, ["horizontal_fuse"])
    assert _ops(after).count("kiln.linear_act.default") == 2, "different activations, no product: not merged"


def test_horizontal_fuse_with_a_dynamic_batch_keeps_the_biases():
    """Symbolic sizes: bmm then the bias added (baddbmm's meta function fails on symbolic sizes),
    right at every batch size of the range."""
    x = torch.randn(4, 6, 8)
    model = ThreeProjections().eval()
    engine = kiln.build(model, (x,), dynamic_shapes=({0: kiln.Dim("batch", min=1, opt=4, max=8)},))
    ops = [s["op"] for s in engine.plan["steps"]]
    assert "aten.bmm.default" in ops and "kiln.linear_act.default" not in ops, ops
    for batch in (1, 3, 8):
        y = torch.randn(batch, 6, 8)
        with torch.no_grad():
            torch.testing.assert_close(engine(y), model(y), atol=1e-5, rtol=1e-5)


class InceptionBranches(nn.Module):
    """Inception's 1×1 branches on one input; one with another kernel size stays apart."""

    def __init__(self):
        super().__init__()
        self.b1, self.b2, self.b3 = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 6, 1), nn.Conv2d(8, 6, 1)
        self.b4, self.after = nn.Conv2d(8, 5, 3, padding=1), nn.Conv2d(6, 3, 3, padding=1)

    def forward(self, x):
        b1, b2, b3 = (torch.relu(c(x)) for c in (self.b1, self.b2, self.b3))
        return torch.cat([b1, torch.relu(self.after(b2)), b3.flatten(1).view(2, 6, 5, 5), self.b4(x)], 1)


def test_opt_in_passes_run_only_when_named():
    x = torch.randn(2, 8, 5, 5)
    graph, report = run_passes(_capture(InceptionBranches(), x))
    assert "horizontal_fuse_conv" not in [r["pass"] for r in report]
    assert _ops(graph).count("kiln.conv_bias_act.default") == 5


def test_horizontal_fuse_merges_sibling_convolutions():
    x = torch.randn(2, 8, 5, 5)
    before, _ = run_passes(_capture(InceptionBranches(), x), ["fuse_conv"])
    after, _ = run_passes(before, ["horizontal_fuse_conv"])
    convs = [n for n in after.module.graph.nodes if n.target == torch.ops.kiln.conv_bias_act.default]
    widths = sorted(n.args[1].meta["val"].shape[0] for n in convs)
    assert widths == [3, 5, 16], "the three 1×1 branches became one 16-channel convolution"
    assert "aten.split_with_sizes.default" in _ops(after)
    torch.testing.assert_close(after.run(x), before.run(x), atol=1e-5, rtol=1e-5)


class MaskedAttention(nn.Module):
    def __init__(self, keep_all: bool):
        super().__init__()
        self.keep_all = keep_all

    def forward(self, q):
        n = q.shape[-2]
        positions = torch.arange(n, device=q.device)
        limit = n if self.keep_all else n // 2
        mask = (positions < limit).expand(q.shape[0], 1, n, n)  # a constant at build time, expanded
        return nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)


@pytest.mark.parametrize("keep_all", [True, False])
def test_trivial_attention_masks_are_dropped(keep_all):
    q = torch.randn(2, 2, 300, 4)  # a mask too large to fold into a constant once expanded
    before, _ = run_passes(_capture(MaskedAttention(keep_all), q), ["constant_fold"])
    if keep_all:
        assert any(n.target == torch.ops.aten.expand.default for n in before.module.graph.nodes)
    after, _ = run_passes(before, ["drop_trivial_attention_mask"])
    sdpa = next(n for n in after.module.graph.nodes if n.target == torch.ops.aten.scaled_dot_product_attention.default)
    mask = sdpa.args[3] if len(sdpa.args) > 3 else sdpa.kwargs.get("attn_mask")
    assert (mask is None) == keep_all, "only a mask that masks nothing may go"
    torch.testing.assert_close(after.run(q), before.run(q), atol=1e-5, rtol=1e-5)


class Rotary(nn.Module):
    def __init__(self, other_dim=False, two_tensors=False):
        super().__init__()
        self.register_buffer("cos", torch.randn(6, 8))
        self.register_buffer("sin", torch.randn(6, 8))
        self.other_dim, self.two_tensors = other_dim, two_tensors

    def forward(self, x):
        x1, x2 = x[..., :4], x[..., 4:]
        if self.two_tensors:
            x1 = (x * 2)[..., :4]
        rotated = torch.cat((-x2, x1), dim=-2 if self.other_dim else -1)
        if self.other_dim:
            return rotated
        return x * self.cos + rotated * self.sin


def test_gather_cat_makes_rotate_half_one_gather_fused_into_the_rotary_product():
    x = torch.randn(2, 3, 6, 8)
    before = _capture(Rotary(), x)
    after, _ = run_passes(before, ["gather_cat"])
    assert {"aten.cat.default", "aten.neg.default"} <= set(_ops(before))
    assert not {"aten.cat.default", "aten.neg.default"} & set(_ops(after))
    assert _ops(after).count("aten.index_select.default") == 1
    torch.testing.assert_close(after.run(x), before.run(x))
    fused, _ = run_passes(after, ["fuse_pointwise"])
    assert [op for op in _ops(fused) if op != "aten.slice.Tensor"] == ["aten.index_select.default",
                                                                        "kiln.pointwise.default"]
    torch.testing.assert_close(fused.run(x), before.run(x))


@pytest.mark.parametrize("model", [Rotary(other_dim=True), Rotary(two_tensors=True)], ids=["other dim", "two tensors"])
def test_gather_cat_leaves_other_concatenations(model):
    x = torch.randn(2, 3, 6, 8)
    before = _capture(model, x)
    after, _ = run_passes(before, ["gather_cat"])
    assert "aten.cat.default" in _ops(after) and "aten.index_select.default" not in _ops(after)
