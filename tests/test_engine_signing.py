"""Signed engine files (kiln.runtime.signing): trusted keys refuse unsigned, foreign-signed and
changed files; the unsigned path never imports `cryptography`."""

import json
import os
import struct
import subprocess
import sys

import pytest
import torch

import kiln
from engine_files import tiny_conv_net
from kiln.runtime import engine_file, signing

pytest.importorskip("cryptography")
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    fingerprint = signing.generate_key(d / "kiln.key", d / "kiln.pub")
    other = signing.generate_key(d / "other.key", d / "other.pub")
    return d, fingerprint, other


@pytest.fixture(scope="module")
def engine():
    model, inputs = tiny_conv_net()
    return kiln.build(model, inputs, device="cpu"), inputs


def test_generate_key_writes_a_private_key_only_its_owner_reads(keys):
    d, fingerprint, other = keys
    assert fingerprint.startswith("ed25519:") and len(fingerprint) == len("ed25519:") + 32
    assert fingerprint != other
    assert (d / "kiln.key").stat().st_mode & 0o777 == 0o600
    assert b"BEGIN PRIVATE KEY" in (d / "kiln.key").read_bytes()
    assert b"BEGIN PUBLIC KEY" in (d / "kiln.pub").read_bytes()
    assert signing.fingerprint(d / "kiln.pub") == signing.fingerprint(d / "kiln.key") == fingerprint
    with pytest.raises(signing.SigningError, match="refusing to overwrite"):
        signing.generate_key(d / "kiln.key", d / "new.pub")


def test_signed_file_loads_with_its_trusted_key(keys, engine, tmp_path):
    d, fingerprint, _ = keys
    e, inputs = engine
    path = tmp_path / "signed.kiln"
    e.save(path, sign_key=d / "kiln.key")
    loaded = kiln.load(path, trusted_keys=[d / "kiln.pub"])
    assert loaded.signer == fingerprint and loaded.signer_trusted
    assert (loaded(*inputs) == e(*inputs)).all()
    # several trusted keys; keys as bytes and as objects
    pub_bytes = (d / "kiln.pub").read_bytes()
    assert kiln.load(path, trusted_keys=[d / "other.pub", pub_bytes]).signer == fingerprint
    assert kiln.load(path, trusted_keys=signing.load_public_key(pub_bytes)).signer_trusted
    # without trusted keys the file loads, naming (not vouching for) its signer
    plain = kiln.load(path)
    assert plain.signer == fingerprint and not plain.signer_trusted


def test_unsigned_file_is_refused_when_keys_are_given(keys, engine, tmp_path):
    d, _, _ = keys
    path = tmp_path / "unsigned.kiln"
    engine[0].save(path)
    assert kiln.load(path).signer is None
    with pytest.raises(kiln.EngineFileError, match="is not signed.*--sign-key"):
        kiln.load(path, trusted_keys=[d / "kiln.pub"])


def test_file_signed_by_another_key_is_refused(keys, engine, tmp_path):
    d, fingerprint, other = keys
    path = tmp_path / "other.kiln"
    engine[0].save(path, sign_key=d / "other.key")
    with pytest.raises(kiln.EngineFileError, match=f"signed by {other}, which is not one of the 1 trusted"):
        kiln.load(path, trusted_keys=[d / "kiln.pub"])


def test_changed_file_with_recomputed_digest_fails_the_signature(keys, engine, tmp_path):
    """An attacker can recompute the digest, not the signature."""
    d, _, _ = keys
    path = tmp_path / "signed.kiln"
    engine[0].save(path, sign_key=d / "kiln.key")
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    index = json.loads(data[8 : 8 + n])
    meta = index["__metadata__"]
    header = json.loads(meta["kiln.header"])
    header["build"]["model"] = "not what was signed"
    meta["kiln.header"] = json.dumps(header, separators=(",", ":"))
    entries = [(k, v["dtype"], v["shape"], data[8 + n + v["data_offsets"][0] : 8 + n + v["data_offsets"][1]])
               for k, v in index.items() if k != "__metadata__"]
    meta["kiln.sha256"] = engine_file.digest(meta["kiln.header"], entries)
    raw = json.dumps(index).encode()
    raw += b" " * (-len(raw) % 8)
    forged = tmp_path / "forged.kiln"
    forged.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    assert kiln.load(forged).header["build"]["model"] == "not what was signed", "the digest must be right"
    with pytest.raises(kiln.EngineFileError, match="does not verify"):
        kiln.load(forged, trusted_keys=[d / "kiln.pub"])


def test_openssh_keys_sign_and_verify(engine, tmp_path):
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    path = tmp_path / "ssh.kiln"
    engine[0].save(path, sign_key=private)
    assert kiln.load(path, trusted_keys=[public + b" me@host\n"]).signer == signing.fingerprint(key)
    engine[0].save(path, sign_key=key)  # a key object
    assert kiln.load(path, trusted_keys=[key.public_key()]).signer_trusted


def test_bad_keys_are_clear_errors(keys, engine, tmp_path):
    d, _, _ = keys
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(signing.SigningError, match="not a PEM or OpenSSH private key"):
        engine[0].save(tmp_path / "x.kiln", sign_key=tmp_path / "junk.pem")
    with pytest.raises(signing.SigningError, match="not a PEM or OpenSSH public key"):
        kiln.load(tmp_path / "x.kiln", trusted_keys=[tmp_path / "junk.pem"])
    with pytest.raises(signing.SigningError, match="cannot read"):
        signing.load_public_keys([tmp_path / "missing.pub"])
    with pytest.raises(signing.SigningError, match="trusted_keys is empty"):
        signing.load_public_keys([])
    from cryptography.hazmat.primitives.asymmetric import ec

    rsa_like = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with pytest.raises(signing.SigningError, match="Ed25519 keys only"):
        signing.load_private_key(rsa_like)
    encrypted = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw"))
    with pytest.raises(signing.SigningError, match="encrypted"):
        signing.load_private_key(encrypted)


def test_damaged_signature_fields_are_engine_file_errors(keys, engine, tmp_path):
    d, _, _ = keys
    path = tmp_path / "signed.kiln"
    engine[0].save(path, sign_key=d / "kiln.key")
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    for change, pattern in [(lambda m: m.pop("kiln.signer"), "go together"),
                            (lambda m: m.update({"kiln.signature": "!!"}), "not base64"),
                            (lambda m: m.update({"kiln.signer": "AAAA"}), "not an Ed25519")]:
        index = json.loads(data[8 : 8 + n])
        change(index["__metadata__"])
        raw = json.dumps(index).encode()
        raw += b" " * (-len(raw) % 8)
        bad = tmp_path / "bad.kiln"
        bad.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
        with pytest.raises(kiln.EngineFileError, match=pattern):
            kiln.load(bad)


def test_unsigned_path_never_imports_cryptography(keys, engine, tmp_path):
    """The GPU machine has no `cryptography`: loading without trusted keys must not need it."""
    d, fingerprint, _ = keys
    unsigned, signed = tmp_path / "u.kiln", tmp_path / "s.kiln"
    engine[0].save(unsigned)
    engine[0].save(signed, sign_key=d / "kiln.key")
    script = f"""
import sys
sys.modules["cryptography"] = None  # any import of it now fails
import kiln
from kiln.runtime import signing
assert kiln.load({str(unsigned)!r}).signer is None
assert kiln.load({str(signed)!r}).signer == {fingerprint!r}
try:
    kiln.load({str(signed)!r}, trusted_keys=[{str(d / "kiln.pub")!r}])
except signing.SigningError as exc:
    assert "pip install" in str(exc), exc
else:
    raise AssertionError("trusted keys without cryptography must say how to install it")
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_compiled_module_saves_signed(keys, tmp_path):
    d, fingerprint, _ = keys
    model, inputs = tiny_conv_net()
    module = kiln.compile(model, inputs, device="cpu")
    path = tmp_path / "module.kiln"
    module.save(path, sign_key=d / "kiln.key")
    loaded = kiln.load(path, trusted_keys=[d / "kiln.pub"])
    assert loaded.signer == fingerprint and loaded.signer_trusted
    assert torch.equal(loaded(*inputs), module(*inputs))
