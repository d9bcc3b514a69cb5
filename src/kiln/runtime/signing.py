"""Signed engine files: Ed25519 signatures over the engine file's digest (`cryptography`).

An engine file's SHA-256 digest (kiln.runtime.engine_file) covers its format, header and
every tensor's name, dtype, shape and bytes. It detects accidents, not attackers: anyone who
can change the file can recompute it. A signature over that digest with a private key only
you hold is what detects an attacker; `kiln.load(path, trusted_keys=[...])` refuses any file
that is unsigned or not signed by one of the trusted keys.

    from kiln.runtime.signing import generate_key
    generate_key("kiln.key", "kiln.pub")               # once: a key pair (PEM)
    engine.save("model.kiln", sign_key="kiln.key")     # sign when writing
    kiln.load("model.kiln", trusted_keys=["kiln.pub"]) # verify when loading
    engine.signer                                      # 'ed25519:…' fingerprint of the signing key

Keys: Ed25519 only, as PEM (PKCS#8 private / SubjectPublicKeyInfo public, what generate_key
writes, `openssl genpkey -algorithm ed25519` makes) or OpenSSH (`ssh-keygen -t ed25519`,
unencrypted), given as a path, the key's bytes, or a `cryptography` key object.

`cryptography` is an optional dependency (`pip install 'kiln[sign]'`) imported only here, and
only when keys are used: loading an unsigned file, or a signed one without trusted keys,
never imports it.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kiln.errors import EngineFileError, KilnError

__all__ = [
    "SigningError",
    "fingerprint",
    "fingerprint_raw",
    "generate_key",
    "load_private_key",
    "load_public_key",
    "load_public_keys",
    "sign",
    "verify",
]

# What is signed: a fixed context plus the digest, so a kiln signature cannot be replayed as a
# signature over anything else (and the reverse).
_CONTEXT = b"kiln engine file signature v1\x00"


class SigningError(KilnError):
    """A signing key cannot be used: missing, malformed, not Ed25519, or `cryptography` absent."""


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise SigningError(
            "signing and verifying engine files needs the `cryptography` package: "
            "pip install 'kiln[sign]' (or pip install cryptography)"
        ) from None
    return serialization, ed25519


def fingerprint_raw(raw_public: bytes) -> str:
    """'ed25519:' + the first 32 hex digits of SHA-256 over the 32-byte raw public key."""
    return "ed25519:" + hashlib.sha256(raw_public).hexdigest()[:32]


def _raw_public(public_key: Any) -> bytes:
    serialization, _ = _crypto()
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(key: Any) -> str:
    """The fingerprint of a key (public or private; object, path or bytes), as engine.signer shows it."""
    serialization, ed25519 = _crypto()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        key = key.public_key()
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        try:
            key = load_public_key(key)
        except SigningError:
            key = load_private_key(key).public_key()
    return fingerprint_raw(_raw_public(key))


def _key_bytes(source: Any, what: str) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source), f"the {what} given as bytes"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            return path.read_bytes(), str(path)
        except OSError as exc:
            raise SigningError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    raise SigningError(f"a {what} is a path, PEM/OpenSSH bytes or an Ed25519 key object, got {type(source).__name__}")


def load_private_key(source: Any) -> Any:
    """An Ed25519PrivateKey from a path, PEM/OpenSSH bytes, or a key object (returned as is)."""
    serialization, ed25519 = _crypto()
    if isinstance(source, ed25519.Ed25519PrivateKey):
        return source
    data, where = _key_bytes(source, "private key")
    try:
        if data.lstrip().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----"):
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise SigningError(f"{where} is encrypted; kiln signs with unencrypted Ed25519 keys "
                           "(generate one with `kiln keygen`)") from None
    except Exception as exc:  # cryptography raises ValueError or UnsupportedAlgorithm
        raise SigningError(f"{where} is not a PEM or OpenSSH private key ({type(exc).__name__})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SigningError(f"{where} is a {type(key).__name__}; kiln signs with Ed25519 keys only")
    return key


def load_public_key(source: Any) -> Any:
    """An Ed25519PublicKey from a path, PEM/OpenSSH bytes, or a key object (a private key
    object gives its public key)."""
    serialization, ed25519 = _crypto()
    if isinstance(source, ed25519.Ed25519PublicKey):
        return source
    if isinstance(source, ed25519.Ed25519PrivateKey):
        return source.public_key()
    data, where = _key_bytes(source, "public key")
    try:
        if data.lstrip().startswith(b"ssh-"):
            key = serialization.load_ssh_public_key(data.strip())
        else:
            key = serialization.load_pem_public_key(data)
    except Exception as exc:  # ValueError / UnsupportedAlgorithm
        raise SigningError(f"{where} is not a PEM or OpenSSH public key ({type(exc).__name__})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SigningError(f"{where} is a {type(key).__name__}; kiln verifies Ed25519 keys only")
    return key


def load_public_keys(sources: Any) -> list[Any]:
    """Trusted keys for kiln.load: one source or an iterable of them (see load_public_key)."""
    if isinstance(sources, (str, bytes, bytearray, os.PathLike)) or not isinstance(sources, Iterable):
        sources = [sources]
    keys = [load_public_key(s) for s in sources]
    if not keys:
        raise SigningError("trusted_keys is empty: no engine could load. Pass at least one public key, "
                           "or None to load without checking signatures")
    return keys


def sign(digest_hex: str, private_key: Any) -> dict[str, str]:
    """The metadata entries that sign an engine file with this digest."""
    key = load_private_key(private_key)
    signature = key.sign(_CONTEXT + digest_hex.encode())
    return {
        "kiln.signature": base64.b64encode(signature).decode(),
        "kiln.signer": base64.b64encode(_raw_public(key.public_key())).decode(),
    }


def verify(digest_hex: str, signature: bytes, raw_public: bytes, trusted: list[Any], where: str) -> str:
    """Check a file's signature: its key must be one of `trusted` and the signature must verify.
    Returns the signer's fingerprint; raises EngineFileError otherwise."""
    from cryptography.exceptions import InvalidSignature

    signer = fingerprint_raw(raw_public)
    match = next((k for k in trusted if _raw_public(k) == raw_public), None)
    if match is None:
        known = ", ".join(fingerprint_raw(_raw_public(k)) for k in trusted[:4])
        raise EngineFileError(
            f"{where} is signed by {signer}, which is not one of the {len(trusted)} trusted key(s) ({known}). "
            "Load it only if you trust that key: add its public key to the trusted keys."
        )
    try:
        match.verify(signature, _CONTEXT + digest_hex.encode())
    except InvalidSignature:
        raise EngineFileError(
            f"{where} has a signature by {signer} that does not verify: the file was changed after it was signed "
            "(or the signature was forged). Do not use it; rebuild and sign it again."
        ) from None
    return signer


def generate_key(private_path: str | os.PathLike, public_path: str | os.PathLike, overwrite: bool = False) -> str:
    """Write a new Ed25519 key pair as PEM (private key readable by its owner only) and return
    its fingerprint. Refuses to overwrite existing files unless `overwrite`."""
    serialization, ed25519 = _crypto()
    private_path, public_path = Path(private_path), Path(public_path)
    if private_path.resolve() == public_path.resolve():
        raise SigningError("the private and public key paths must differ")
    for p in (private_path, public_path):
        if p.exists() and not overwrite:
            raise SigningError(f"{p} exists; refusing to overwrite a key (remove it first)")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(private_path, flags, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    os.chmod(private_path, 0o600)
    public_path.write_bytes(public_pem)
    return fingerprint_raw(_raw_public(key.public_key()))
