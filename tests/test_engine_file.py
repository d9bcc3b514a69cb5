"""Damaged, tampered, foreign and mismatched engine files fail with a clear EngineFileError."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import kiln
from kiln.runtime import engine_file


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)).eval()
    x = torch.randn(4, 8)
    path = tmp_path_factory.mktemp("engines") / "mlp.kiln"
    kiln.build(model, (x,)).save(path)
    return path, x


def _rewrite_metadata(path, out, change):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    change(header["__metadata__"])
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    out.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def test_roundtrip_is_verified(saved):
    path, x = saved
    header, weights = engine_file.read(path)
    assert "plan" in header and "build" in header
    assert all(isinstance(t, torch.Tensor) for t in weights.values())


def test_file_holds_no_pickle(saved):
    path, _ = saved
    data = path.read_bytes()
    assert b"\x80\x04" not in data[:64] and data[8:9] == b"{", "engine files are safetensors, never pickle"


def test_missing_file(tmp_path):
    with pytest.raises(kiln.EngineFileError, match="no engine file"):
        kiln.load(tmp_path / "nope.kiln")


def test_truncated_file(saved, tmp_path):
    path, _ = saved
    cut = tmp_path / "cut.kiln"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(kiln.EngineFileError, match="truncated"):
        kiln.load(cut)


def test_tiny_file(tmp_path):
    p = tmp_path / "tiny.kiln"
    p.write_bytes(b"abc")
    with pytest.raises(kiln.EngineFileError, match="truncated"):
        kiln.load(p)


def test_not_an_engine(tmp_path):
    p = tmp_path / "random.kiln"
    p.write_bytes(struct.pack("<Q", 16) + b"\xff" * 40)
    with pytest.raises(kiln.EngineFileError, match="not a kiln engine"):
        kiln.load(p)


def test_plain_safetensors_is_not_an_engine(tmp_path):
    p = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, p)
    with pytest.raises(kiln.EngineFileError, match="not a kiln engine"):
        kiln.load(p)


def test_flipped_weight_byte_fails_integrity_check(saved, tmp_path):
    path, _ = saved
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    bad = tmp_path / "flipped.kiln"
    bad.write_bytes(bytes(data))
    with pytest.raises(kiln.EngineFileError, match="integrity check"):
        kiln.load(bad)


def test_tampered_plan_fails_integrity_check(saved, tmp_path):
    path, _ = saved
    bad = tmp_path / "tampered.kiln"

    def change(meta):
        tampered = meta["kiln.header"].replace('"relu"', '"gelu"')
        assert tampered != meta["kiln.header"], "the test must actually change the plan"
        meta["kiln.header"] = tampered

    _rewrite_metadata(path, bad, change)
    with pytest.raises(kiln.EngineFileError, match="integrity check"):
        kiln.load(bad)


def test_unknown_format_version(saved, tmp_path):
    path, _ = saved
    future = tmp_path / "future.kiln"
    _rewrite_metadata(path, future, lambda meta: meta.update({"kiln.version": "99"}))
    with pytest.raises(kiln.EngineFileError, match="format version 99.*reads version 2"):
        kiln.load(future)


def test_format_1_files_are_refused_with_a_reason(saved, tmp_path):
    path, _ = saved
    old = tmp_path / "old.kiln"
    _rewrite_metadata(path, old, lambda meta: meta.update({"kiln.version": "1"}))
    with pytest.raises(kiln.EngineFileError, match="version 1.*older kiln.*dtype and shape.*kiln build"):
        kiln.load(old)


def _with_build(path, out, **changes):
    header, weights = engine_file.read(path)
    header["build"].update(changes)
    engine_file.write(out, header, weights)


def test_cuda_engine_on_a_machine_without_cuda(saved, tmp_path, monkeypatch):
    path, _ = saved
    gpu = tmp_path / "gpu.kiln"
    _with_build(path, gpu, device_type="cuda", device_name="NVIDIA H100", compute_capability=[9, 0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(kiln.DeviceMismatchError, match="no usable CUDA device.*--device cpu"):
        kiln.load(gpu)


def test_engine_for_another_compute_capability(saved, tmp_path, monkeypatch):
    path, _ = saved
    gpu = tmp_path / "gpu.kiln"
    _with_build(path, gpu, device_type="cuda", device_name="NVIDIA H100", compute_capability=[9, 0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA RTX A6000")
    with pytest.raises(kiln.DeviceMismatchError, match=r"compute capability \(9, 0\).*\(8, 6\).*rebuild"):
        kiln.load(gpu)


def test_cpu_engine_on_cuda_device_is_refused(saved):
    path, _ = saved
    with pytest.raises(kiln.DeviceMismatchError, match="built for cpu"):
        kiln.load(path, device="cuda")


# -- the digest covers every tensor's dtype and shape --------------------------------------------------


def _edit_index(path, out, change):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    index = json.loads(data[8 : 8 + n])
    change(index)
    raw = json.dumps(index).encode()
    raw += b" " * (-len(raw) % 8)
    out.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _a_float_weight(index):
    return next(k for k, v in index.items() if k != "__metadata__" and v["dtype"] == "F32" and len(v["shape"]) == 2)


def test_dtype_edit_fails_integrity_check(saved, tmp_path):
    """F32 → I32 keeps every byte offset valid: only a digest over dtypes catches it (issue 10)."""
    path, _ = saved
    bad = tmp_path / "dtype.kiln"
    _edit_index(path, bad, lambda index: index[_a_float_weight(index)].update(dtype="I32"))
    with pytest.raises(kiln.EngineFileError, match="integrity check"):
        kiln.load(bad)


def test_shape_edit_fails_integrity_check(saved, tmp_path):
    path, _ = saved
    bad = tmp_path / "shape.kiln"
    _edit_index(path, bad, lambda index: index[_a_float_weight(index)]["shape"].reverse())
    with pytest.raises(kiln.EngineFileError, match="integrity check"):
        kiln.load(bad)


def test_overlapping_tensor_data_is_refused(saved, tmp_path):
    path, _ = saved
    bad = tmp_path / "overlap.kiln"

    def change(index):
        names = sorted((k for k in index if k != "__metadata__"), key=lambda k: index[k]["data_offsets"][0])
        a, b = index[names[0]], index[names[1]]
        b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + b["data_offsets"][1] - b["data_offsets"][0]]

    _edit_index(path, bad, change)
    with pytest.raises(kiln.EngineFileError, match="damaged|truncated"):
        kiln.load(bad)


def test_duplicate_keys_in_the_index_are_refused(saved, tmp_path):
    """Two parsers disagreeing on a duplicated key must not be able to verify one tensor and load another."""
    path, _ = saved
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    raw = data[8 : 8 + n].rstrip()
    assert raw.endswith(b"}")
    raw = raw[:-1] + b',"__metadata__":{}}'
    raw += b" " * (-len(raw) % 8)
    bad = tmp_path / "dup.kiln"
    bad.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    with pytest.raises(kiln.EngineFileError, match="not valid JSON.*twice"):
        kiln.load(bad)


# -- files that are not engines say what they are ------------------------------------------------------


def _onnx_file(path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto
    from onnx import helper as h

    graph = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g",
                         [h.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                         [h.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(h.make_model(graph, producer_name="pytorch"), str(path))


@pytest.mark.parametrize("suffix", [".onnx", ".bin"])
def test_onnx_model_is_named_not_misread(tmp_path, suffix):
    """`kiln run model.onnx` once said 'header claims 8031177557570357768 bytes'."""
    p = tmp_path / f"model{suffix}"
    _onnx_file(p)
    with pytest.raises(kiln.EngineFileError, match="an ONNX model.*kiln build") as info:
        kiln.load(p)
    assert "claims" not in str(info.value)


def test_torch_save_checkpoint_is_named(tmp_path):
    p = tmp_path / "weights.bin"
    torch.save({"w": torch.zeros(2)}, p)
    with pytest.raises(kiln.EngineFileError, match=r"a PyTorch checkpoint \(torch.save\)"):
        kiln.load(p)


def test_legacy_torch_save_and_pickle_are_named_and_never_unpickled(tmp_path):
    import pickle

    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(kiln.EngineFileError, match="legacy .*torch.save.*never unpickles"):
        kiln.load(legacy)

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    evil = tmp_path / "evil.kiln"
    evil.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(kiln.EngineFileError, match="a pickle"):
        kiln.load(evil)


def test_torchscript_archive_is_named(tmp_path):
    p = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), p)
    with pytest.raises(kiln.EngineFileError, match="TorchScript"):
        kiln.load(p)


def test_empty_file_and_directory(tmp_path):
    empty = tmp_path / "empty.kiln"
    empty.write_bytes(b"")
    with pytest.raises(kiln.EngineFileError, match="empty"):
        kiln.load(empty)
    with pytest.raises(kiln.EngineFileError, match="is a directory"):
        kiln.load(tmp_path)


def test_text_file_is_named(tmp_path):
    p = tmp_path / "notes.kiln"
    p.write_text("hello, this is not an engine\n" * 10)
    with pytest.raises(kiln.EngineFileError, match="a text file"):
        kiln.load(p)


# -- last resort: the runtime failing on a validated file is still an EngineFileError ------------------


def test_unexpected_runtime_error_during_construction_becomes_engine_file_error(saved, monkeypatch):
    path, _ = saved

    def broken(*args, **kwargs):
        raise IndexError("list index out of range")

    monkeypatch.setattr(kiln.runtime.engine.Engine, "__init__", broken)
    with pytest.raises(kiln.EngineFileError, match="passed kiln's checks but cannot be loaded.*IndexError"):
        kiln.load(path)
