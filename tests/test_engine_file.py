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
    with pytest.raises(kiln.EngineFileError, match="format version 99.*reads version 1"):
        kiln.load(future)


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
