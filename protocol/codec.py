"""Sparse tensor payloads: the global model going down and the updates coming back up.

Down (``encode_model``): per tensor its shape, an optional bitmask (``numpy.packbits``, 1 = kept)
and float32 values at the kept positions only. Up (``encode_update``): values at the kept positions
only; both sides know the mask, so it is not sent again. How the values travel is the update's
:class:`Codec`: float32, float16 or int8 with a scale per tensor, optionally only the largest
fraction of them (top-k, a bitmask over the kept positions says which), optionally the whole
payload compressed with zstandard. The container is msgpack. See docs/protocol.md for the layout.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from fedprune.protocol.errors import ShapeError, WireError
from fedprune.protocol.files import write_atomic

try:  # Python 3.14's compression.zstd, or its backport (the "zstd" extra); optional on a device
    from compression import zstd  # type: ignore[import-not-found,unused-ignore]
except ImportError:
    try:
        from backports import zstd  # type: ignore[no-redef,unused-ignore]
    except ImportError:
        zstd = None


class ValueFormat(StrEnum):
    """How an update's values are written: float32, float16, or int8 with a scale per tensor,
    rounded to nearest or (``int8sr``) stochastically."""

    F32 = "f32"
    F16 = "f16"
    INT8 = "int8"
    INT8SR = "int8sr"


_F32 = np.dtype("<f4")
_FORMATS: dict[ValueFormat, np.dtype[Any]] = {
    ValueFormat.F32: np.dtype("<f4"),
    ValueFormat.F16: np.dtype("<f2"),
    ValueFormat.INT8: np.dtype("i1"),
    ValueFormat.INT8SR: np.dtype("i1"),
}
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_LEVEL = 3
"""zstandard's default level: about 1 ms for a 100 kB update on a Pi 4 class core."""


@dataclass(frozen=True)
class Codec:
    """How an update's values travel: ``values`` their number format (``f32``; ``f16``;
    ``int8`` with a scale per tensor, rounded to nearest, or ``int8sr`` stochastically rounded),
    ``topk`` the fraction of the kept positions sent (the largest in magnitude; 0 = all) and
    ``zstd`` a lossless compression of the whole payload. Written as its parts joined by ``+``,
    e.g. ``int8+top0.1+zstd``; a lossy codec is used with error feedback (:class:`Residual`)."""

    values: ValueFormat = ValueFormat.F32
    topk: float = 0.0
    zstd: bool = False

    @classmethod
    def parse(cls, text: str) -> Codec:
        """A codec from its name; ``ValueError`` with what is wrong."""
        values, topk, packed = ValueFormat.F32, 0.0, False
        for part in text.strip().split("+"):
            if part in _FORMATS:
                values = ValueFormat(part)
            elif part == "zstd":
                packed = True
            elif match := re.fullmatch(r"top(0?\.\d+)", part):
                topk = float(match.group(1))
            else:
                raise ValueError(
                    f"unknown codec part {part!r} in {text!r} (parts: f32, f16, int8, int8sr,"
                    " topF with 0 < F < 1 such as top0.1, zstd; joined by +)"
                )
        if not 0.0 <= topk < 1.0:
            raise ValueError(f"top-k fraction must be in (0, 1), got {topk} in {text!r}")
        return cls(values=values, topk=topk, zstd=packed)

    @property
    def name(self) -> str:
        parts = [self.values] + ([f"top{self.topk:g}"] if self.topk else [])
        return "+".join(parts + (["zstd"] if self.zstd else []))

    @property
    def lossy(self) -> bool:
        return self.values is not ValueFormat.F32 or self.topk > 0

    def features(self) -> set[str]:
        """What a device must support to use it (the names a hello lists)."""
        return (
            {self.values} | ({"topk"} if self.topk else set()) | ({"zstd"} if self.zstd else set())
        )


F32 = Codec()
INT8 = Codec(values=ValueFormat.INT8)


def features() -> list[str]:
    """The codec parts this installation can encode (``zstd`` when a zstandard module is here)."""
    return [*_FORMATS, "topk", *(["zstd"] if zstd is not None else [])]


def default_codec(uplink_kbps: int) -> Codec:
    """The codec a device picks for its uplink when the run does not force one: float16 on a
    fast link, int8 on a medium one, and top-k int8 compressed on a slow one (when it can)."""
    if uplink_kbps >= 50_000:
        return Codec(values=ValueFormat.F16)
    if uplink_kbps >= 10_000:
        return Codec(values=ValueFormat.INT8)
    return Codec(values=ValueFormat.INT8, topk=0.1, zstd=zstd is not None)


@dataclass(frozen=True, kw_only=True)
class Model:
    """Global weights (in the stripped model's ``get_weights`` order) and their masks.

    ``exact`` names the tensors that are statistics, not learned by gradient (a
    BatchNormalization's moving mean and variance, which each device sets from its data): every
    update and model delta carries them in float32, every value, whatever the codec (1.12). A
    rounded, sparsified or residual-delayed statistic is not a late gradient but a wrong value:
    error feedback re-sent stale variance changes on top of new ones, and drove a variance below
    zero, which makes the model's every output NaN."""

    weights: list[np.ndarray]
    masks: list[np.ndarray | None]
    exact: frozenset[int] = frozenset()

    def codec(self, index: int, codec: Codec) -> Codec:
        """How tensor ``index`` travels in a payload of ``codec``."""
        return F32 if index in self.exact else codec

    def kept(self, index: int) -> int:
        """Number of values sent for tensor ``index``."""
        mask = self.masks[index]
        return int(self.weights[index].size if mask is None else np.count_nonzero(mask))


@dataclass(frozen=True, kw_only=True)
class Update:
    """A client's result for one round: the delta at kept positions, sample count and metrics."""

    round: int
    num_samples: int
    deltas: list[np.ndarray]
    metrics: dict[str, float] = field(default_factory=dict)
    codec: str = "f32"  # how it travelled (decoded payloads say; encoding takes a Codec)
    # SCAFFOLD (1.13): the change of the device's control variate, in the update's codec, at the
    # same positions as ``deltas``; None without.
    control: list[np.ndarray] | None = None


def _values(array: np.ndarray, mask: np.ndarray | None) -> bytes:
    flat = np.asarray(array, dtype=_F32).reshape(-1)
    if mask is not None:
        flat = flat[mask.reshape(-1).astype(bool)]
    return flat.tobytes()


def _unpack(raw: bytes, expected: int, what: str) -> np.ndarray:
    if len(raw) != expected * _F32.itemsize:
        raise ShapeError(f"{what}: expected {expected} float32 values, got {len(raw)} bytes")
    return np.frombuffer(raw, dtype=_F32)


def _load(payload: bytes) -> Any:
    try:
        return msgpack.unpackb(payload, raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise WireError(f"undecodable payload ({exc or type(exc).__name__})") from exc


def _declared_limit(tensor: Any) -> int:
    """The most weights a tensor's own bytes can describe: one mask bit each, or four value
    bytes each when it has no mask."""
    mask, values = tensor["mask"], tensor["values"]
    return 8 * len(mask) if mask is not None else len(values) // _F32.itemsize


def encode_model(model: Model) -> bytes:
    tensors = []
    for weight, mask in zip(model.weights, model.masks, strict=True):
        bits = None if mask is None else np.packbits(mask.reshape(-1).astype(bool)).tobytes()
        tensors.append({"shape": list(weight.shape), "mask": bits, "values": _values(weight, mask)})
    body = {"tensors": tensors, "exact": sorted(model.exact)}
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


def decode_model(payload: bytes) -> Model:
    weights: list[np.ndarray] = []
    masks: list[np.ndarray | None] = []
    try:
        body = _load(payload)
        for i, tensor in enumerate(body["tensors"]):
            shape = tuple(int(d) for d in tensor["shape"])
            size = math.prod(shape)
            if min(shape, default=0) < 0 or size > _declared_limit(tensor):
                # Checked before anything is allocated: the declared shape must be paid for by
                # the bytes that came with it (a mask bit or four value bytes per weight).
                raise ShapeError(f"tensor {i}: shape {list(shape)} does not fit its data")
            mask = None
            if tensor["mask"] is not None:
                bits = np.unpackbits(np.frombuffer(tensor["mask"], np.uint8), count=size)
                mask = bits.astype(np.float32).reshape(shape)
            dense = np.zeros(size, dtype=np.float32)
            kept = size if mask is None else int(np.count_nonzero(mask))
            values = _unpack(tensor["values"], kept, f"tensor {i}")
            if mask is None:
                dense[:] = values
            else:
                dense[mask.reshape(-1).astype(bool)] = values
            weights.append(dense.reshape(shape))
            masks.append(mask)
        exact = frozenset(int(i) for i in body.get("exact", []))
        if not all(0 <= i < len(weights) for i in exact):
            raise ShapeError(f"exact tensors {sorted(exact)} named in a model of {len(weights)}")
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
        raise WireError(f"malformed model payload ({exc})") from exc
    return Model(weights=weights, masks=masks, exact=exact)


def encode_delta(base: Model, target: Model, codec: Codec = INT8) -> bytes:
    """``target`` as a change to ``base`` (the model a device holds): per tensor the target's
    mask when it differs from the base's, and the difference at the kept positions in ``codec``
    (a value format, optionally top-k and zstd; ``int8sr`` goes as ``int8``: rounding must be
    the same on every device). What a device rebuilds from it is :func:`apply_delta`'s result,
    which is not ``target`` exactly when the codec rounds or leaves values out: publish that, not
    ``target``, and take the next change against it (so nothing is lost, only late)."""
    chosen = codec
    if chosen.values is ValueFormat.INT8SR:
        chosen = dataclasses.replace(chosen, values=ValueFormat.INT8)
    rng = np.random.default_rng(0)
    tensors = []
    for i, (old, new, old_mask, new_mask) in enumerate(
        zip(base.weights, target.weights, base.masks, target.masks, strict=True)
    ):
        if (old_mask is None) != (new_mask is None) or old.shape != new.shape:
            raise ShapeError("the base model does not have the target's tensors")
        change = np.asarray(new, np.float32) - np.asarray(old, np.float32)
        values = np.frombuffer(_values(change, new_mask), _F32)
        tensor = _encode_tensor(values, base.codec(i, chosen), rng)
        tensor["mask"] = None
        if new_mask is not None and old_mask is not None and not np.array_equal(old_mask, new_mask):
            tensor["mask"] = np.packbits(new_mask.reshape(-1) != 0).tobytes()
        tensors.append(tensor)
    packed: bytes = msgpack.packb({"codec": chosen.name, "tensors": tensors}, use_bin_type=True)
    return _compress(packed) if chosen.zstd else packed


def apply_delta(base: Model, payload: bytes) -> Model:
    """The model :func:`encode_delta` describes, rebuilt on ``base`` (validated like an update:
    tensor count, mask and value lengths, scales)."""
    try:
        if payload[:4] == _ZSTD_MAGIC:
            payload = _decompress(payload, limit=8 * sum(w.size for w in base.weights) + 2**20)
        body = _load(payload)
        if not isinstance(body, dict):
            raise WireError("malformed model delta (not a map)")
        codec = Codec.parse(str(body["codec"]))
        tensors = body["tensors"]
        if len(tensors) != len(base.weights):
            raise ShapeError(f"a delta of {len(tensors)} tensors for {len(base.weights)}")
        weights: list[np.ndarray] = []
        masks: list[np.ndarray | None] = []
        for i, (tensor, old, old_mask) in enumerate(
            zip(tensors, base.weights, base.masks, strict=True)
        ):
            mask = old_mask
            if tensor["mask"] is not None:
                bits = tensor["mask"]
                if (
                    old_mask is None
                    or not isinstance(bits, bytes)
                    or len(bits) != (old.size + 7) // 8
                ):
                    raise ShapeError(f"tensor {i}: the mask must be {(old.size + 7) // 8} bytes")
                mask = np.unpackbits(np.frombuffer(bits, np.uint8), count=old.size)
                mask = mask.astype(np.float32).reshape(old.shape)
            kept = np.ones(old.size, bool) if mask is None else mask.reshape(-1) != 0
            n = int(np.count_nonzero(kept))
            change = _decode_tensor(tensor, n, base.codec(i, codec), f"tensor {i}")
            new = np.zeros(old.size, np.float32)
            new[kept] = np.asarray(old, np.float32).reshape(-1)[kept] + change
            weights.append(new.reshape(old.shape))
            masks.append(mask)
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
        raise WireError(f"malformed model delta ({exc})") from exc
    return Model(weights=weights, masks=masks, exact=base.exact)


def encode_update(
    update: Update,
    masks: list[np.ndarray | None],
    codec: Codec = F32,
    *,
    rng: np.random.Generator | None = None,
    exact: frozenset[int] = frozenset(),
) -> bytes:
    """The update's values at the kept positions, as ``codec`` says (the ``exact`` tensors in
    float32: Model.exact; ``rng`` draws the stochastic rounding of ``int8sr``)."""
    carried = Model(weights=[], masks=[], exact=exact)
    body: dict[str, Any] = {
        "round": update.round,
        "num_samples": update.num_samples,
        "metrics": update.metrics,
    }
    if codec == F32:  # the layout of protocol 1.6 and before
        key = "values"
    else:
        body["codec"], key = codec.name, "tensors"
    rng = rng or np.random.default_rng()

    def tensors(arrays: list[np.ndarray]) -> list[Any]:
        values = [_values(d, m) for d, m in zip(arrays, masks, strict=True)]
        if codec == F32:
            return values
        return [
            _encode_tensor(np.frombuffer(v, _F32), carried.codec(i, codec), rng)
            for i, v in enumerate(values)
        ]

    body[key] = tensors(update.deltas)
    if update.control is not None:
        body["control"] = tensors(update.control)
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return _compress(packed) if codec.zstd else packed


def _compress(packed: bytes) -> bytes:
    if zstd is None:
        raise WireError("codec zstd needs Python 3.14 or the backports.zstd package")
    return zstd.compress(packed, level=ZSTD_LEVEL)  # type: ignore[no-any-return]


def _encode_tensor(flat: np.ndarray, codec: Codec, rng: np.random.Generator) -> dict[str, Any]:
    """One tensor's kept values: ``sel`` (top-k: which of them are sent, a bitmask), ``q`` the
    values in the codec's format and ``s`` the int8 scale."""
    tensor: dict[str, Any] = {"sel": None}
    if codec.topk and flat.size:
        k = max(1, math.ceil(codec.topk * flat.size))
        chosen = np.zeros(flat.size, dtype=bool)
        chosen[np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :]] = True
        tensor["sel"] = np.packbits(chosen).tobytes()
        flat = flat[chosen]
    if codec.values is ValueFormat.F32:
        tensor["q"] = flat.tobytes()
    elif codec.values is ValueFormat.F16:
        tensor["q"] = np.clip(flat, -65504, 65504).astype("<f2").tobytes()
    else:
        peak = float(np.max(np.abs(flat))) if flat.size else 0.0
        scale = np.float32(peak / 127.0)
        scaled = flat / scale if scale > 0 else np.zeros_like(flat)
        if codec.values is ValueFormat.INT8SR:  # unbiased: up with the fraction's probability
            scaled = np.floor(scaled + rng.random(flat.size, dtype=np.float32))
        tensor["q"] = np.clip(np.rint(scaled), -127, 127).astype("i1").tobytes()
        tensor["s"] = float(scale)
    return tensor


def decode_update(payload: bytes, model: Model) -> Update:
    """Decode an update against the model it was trained from; shapes, counts, index sets and
    scales are checked here, and a compressed payload may not grow past what the model can
    need."""
    try:
        if payload[:4] == _ZSTD_MAGIC:
            payload = _decompress(payload, limit=8 * sum(w.size for w in model.weights) + 2**20)
        body = _load(payload)
        if not isinstance(body, dict):
            raise WireError("malformed update payload (not a map)")
        codec = Codec.parse(str(body.get("codec", "f32")))
        values = body["values"] if "codec" not in body else body["tensors"]
        layout = None if "codec" not in body else codec  # None: 1.6's float32 layout
        control = body.get("control")
        metrics = {str(k): float(v) for k, v in dict(body.get("metrics", {})).items()}
        return Update(
            round=int(body["round"]),
            num_samples=int(body["num_samples"]),
            deltas=_decode_tensors(values, model, layout),
            metrics=metrics,
            codec=codec.name,
            control=None if control is None else _decode_tensors(control, model, layout, "control"),
        )
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
        raise WireError(f"malformed update payload ({exc})") from exc


def _decode_tensors(
    values: Any, model: Model, codec: Codec | None, what: str = "tensor"
) -> list[np.ndarray]:
    """One value per weight of ``model`` at its kept positions, zero elsewhere (``codec`` None:
    the float32 layout of protocol 1.6)."""
    if not isinstance(values, list) or len(values) != len(model.weights):
        count = len(values) if isinstance(values, list) else "no list of"
        raise ShapeError(f"update has {count} {what}s, model has {len(model.weights)} tensors")
    out = []
    for i, (raw, weight, mask) in enumerate(zip(values, model.weights, model.masks, strict=True)):
        n = model.kept(i)
        flat = (
            _unpack(raw, n, f"{what} {i}")
            if codec is None
            else _decode_tensor(raw, n, model.codec(i, codec), f"{what} {i}")
        )
        if mask is None:
            out.append(flat.reshape(weight.shape))
        else:
            dense = np.zeros(weight.size, dtype=np.float32)
            dense[mask.reshape(-1).astype(bool)] = flat
            out.append(dense.reshape(weight.shape))
    return out


def _decode_tensor(tensor: Any, n: int, codec: Codec, what: str) -> np.ndarray:
    """The ``n`` kept values of one tensor (zero where top-k did not send one)."""
    if not isinstance(tensor, dict):
        raise ShapeError(f"{what}: not a map")
    chosen = None
    count = n
    if tensor["sel"] is not None or codec.topk:
        sel = tensor["sel"]
        if not isinstance(sel, bytes) or len(sel) != (n + 7) // 8:
            raise ShapeError(f"{what}: the top-k bitmask must be {(n + 7) // 8} bytes")
        chosen = np.unpackbits(np.frombuffer(sel, np.uint8), count=n).astype(bool)
        count = int(np.count_nonzero(chosen))
    dtype = _FORMATS[codec.values]
    raw = tensor["q"]
    if not isinstance(raw, bytes) or len(raw) != count * dtype.itemsize:
        raise ShapeError(f"{what}: expected {count} {codec.values} values")
    values = np.frombuffer(raw, dtype=dtype).astype(np.float32)
    if dtype.kind == "i":
        scale = float(tensor["s"])
        if not (math.isfinite(scale) and 0.0 <= scale <= 3e38):
            raise ValueError(f"{what}: the int8 scale {scale} is not a finite non-negative number")
        values *= np.float32(scale)
    if chosen is None:
        return values
    flat = np.zeros(n, dtype=np.float32)
    flat[chosen] = values
    return flat


def _decompress(payload: bytes, *, limit: int) -> bytes:
    """A zstandard payload, refused when it would grow past ``limit`` bytes."""
    if zstd is None:
        raise WireError("a zstandard payload, and no zstd module here (backports.zstd)")
    try:
        decompressor = zstd.ZstdDecompressor()
        data: bytes = decompressor.decompress(payload, max_length=limit)
    except zstd.ZstdError as exc:
        raise WireError(f"undecodable zstandard payload ({exc})") from exc
    if not decompressor.eof and len(data) >= limit:
        raise ShapeError(f"a zstandard payload that grows past {limit:,} bytes")
    if not decompressor.eof:
        raise WireError("undecodable zstandard payload (it ends before its frame does)")
    return data


class Residual:
    """Error feedback for a lossy codec: what a device's updates wanted to send and did not (at
    the kept positions), added to its next update, so that nothing is lost, only late. It
    belongs to one coordinator session (``key``) and is forgotten when that changes; where a new
    mask prunes, it is dropped. :meth:`save` and :meth:`load` carry it across a restart."""

    def __init__(self) -> None:
        self.key = ""
        self.values: list[np.ndarray] = []

    def add(
        self, deltas: list[np.ndarray], key: str, masks: list[np.ndarray | None] | None = None
    ) -> list[np.ndarray]:
        """``deltas`` plus what is left over from earlier updates with the same ``key``, where
        ``masks`` keep weights."""
        if key != self.key or [v.shape for v in self.values] != [d.shape for d in deltas]:
            self.key, self.values = key, []
        if not self.values:
            return deltas
        if masks is not None:
            self.values = [
                v if m is None else v * m for v, m in zip(self.values, masks, strict=True)
            ]
        return [d + r for d, r in zip(deltas, self.values, strict=True)]

    def keep(self, wanted: list[np.ndarray], sent: list[np.ndarray], key: str) -> None:
        """Remember what of ``wanted`` did not go out (``sent`` is the payload decoded back)."""
        self.key = key
        self.values = [np.asarray(w - s, np.float32) for w, s in zip(wanted, sent, strict=True)]

    def save(self, path: Path) -> None:
        arrays: dict[str, Any] = {f"r{i:03d}": v for i, v in enumerate(self.values)}
        arrays["key"] = np.array(self.key)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        write_atomic(path, buffer.getvalue())

    @classmethod
    def load(cls, path: Path) -> Residual:
        """The saved residual; an empty one if there is none or it cannot be read."""
        residual = cls()
        try:
            with np.load(path, allow_pickle=False) as saved:
                names = sorted(n for n in saved.files if n.startswith("r"))
                residual.values = [saved[n].astype(np.float32) for n in names]
                residual.key = str(saved["key"])
        except (OSError, KeyError, ValueError):
            return cls()
        return residual
