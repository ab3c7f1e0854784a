"""End-to-end signatures: who sent a message is checked by its receiver, not taken from the broker.

Ed25519 through PyNaCl (libsodium): about 1 MB of wheels on a device, against about 4 MB for
``cryptography``. Keys are files of 64 hex characters: a signing key (the 32-byte seed, kept
private) and its verify key (public). ``fedprune-provision`` makes them: the coordinator holds
every enrolled device's verify key, each device holds the coordinator's.

A signing key may be sealed with a passphrase (``fedprune-provision seal``): the seed encrypted
with XSalsa20-Poly1305 (``SecretBox``) under a key derived by Argon2id with OWASP's minimum
(19 MiB, 2 passes: 0.05 s here, and the 19 MiB are freed before a device loads its model). The
passphrase comes from the environment, ``FEDPRUNE_KEY_PASSPHRASE``, or from the file that
``FEDPRUNE_KEY_PASSPHRASE_FILE`` names (a systemd credential, say); never from a command line.

A signed message is a small outer map around the exact bytes of the ordinary envelope, so the
signature covers them all (protocol version, kind, run, sender, sequence, body) and nothing is
re-encoded before it is checked. A receiver with a :class:`Trust` that has keys refuses unsigned
messages and messages whose sender it has no key for; that is checked in ``wire.decode``, the one
function every handler reads messages through.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from nacl.encoding import HexEncoder
from nacl.exceptions import BadSignatureError, CryptoError
from nacl.pwhash import argon2id
from nacl.secret import SecretBox
from nacl.signing import SigningKey, VerifyKey
from nacl.utils import random

from fedprune.protocol.errors import ConfigError, SignatureError

__all__ = [
    "SigningKey",
    "Trust",
    "VerifyKey",
    "load_signing_key",
    "load_verify_key",
    "new_keypair",
    "seal",
]

SEALED = "fedprune-sealed-key-1"
"""The first field of a sealed signing key file: ``SEALED:<ops>:<mem>:<salt hex>:<box hex>``."""
PASSPHRASE_ENV = "FEDPRUNE_KEY_PASSPHRASE"
PASSPHRASE_FILE_ENV = "FEDPRUNE_KEY_PASSPHRASE_FILE"
OPS, MEM = 2, 19 * 1024 * 1024  # Argon2id: OWASP's minimum (m = 19 MiB, t = 2)


@dataclass(frozen=True)
class Trust:
    """Whose signatures a receiver accepts, by sender id. Empty = unsigned operation (the demo)."""

    keys: Mapping[str, VerifyKey] = field(default_factory=dict)

    @property
    def required(self) -> bool:
        return bool(self.keys)

    def check(self, sender: str, signed: bytes | None, signature: bytes | None) -> None:
        """Raise ``SignatureError`` unless ``signed`` carries ``sender``'s valid signature (or
        this receiver takes unsigned messages and got one)."""
        if not self.required:
            return
        if signed is None or signature is None:
            raise SignatureError(f"unsigned message from {sender!r}")
        key = self.keys.get(sender)
        if key is None:
            raise SignatureError(f"no key for sender {sender!r}")
        try:
            key.verify(signed, signature)
        except (BadSignatureError, ValueError, TypeError) as exc:
            raise SignatureError(f"bad signature on a message from {sender!r}") from exc

    @classmethod
    def of(cls, keys: Mapping[str, VerifyKey]) -> Trust:
        return cls(keys=dict(keys))

    @classmethod
    def from_folder(cls, folder: str | Path) -> Trust:
        """Every ``<id>.pub`` in ``folder`` as the key of sender ``<id>``."""
        path = Path(folder)
        if not path.is_dir():
            raise ConfigError(f"{path}: no such folder of verify keys")
        return cls.of({key.stem: load_verify_key(key) for key in sorted(path.glob("*.pub"))})


def load_signing_key(path: str | Path, environ: Mapping[str, str] | None = None) -> SigningKey:
    """The signing key in ``path``, unsealed with the passphrase of ``environ`` if sealed."""
    text = _read(path, "signing key")
    if not text.startswith(SEALED + ":"):
        return SigningKey(_hex(text, path, "signing key"))
    try:
        _, ops, mem, salt, box = text.split(":")
        key = argon2id.kdf(
            SecretBox.KEY_SIZE,
            passphrase(os.environ if environ is None else environ, path),
            bytes.fromhex(salt),
            opslimit=int(ops),
            memlimit=int(mem),
        )
        return SigningKey(SecretBox(key).decrypt(bytes.fromhex(box)))
    except CryptoError as exc:
        raise ConfigError(f"{path}: the passphrase does not open this sealed signing key") from exc
    except ValueError as exc:
        raise ConfigError(f"{path}: a damaged sealed signing key ({exc})") from exc


def seal(path: str | Path, environ: Mapping[str, str] | None = None) -> None:
    """Encrypt the signing key in ``path`` in place with the passphrase of ``environ``."""
    key = load_signing_key(path, environ)
    salt = random(argon2id.SALTBYTES)
    secret = passphrase(os.environ if environ is None else environ, path)
    box = SecretBox(argon2id.kdf(SecretBox.KEY_SIZE, secret, salt, opslimit=OPS, memlimit=MEM))
    sealed = box.encrypt(key.encode())
    Path(path).write_text(f"{SEALED}:{OPS}:{MEM}:{salt.hex()}:{bytes(sealed).hex()}\n")


def passphrase(environ: Mapping[str, str], path: str | Path) -> bytes:
    """The key passphrase: ``FEDPRUNE_KEY_PASSPHRASE``, else the file
    ``FEDPRUNE_KEY_PASSPHRASE_FILE`` names (its first line)."""
    if environ.get(PASSPHRASE_ENV):
        return environ[PASSPHRASE_ENV].encode()
    if environ.get(PASSPHRASE_FILE_ENV):
        file = Path(environ[PASSPHRASE_FILE_ENV])
        try:
            secret = next(iter(file.read_text().splitlines()), "")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file}: unreadable passphrase file ({exc})") from exc
        if secret:
            return secret.encode()
        raise ConfigError(f"{file}: an empty passphrase file")
    raise ConfigError(
        f"{path}: the signing key is sealed (or to be sealed) with a passphrase: set"
        f" {PASSPHRASE_ENV}, or {PASSPHRASE_FILE_ENV} to a file holding it"
    )


def load_verify_key(path: str | Path) -> VerifyKey:
    return VerifyKey(_hex(_read(path, "verify key"), path, "verify key"))


def new_keypair(private: Path, public: Path) -> None:
    """Write a new signing key (mode 0600) and its verify key."""
    key = SigningKey.generate()
    private.parent.mkdir(parents=True, exist_ok=True)
    private.touch(mode=0o600)
    private.write_bytes(key.encode(HexEncoder) + b"\n")
    public.parent.mkdir(parents=True, exist_ok=True)
    public.write_bytes(key.verify_key.encode(HexEncoder) + b"\n")


def _read(path: str | Path, what: str) -> str:
    try:
        return Path(path).read_text().strip()
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such {what} file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable {what} ({exc})") from exc


def _hex(text: str, path: str | Path, what: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ConfigError(f"{path}: a {what} file holds 64 hex characters")
    return raw
