"""End-to-end signatures: who sent a message is checked by its receiver, not taken from the broker.

Ed25519 through PyNaCl (libsodium): about 1 MB of wheels on a device, against about 4 MB for
``cryptography``. Keys are files of 64 hex characters: a signing key (the 32-byte seed, kept
private) and its verify key (public). ``fedprune-provision`` makes them: the coordinator holds
every enrolled device's verify key, each device holds the coordinator's.

A signed message is a small outer map around the exact bytes of the ordinary envelope, so the
signature covers them all (protocol version, kind, run, sender, sequence, body) and nothing is
re-encoded before it is checked. A receiver with a :class:`Trust` that has keys refuses unsigned
messages and messages whose sender it has no key for; that is checked in ``wire.decode``, the one
function every handler reads messages through.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from nacl.encoding import HexEncoder
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from fedprune.protocol.errors import ConfigError, SignatureError

__all__ = ["SigningKey", "Trust", "VerifyKey", "load_signing_key", "load_verify_key", "new_keypair"]


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


def load_signing_key(path: str | Path) -> SigningKey:
    return SigningKey(_hex(path, "signing key"))


def load_verify_key(path: str | Path) -> VerifyKey:
    return VerifyKey(_hex(path, "verify key"))


def new_keypair(private: Path, public: Path) -> None:
    """Write a new signing key (mode 0600) and its verify key."""
    key = SigningKey.generate()
    private.parent.mkdir(parents=True, exist_ok=True)
    private.touch(mode=0o600)
    private.write_bytes(key.encode(HexEncoder) + b"\n")
    public.parent.mkdir(parents=True, exist_ok=True)
    public.write_bytes(key.verify_key.encode(HexEncoder) + b"\n")


def _hex(path: str | Path, what: str) -> bytes:
    try:
        text = Path(path).read_text().strip()
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such {what} file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable {what} ({exc})") from exc
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ConfigError(f"{path}: a {what} file holds 64 hex characters")
    return raw
