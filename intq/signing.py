"""Signed artifacts: an Ed25519 signature over every file of an artifact, checked before use.

An unsigned artifact carries checksums, which detect damage but not tampering: whoever can
write the file can recompute them (and a TVM library is native code that runs when it is
loaded). A signed one carries ``<artifact>.sig`` as well, a small JSON document::

    {"format": "intq-signature", "version": 1, "algorithm": "ed25519",
     "key": "<sha256 of the raw public key>",
     "files": {"": "<sha256 of the artifact>", ".json": "<sha256 of its manifest>"},
     "signature": "<hex of the Ed25519 signature over the fields above>"}

``files`` lists each file of the artifact by the suffix added to the artifact's name (so a
renamed artifact still verifies, and a suffix cannot point elsewhere). ``intq.load(path,
trusted_keys=[...])`` reads every file once, checks the signature with the trusted key it
names and each file's sha256 against it, and hands exactly those bytes to the backend, so
nothing read later can differ from what was checked (a TVM library is loaded from a private
copy of the checked bytes). The signature vouches for the content, not for the name: any
artifact a key signed verifies under any name.

Keys are ``cryptography`` Ed25519 key objects, or their bytes or files: raw (32 bytes) or
PEM (PKCS#8 private keys, SubjectPublicKeyInfo public keys, as ``openssl genpkey -algorithm
ed25519`` and ``openssl pkey -pubout`` write them). :func:`write_key_pair` (``intq keygen``)
makes a pair.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from intq.errors import ArtifactError, IntqError
from intq.schema import equal, mapping, obj, parse_json, string

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

SIGNATURE_SUFFIX = ".sig"
"""A signature file is named for its artifact with this added: ``model.so.sig``."""

MAX_SIGNATURE_BYTES = 1 << 16
MAX_KEY_BYTES = 1 << 16
"""Signature and key files larger than this are refused before they are read."""

_DOMAIN = b"intq-signature 1\n"
"""Prefixed to every signed message, so that a signature made for something else with the
same key never verifies as an artifact's."""

_HEX = string(64, pattern=r"[0-9a-f]{64}")
SIGNATURE_FILE = obj(
    {
        "format": equal("intq-signature"),
        "version": equal(1),
        "algorithm": equal("ed25519"),
        "key": _HEX,
        "files": mapping(string(9, pattern=r"(\.[a-z]{1,8})?"), _HEX, 8),
        "signature": string(128, pattern=r"[0-9a-f]{128}"),
    }
)
"""The schema of a signature file (:mod:`intq.schema`): a file suffix is a dot and a few
lowercase letters, or empty for the artifact itself."""

_KEY_HINT = (
    "give an Ed25519 key: a PEM file (intq keygen -o key.pem, or openssl genpkey -algorithm"
    " ed25519 -out key.pem; openssl pkey -in key.pem -pubout -out key.pub.pem), its raw 32"
    " bytes, or a cryptography Ed25519 key object"
)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(key: Ed25519PublicKey) -> str:
    """The sha256 (hex) of a public key's raw 32 bytes: how a signature file names it."""
    from cryptography.hazmat.primitives import serialization

    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _sha256(raw)


def _key_bytes(key: Any, what: str) -> tuple[bytes, str]:
    """The bytes of ``key`` (bytes, or a file path) and how to name it in errors."""
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key), f"the {what} given as bytes"
    if isinstance(key, (str, os.PathLike)):
        path = Path(key)
        try:
            size = path.stat().st_size
            if size > MAX_KEY_BYTES:
                raise IntqError(f"{path} is {size} bytes: not an {what} file", hint=_KEY_HINT)
            return path.read_bytes(), str(path)
        except OSError as err:
            raise IntqError(
                f"cannot read the {what} {path}: {err.strerror or err}", hint=_KEY_HINT
            ) from None
    raise IntqError(f"a {type(key).__name__} is not an {what}", hint=_KEY_HINT)


def load_private_key(key: Any) -> Ed25519PrivateKey:
    """An Ed25519 private key from a key object, its raw 32 bytes, PEM bytes, or a file of
    either (a path)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if isinstance(key, Ed25519PrivateKey):
        return key
    data, name = _key_bytes(key, "Ed25519 private key")
    if len(data) == 32 and not data.startswith(b"-----"):
        return Ed25519PrivateKey.from_private_bytes(data)
    from cryptography.exceptions import UnsupportedAlgorithm

    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography's word for "encrypted, and no password given"
        raise IntqError(
            f"{name} is encrypted; intq reads unencrypted keys",
            hint="decrypt it: openssl pkey -in key.pem -out plain.pem (keep it private)",
        ) from None
    except (ValueError, UnsupportedAlgorithm) as err:
        raise IntqError(f"{name} is not an Ed25519 private key ({err})", hint=_KEY_HINT) from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise IntqError(
            f"{name} is a {type(loaded).__name__}, not an Ed25519 private key", hint=_KEY_HINT
        )
    return loaded


def load_public_key(key: Any) -> Ed25519PublicKey:
    """An Ed25519 public key from a key object (a private key gives its public half), its
    raw 32 bytes, PEM bytes (a public or a private key), or a file of either (a path)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, Ed25519PrivateKey):
        return key.public_key()
    data, name = _key_bytes(key, "Ed25519 public key")
    if len(data) == 32 and not data.startswith(b"-----"):
        return Ed25519PublicKey.from_public_bytes(data)
    from cryptography.exceptions import UnsupportedAlgorithm

    loaded: Any
    try:
        if b"PRIVATE KEY-----" in data:
            loaded = serialization.load_pem_private_key(data, password=None)
            loaded = loaded.public_key()
        else:
            loaded = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise IntqError(f"{name} is not an Ed25519 public key ({err})", hint=_KEY_HINT) from None
    if not isinstance(loaded, Ed25519PublicKey):
        raise IntqError(
            f"{name} is a {type(loaded).__name__}, not an Ed25519 public key", hint=_KEY_HINT
        )
    return loaded


def load_public_keys(keys: Any) -> list[Ed25519PublicKey]:
    """``trusted_keys`` as a list of public keys: one key (object, bytes or path) or an
    iterable of them; an empty list trusts nothing and is refused."""
    if isinstance(keys, (str, bytes, bytearray, memoryview, os.PathLike)) or not isinstance(
        keys, Iterable
    ):
        keys = [keys]
    loaded = [load_public_key(k) for k in keys]
    if not loaded:
        raise IntqError(
            "trusted_keys is empty: no signature could verify",
            hint="pass the public keys to trust, trusted_keys=KEYS (--trusted-key PUB.pem), or"
            " None to load"
            " unsigned artifacts",
        )
    return loaded


def _message(key: str, files: Mapping[str, str]) -> bytes:
    """What is signed: the fields of the signature file but the signature, canonically."""
    statement = {
        "algorithm": "ed25519",
        "files": dict(sorted(files.items())),
        "format": "intq-signature",
        "key": key,
        "version": 1,
    }
    return _DOMAIN + json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()


def sign_files(files: Mapping[str, bytes], key: Ed25519PrivateKey) -> bytes:
    """The signature file (its bytes) over an artifact's ``files`` (suffix -> bytes)."""
    digests = {suffix: _sha256(data) for suffix, data in files.items()}
    public = fingerprint(key.public_key())
    document = {
        "format": "intq-signature",
        "version": 1,
        "algorithm": "ed25519",
        "key": public,
        "files": digests,
        "signature": key.sign(_message(public, digests)).hex(),
    }
    return json.dumps(document, indent=2).encode()


def signature_path(path: Path) -> Path:
    """Where the signature of the artifact ``path`` is."""
    return path.with_name(path.name + SIGNATURE_SUFFIX)


def _read(path: Path, limit: int, what: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > limit:
            raise ArtifactError(f"{path} is {size} bytes, more than a {what} may be ({limit})")
        return path.read_bytes()
    except OSError as err:
        raise ArtifactError(f"cannot read the {what} {path}: {err.strerror or err}") from None


def verify_files(
    path: Path, artifact: bytes, trusted: Iterable[Ed25519PublicKey], max_bytes: int
) -> dict[str, bytes]:
    """Check the signature of the artifact ``path`` (whose bytes are ``artifact``) with one
    of the ``trusted`` keys; returns the bytes of every file it covers (suffix -> bytes),
    read once, or raises :class:`ArtifactError` saying what failed: no signature, a key not
    trusted, a signature that does not verify, or a file changed since it was signed."""
    from cryptography.exceptions import InvalidSignature

    sig_path = signature_path(path)
    hint = (
        "use the artifact as it was signed, or save it again with sign_key=KEY (--sign-key KEY.pem)"
    )
    if not sig_path.is_file():
        raise ArtifactError(
            f"{path} is not signed (there is no {sig_path.name} next to it) and trusted keys"
            " were given",
            hint="sign it when saving, sign_key=KEY (--sign-key KEY.pem); or load it without"
            " trusted_keys=KEYS (--trusted-key) to trust it unsigned",
        )
    document = parse_json(
        _read(sig_path, MAX_SIGNATURE_BYTES, "signature file"),
        sig_path,
        "signature file",
        SIGNATURE_FILE,
        hint=hint,
    )
    if "" not in document["files"]:
        raise ArtifactError(f"{sig_path}: the signature does not cover {path.name}", hint=hint)
    keys = {fingerprint(k): k for k in trusted}
    key = keys.get(document["key"])
    if key is None:
        raise ArtifactError(
            f"{path} is signed by the key {document['key'][:16]}..., which is not trusted"
            f" (trusted: {', '.join(f[:16] + '...' for f in keys)})",
            hint="trust the public key that signed it: trusted_keys=KEYS (--trusted-key PUB.pem)",
        )
    try:
        key.verify(
            bytes.fromhex(document["signature"]), _message(document["key"], document["files"])
        )
    except InvalidSignature:
        raise ArtifactError(
            f"{sig_path}: the signature does not verify with the key {document['key'][:16]}...:"
            " the signature file was altered or forged",
            hint=hint,
        ) from None
    contents = {"": artifact}
    for suffix, digest in document["files"].items():
        if suffix:
            contents[suffix] = _read(path.with_name(path.name + suffix), max_bytes, "file")
        if _sha256(contents[suffix]) != digest:
            raise ArtifactError(
                f"{path.name + suffix} was changed after it was signed: its sha256 does not"
                f" match {sig_path.name}",
                hint=hint,
            )
    return contents


def write_key_pair(path: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """A new Ed25519 key pair: the private key as PEM (PKCS#8) at ``path`` (mode 0600) and
    the public key beside it as ``<stem>.pub.pem``; returns both paths. An existing file is
    refused unless ``overwrite``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Path(path)
    public = private.with_name(private.stem + ".pub.pem")
    for target in (private, public):
        if target.exists() and not overwrite:
            raise IntqError(f"{target} exists", hint="choose another name, or --force")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        private.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        os.chmod(private, 0o600)
        public.write_bytes(pub)
    except OSError as err:
        raise IntqError(f"cannot write the key pair at {private}: {err.strerror or err}") from None
    return private, public


__all__ = [
    "SIGNATURE_FILE",
    "SIGNATURE_SUFFIX",
    "fingerprint",
    "load_private_key",
    "load_public_key",
    "load_public_keys",
    "sign_files",
    "signature_path",
    "verify_files",
    "write_key_pair",
]
