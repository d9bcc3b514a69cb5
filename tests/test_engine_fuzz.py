"""Property tests: every malformed engine file is an EngineFileError (or, for a change that leaves
the file meaning the same, loads and gives identical outputs), and loading it writes no file
outside the test's directory. The larger campaign is benchmarks/fuzz_engine_files.py."""

import copy
import json
import pickle
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_safetensors

import kiln
from engine_files import make_canaries, tiny_conv_net, writes_confined_to
from kiln.runtime import engine_file

SETTINGS = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    model, inputs = tiny_conv_net()
    engine = kiln.build(model, inputs, device="cpu")
    work = tmp_path_factory.mktemp("fuzz")
    path = work / "tiny.kiln"
    engine.save(path)
    header, weights = engine_file.read(path)
    canaries = make_canaries(tmp_path_factory.mktemp("canary"))
    return {"dir": work, "bytes": path.read_bytes(), "header": header, "weights": weights, "inputs": inputs,
            "expected": engine(*inputs), "canaries": canaries}


def _load_outcome(base, path):
    """'error' (EngineFileError), 'identical' (loads, same outputs) or 'different' (loads, valid,
    computes something else: only possible where the digest was recomputed). Anything else
    raises: a raw exception at load or at the first call is a failure."""
    with writes_confined_to(base["dir"], [base["canaries"]]):
        try:
            engine = kiln.load(path)
        except kiln.EngineFileError:
            return "error"
        except kiln.DeviceMismatchError:
            return "error"  # e.g. device_type edited to cuda: a clear kiln error, not a crash
        try:
            out = engine(*base["inputs"])
        except kiln.KilnError:
            return "different"
    same = isinstance(out, torch.Tensor) and out.shape == base["expected"].shape and torch.equal(out, base["expected"])
    return "identical" if same else "different"


def _write(base, name, data):
    path = base["dir"] / name
    path.write_bytes(data)
    return path


# -- byte-level damage: the digest (or the container checks) catch it -------------------------------------


@SETTINGS
@given(flips=st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 255)), min_size=1, max_size=8))
def test_byte_flips(base, flips):
    data = bytearray(base["bytes"])
    for position, mask in flips:
        data[position % len(data)] ^= mask
    assert _load_outcome(base, _write(base, "flipped.kiln", bytes(data))) in ("error", "identical")


@SETTINGS
@given(cut=st.integers(0, 10**9))
def test_truncation(base, cut):
    data = base["bytes"]
    assert _load_outcome(base, _write(base, "cut.kiln", data[: cut % len(data)])) == "error"


@SETTINGS
@given(extra=st.binary(min_size=1, max_size=256))
def test_appended_bytes(base, extra):
    assert _load_outcome(base, _write(base, "long.kiln", base["bytes"] + extra)) == "error"


# -- header edits written by kiln's own writer (digest recomputed): validation must catch them -------------


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


DANGEROUS_OPS = ["aten.from_file.default", "aten.copy_.default", "aten.add.out", "aten.rand.default",
                 "aten.empty.memory_format", "aten.set_.source_Storage", "aten._print.default"]
INTERESTING = st.one_of(
    st.none(), st.booleans(), st.sampled_from([0, 1, -1, 2, 7, 2**31, 2**32 + 1, 2**63 - 1, 2**63, 2**64, 10**30,
                                               -(2**63) - 1]),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(["", "x" * 5000, "\x1b[31m", "float32",
                                                                       "int8", "cuda", "buffer", "slice", "view",
                                                                       "aten", "kiln.reference"] + DANGEROUS_OPS),
    st.sampled_from([{}, [], {"slot": 0}, {"slot": 10**6}, {"weight": "nope"}, {"float": "inf"}, {"float": "x"},
                     {"dtype": "bogus"}, {"tuple": [1, 2]}, {"a": 1, "b": 2}, [[[[[]]]]]]),
)


def _edit(header, path, replacement, mode):
    parent = header
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if mode == "replace":
        parent[key] = replacement
    elif mode == "delete":
        if isinstance(parent, dict):
            del parent[key]
        else:
            parent.pop(key)
    elif mode == "duplicate" and isinstance(parent, list):
        parent.insert(key, copy.deepcopy(parent[key]))
    elif mode == "tweak" and isinstance(parent[key], int) and not isinstance(parent[key], bool):
        parent[key] = parent[key] + (replacement if isinstance(replacement, int) else 1)
    elif mode == "add" and isinstance(parent[key], dict):
        parent[key]["injected"] = replacement
    else:
        parent[key] = replacement


@SETTINGS
@given(data=st.data())
def test_header_edits_with_the_digest_recomputed(base, data):
    header = copy.deepcopy(base["header"])
    paths = [p for p in _paths(header) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(header) if p]
        path = data.draw(st.sampled_from(paths))
        mode = data.draw(st.sampled_from(["replace", "replace", "delete", "duplicate", "tweak", "add"]))
        _edit(header, path, copy.deepcopy(data.draw(INTERESTING)), mode)  # a drawn list is never mutated
    target = base["dir"] / "edited.kiln"
    engine_file.write(target, header, base["weights"])
    assert _load_outcome(base, target) in ("error", "identical", "different")


@pytest.mark.parametrize("op", DANGEROUS_OPS)
def test_every_step_with_a_dangerous_op_is_refused(base, op):
    for i in range(len(base["header"]["plan"]["steps"])):
        header = copy.deepcopy(base["header"])
        header["plan"]["steps"][i]["op"] = op
        target = base["dir"] / "dangerous.kiln"
        engine_file.write(target, header, base["weights"])
        assert _load_outcome(base, target) == "error"


# -- deep nesting and huge sizes ------------------------------------------------------------------------------


def _write_header_json(base, name, header_json):
    """An engine file whose kiln header is this exact JSON text, with a correct digest."""
    weights = {k: v.contiguous() for k, v in base["weights"].items()}
    entries = [(k, engine_file._ST_CODES[v.dtype], v.shape, engine_file._tensor_bytes(v)) for k, v in weights.items()]
    metadata = {"kiln.format": engine_file.FORMAT, "kiln.version": str(engine_file.FORMAT_VERSION),
                "kiln.header": header_json, "kiln.sha256": engine_file.digest(header_json, entries)}
    return _write(base, name, save_safetensors(weights, metadata=metadata))


@SETTINGS
@given(depth=st.integers(65, 200_000), where=st.sampled_from(["build", "args", "structure", "root"]))
def test_deep_nesting(base, depth, where):
    nested = "[" * depth + "]" * depth
    text = json.dumps(base["header"], separators=(",", ":"))
    if where == "build":
        text = text.replace('"build":{', f'"build":{{"deep":{nested},', 1)
    elif where == "args":
        text = text.replace('"args":[', f'"args":[{nested},', 1)
    elif where == "structure":
        text = text.replace('"structure":', f'"structure":{{"tuple":[{nested}]}},"x":', 1)
    else:
        text = nested
    assert _load_outcome(base, _write_header_json(base, "deep.kiln", text)) == "error"


HUGE = st.sampled_from([2**31, 2**32, 2**40, 2**47, 2**62, 2**63 - 1, 2**63, 2**64 + 5, 10**40])


@SETTINGS
@given(size=HUGE, target=st.sampled_from(["arena", "slot_dim", "slot_nbytes", "input_dim", "offset", "stride"]),
       index=st.integers(0, 100))
def test_huge_sizes_in_the_plan(base, size, target, index):
    header = copy.deepcopy(base["header"])
    plan = header["plan"]
    slot = plan["slots"][index % len(plan["slots"])]
    if target == "arena":
        plan["memory"]["arena_bytes"] = size
    elif target == "slot_dim":
        slot["shape"][index % max(len(slot["shape"]), 1)] = size if slot["shape"] else size
    elif target == "slot_nbytes":
        slot["nbytes"] = size
    elif target == "input_dim":
        plan["inputs"][0]["shape"][0] = size
    elif target == "offset":
        slot["offset"] = size
    else:
        slot["stride"][0] = size
    target_path = base["dir"] / "huge.kiln"
    engine_file.write(target_path, header, base["weights"])
    # A view's declared strides are descriptive (the view op computes the real ones): a huge one
    # there changes nothing. Every size that could allocate must be refused.
    allowed = ("error", "identical") if target == "stride" and slot["kind"] == "view" else ("error",)
    assert _load_outcome(base, target_path) in allowed


@SETTINGS
@given(size=HUGE, field=st.sampled_from(["shape", "end", "begin", "header_length"]))
def test_huge_sizes_in_the_container(base, size, field):
    data = base["bytes"]
    (n,) = struct.unpack("<Q", data[:8])
    index = json.loads(data[8 : 8 + n])
    name = next(k for k in index if k != "__metadata__")
    if field == "shape":
        index[name]["shape"] = [size, size]
    elif field == "end":
        index[name]["data_offsets"][1] = size
    elif field == "begin":
        index[name]["data_offsets"][0] = size
    raw = json.dumps(index).encode()
    raw += b" " * (-len(raw) % 8)
    length = size % 2**64 if field == "header_length" else len(raw)
    blob = struct.pack("<Q", length) + raw + data[8 + n :]
    assert _load_outcome(base, _write(base, "huge_index.kiln", blob)) == "error"


# -- files that are not engines ---------------------------------------------------------------------------------


def _onnx_bytes():
    pytest.importorskip("onnx")
    from onnx import TensorProto
    from onnx import helper as h

    graph = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g",
                         [h.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                         [h.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    return h.make_model(graph, producer_name="pytorch").SerializeToString()


def _torch_save_bytes():
    import io

    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buffer)
    return buffer.getvalue()


FOREIGN = {
    "onnx": (_onnx_bytes, "an ONNX model"),
    "pickle": (lambda: pickle.dumps({"a": 1}), "a pickle"),
    "torch_save": (_torch_save_bytes, "a PyTorch checkpoint"),
    "empty": (lambda: b"", "empty"),
    "npy": (lambda: b"\x93NUMPY\x01\x00" + b" " * 100, "NumPy"),
    "random": (lambda: bytes(range(256)) * 4, "not a kiln engine"),
}


@pytest.mark.parametrize("kind", sorted(FOREIGN))
def test_files_that_are_not_engines(base, kind):
    make, pattern = FOREIGN[kind]
    path = _write(base, f"foreign_{kind}.bin", make())
    with writes_confined_to(base["dir"], [base["canaries"]]):
        with pytest.raises(kiln.EngineFileError, match=pattern):
            kiln.load(path)


def test_a_directory_is_not_an_engine(base):
    with writes_confined_to(base["dir"], [base["canaries"]]):
        with pytest.raises(kiln.EngineFileError, match="is a directory"):
            kiln.load(base["dir"])


@SETTINGS
@given(blob=st.binary(min_size=0, max_size=2048))
def test_arbitrary_bytes(base, blob):
    assert _load_outcome(base, _write(base, "blob.kiln", blob)) == "error"
