"""SCAFFOLD on a device (Karimireddy et al. 2020): its own control variate c_i, kept across rounds
and restarts, and the bookkeeping of one round with it.

A round corrects every local gradient by ``c - c_i`` (c: the coordinator's, ``Round.control``);
the device's new variate is the mean raw gradient of its steps (option II, exact for any
optimizer: ``Trainer.mean_gradient``), and its update carries the change ``Δc_i`` in the device's
codec. What it keeps is ``c_i`` plus the change *as the coordinator decodes it*, so that a lossy
codec never lets the two sides disagree; the next change carries what this one did not.

c_i belongs to a run and an architecture (:func:`control_key`): one of another run, or of other
shapes, starts again from zeros. A model rebuilt smaller is of other shapes: every device starts
its c_i again, and so does the coordinator its c (coordinator/scaffold.py), which stays their
mean. Pruned positions are zero on both sides.
"""

from __future__ import annotations

import io
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedprune.protocol.codec import Model
from fedprune.protocol.errors import ShapeError
from fedprune.protocol.files import write_atomic
from fedprune.protocol.messages import Spec, architecture

log = logging.getLogger("fedprune.client")


def control_key(run: str, spec: Spec) -> str:
    """What a control variate belongs to: the run and the SHA-256 of its architecture."""
    return f"{run}/{architecture(spec.model_json)}"


def masked(arrays: list[np.ndarray], masks: list[np.ndarray | None]) -> list[np.ndarray]:
    """``arrays`` as float32, zero where ``masks`` prune."""
    return [
        np.asarray(a if m is None else a * m, np.float32)
        for a, m in zip(arrays, masks, strict=True)
    ]


class ControlVariate:
    """The device's c_i, saved in ``path`` (atomically, no pickle) when it has one."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.key = ""
        self.values: list[np.ndarray] = []
        if path is not None:
            self._load(path)

    def of(self, key: str, model: Model) -> list[np.ndarray]:
        """c_i for a round of ``model`` in ``key`` (zero where it prunes): zeros when the one
        held belongs to another key or has other shapes."""
        if key != self.key or [v.shape for v in self.values] != [w.shape for w in model.weights]:
            return [np.zeros(w.shape, np.float32) for w in model.weights]
        return masked(self.values, model.masks)

    def keep(self, key: str, values: list[np.ndarray]) -> None:
        """Hold ``values`` as c_i of ``key``, and save them when there is a file (a failure to
        write is logged: the next start begins from zeros, the run goes on). Values that are
        not finite (a round that diverged) are not kept: the next round starts from zeros."""
        self.key, self.values = key, [np.asarray(v, np.float32) for v in values]
        if not all(np.all(np.isfinite(v)) for v in self.values):
            log.warning("SCAFFOLD's control variate is not finite: the next round starts at zeros")
            self.values = []
        if self.path is None:
            return
        arrays: dict[str, Any] = {f"c{i:03d}": v for i, v in enumerate(self.values)}
        arrays["key"] = np.array(self.key)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        try:
            write_atomic(self.path, buffer.getvalue())
        except OSError as exc:
            log.warning("cannot keep SCAFFOLD's control variate in %s: %s", self.path, exc)

    def _load(self, path: Path) -> None:
        if not path.exists():
            return
        try:
            with np.load(path, allow_pickle=False) as saved:
                names = sorted(n for n in saved.files if n.startswith("c"))
                values = [saved[n].astype(np.float32) for n in names]
                found = str(saved["key"])
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            log.warning("SCAFFOLD's control variate in %s cannot be read (%s): zeros", path, exc)
            return
        if not all(np.all(np.isfinite(v)) for v in values):
            log.warning("SCAFFOLD's control variate in %s is not finite: zeros", path)
            return
        self.key, self.values = found, values


@dataclass(frozen=True)
class RoundControl:
    """One SCAFFOLD round of a device: the key of its c_i, c_i as the round began (``own``,
    zero where the round's model prunes), and the correction ``c - c_i`` of its steps."""

    key: str
    own: list[np.ndarray]
    correction: list[np.ndarray]

    @classmethod
    def begin(cls, key: str, own: ControlVariate, control: Model, model: Model) -> RoundControl:
        """The round of ``model`` whose c is ``control``, with the device's ``own`` c_i."""
        if [c.shape for c in control.weights] != [w.shape for w in model.weights]:
            raise ShapeError("the round's control variate does not fit its model")
        held = own.of(key, model)
        c = masked(control.weights, model.masks)
        return cls(key=key, own=held, correction=[a - b for a, b in zip(c, held, strict=True)])

    def change(self, gradient: list[np.ndarray], model: Model) -> list[np.ndarray]:
        """Δc_i: the new c_i (the steps' mean raw ``gradient`` at the kept positions) - c_i."""
        fresh = masked(gradient, model.masks)
        return [n - o for n, o in zip(fresh, self.own, strict=True)]

    def sent(self, change: list[np.ndarray]) -> list[np.ndarray]:
        """The c_i the coordinator now counts this device's as: c_i + ``change`` as it decodes
        the update."""
        return [o + c for o, c in zip(self.own, change, strict=True)]
