"""Sparse tensor payloads: the global model going down and the updates coming back up.

Down (``encode_model``): per tensor its shape, an optional bitmask (``numpy.packbits``, 1 = kept)
and float32 values at the kept positions only. Up (``encode_update``): values at the kept positions
only; both sides know the mask, so it is not sent again. Values are little-endian float32; the
container is msgpack. See docs/protocol.md for the layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from fedprune.edge_client.errors import ShapeError, WireError

_F32 = np.dtype("<f4")


@dataclass(frozen=True, kw_only=True)
class Model:
    """Global weights (in the stripped model's ``get_weights`` order) and their masks."""

    weights: list[np.ndarray]
    masks: list[np.ndarray | None]

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
    return msgpack.packb({"tensors": tensors}, use_bin_type=True)  # type: ignore[no-any-return]


def decode_model(payload: bytes) -> Model:
    weights: list[np.ndarray] = []
    masks: list[np.ndarray | None] = []
    try:
        for i, tensor in enumerate(_load(payload)["tensors"]):
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
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
        raise WireError(f"malformed model payload ({exc})") from exc
    return Model(weights=weights, masks=masks)


def encode_update(update: Update, masks: list[np.ndarray | None]) -> bytes:
    body = {
        "round": update.round,
        "num_samples": update.num_samples,
        "metrics": update.metrics,
        "values": [_values(d, m) for d, m in zip(update.deltas, masks, strict=True)],
    }
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


def decode_update(payload: bytes, model: Model) -> Update:
    """Decode an update against the model it was trained from; shapes are checked here."""
    try:
        body = _load(payload)
        values = body["values"]
        if len(values) != len(model.weights):
            raise ShapeError(f"update has {len(values)} tensors, model has {len(model.weights)}")
        deltas = []
        for i, (raw, weight, mask) in enumerate(
            zip(values, model.weights, model.masks, strict=True)
        ):
            flat = _unpack(raw, model.kept(i), f"tensor {i}")
            if mask is None:
                deltas.append(flat.reshape(weight.shape))
            else:
                dense = np.zeros(weight.size, dtype=np.float32)
                dense[mask.reshape(-1).astype(bool)] = flat
                deltas.append(dense.reshape(weight.shape))
        metrics = {str(k): float(v) for k, v in dict(body.get("metrics", {})).items()}
        return Update(
            round=int(body["round"]),
            num_samples=int(body["num_samples"]),
            deltas=deltas,
            metrics=metrics,
        )
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
        raise WireError(f"malformed update payload ({exc})") from exc
