"""The ``litert`` trainer: trains with ai-edge-litert and numpy only, no TensorFlow on the device.

It runs the run's trainable TFLite artifact (built by ``converters.trainable``), whose signatures
are the contract: ``train(x, y) -> loss`` (one optimizer step on one fixed-size batch, masks
applied after it), ``infer(x) -> probs``, ``get_weights() -> w000...``, ``set_weights(w000=...)``
(which also resets the optimizer state: a new round starts fresh) and ``set_masks(m000=...)``; with
BatchNormalization also ``moments(x)``, which sets the moving statistics at the end of a round
(``trainer.calibrated``); since protocol 1.13 also ``set_lr(lr)``, for a round's learning rate.
FedProx's term (``Spec.prox_mu``) is built into the artifact's ``train``; for a SCAFFOLD run
(``Spec.scaffold``) the artifact also has ``set_correction(c000=...)`` and ``get_gradient()``.
The weights are ordered as the stripped Keras model's ``get_weights()``, like every payload on the
wire.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from fedprune.edge_client.task import Evaluation
from fedprune.edge_client.trainer import EpochHook, Trainer, batches, calibrated
from fedprune.protocol.codec import Model
from fedprune.protocol.errors import ModelError
from fedprune.protocol.messages import Spec

SIGNATURES = ("train", "infer", "get_weights", "set_weights", "set_masks")
"""The signature keys every training artifact holds: the contract with converters.trainable."""
SET_LR = "set_lr"
"""The signature that sets the learning rate of the steps that follow (1.13). An artifact built by
an older coordinator lacks it, and then trains at the Spec's rate only."""
MOMENTS = "moments"
"""The signature an artifact of a model with BatchNormalization holds too: the batch statistics
its moving mean and variance follow, by weight name."""
SET_CORRECTION, GET_GRADIENT = "set_correction", "get_gradient"
SCAFFOLD_SIGNATURES = (SET_CORRECTION, GET_GRADIENT)
"""The signatures of an artifact built for SCAFFOLD (``build_trainable(scaffold=True)``): the
correction added to each step's gradients, and the mean raw gradient of the steps since
``set_weights``."""


def _name(prefix: str, index: int) -> str:
    return f"{prefix}{index:03d}"


class LiteRTTrainer(Trainer):
    needs_artifact = True

    def __init__(self, spec: Spec, *, artifact: bytes | None = None) -> None:
        super().__init__(spec)
        if artifact is None:
            raise ModelError("the litert trainer needs the run's trainable TFLite artifact")
        try:
            # The default XNNPACK delegate (unlike for sparse int8 exports) runs this float
            # artifact, about 7x faster for the CNN than builtin kernels, with the same results.
            self._interpreter = Interpreter(model_content=artifact)
            found = self._interpreter.get_signature_list()
            missing = [s for s in SIGNATURES if s not in found]
            if missing:
                raise ModelError(f"the training artifact lacks signature(s) {', '.join(missing)}")
            self._run: dict[str, Any] = {
                s: self._interpreter.get_signature_runner(s)
                for s in (*SIGNATURES, SET_LR, MOMENTS, *SCAFFOLD_SIGNATURES)
                if s in found
            }
        except ValueError as exc:
            raise ModelError(f"LiteRT cannot load the training artifact: {exc}") from exc
        if spec.scaffold and not all(s in found for s in SCAFFOLD_SIGNATURES):
            raise ModelError(
                f"the training artifact has no {SET_CORRECTION} and {GET_GRADIENT} signatures"
                " (built without SCAFFOLD): it cannot train this SCAFFOLD run"
            )
        x_detail = self._run["train"].get_input_details()["x"]
        self._batch = int(x_detail["shape"][0])
        self._input_shape = tuple(int(d) for d in x_detail["shape"][1:])
        self._y_dtype = self._run["train"].get_input_details()["y"]["dtype"]
        self._gradient: list[np.ndarray] = []  # SCAFFOLD: the last fit's mean raw gradient
        (output,) = self._run["infer"].get_output_details().values()
        self._output_shape = tuple(int(d) for d in output["shape"][1:])

    @property
    def batch_size(self) -> int:
        """The artifact's: its signatures have a fixed batch (the coordinator's batch size)."""
        return self._batch

    def _set(self, weights: list[np.ndarray], masks: list[np.ndarray | None] | None) -> None:
        self._run["set_weights"](
            **{_name("w", i): np.asarray(w, np.float32) for i, w in enumerate(weights)}
        )
        ones = [None] * len(weights) if masks is None else masks
        self._run["set_masks"](
            **{
                _name("m", i): np.ones(w.shape, np.float32) if m is None else m.astype(np.float32)
                for i, (w, m) in enumerate(zip(weights, ones, strict=True))
            }
        )

    def _set_rate(self, lr: float) -> None:
        """Have the artifact train at ``lr``. Set on every round, not only when it differs from
        the Spec's: the artifact keeps the last rate set. An artifact without ``set_lr`` trains
        at the rate it was built with, the Spec's."""
        if SET_LR in self._run:
            self._run[SET_LR](lr=np.array([lr], np.float32))  # rank 1: see converters.trainable
        elif lr != self.spec.learning_rate:
            raise ModelError(
                f"the training artifact has no {SET_LR} signature (built by a coordinator older"
                f" than protocol 1.13): it cannot train at this round's learning rate {lr:g}"
            )

    def _read(self, key: str, prefix: str) -> list[np.ndarray]:
        """What signature ``key`` gives, one array per weight, named ``prefix`` and its index."""
        out = self._run[key]()
        return [np.array(out[_name(prefix, i)], np.float32) for i in range(len(out))]

    def _set_correction(
        self, shapes: list[tuple[int, ...]], correction: list[np.ndarray] | None
    ) -> None:
        """SCAFFOLD: the correction of this fit's steps (``None``: zeros), set each fit, since the
        artifact keeps the last one set."""
        self._run[SET_CORRECTION](
            **{
                _name("c", i): np.asarray(
                    np.zeros(shape) if correction is None else correction[i], np.float32
                )
                for i, shape in enumerate(shapes)
            }
        )

    def fit(
        self,
        model: Model,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        seed: int,
        on_epoch: EpochHook | None = None,
        learning_rate: float | None = None,
        correction: list[np.ndarray] | None = None,
    ) -> list[np.ndarray]:
        self._check_scaffold(correction)
        self._set_rate(self._rate(learning_rate))
        self._set(model.weights, model.masks)
        if self.spec.scaffold:
            self._set_correction([w.shape for w in model.weights], correction)
        x = x.reshape((-1, *self._input_shape)).astype(np.float32)
        y = self.task.targets(x, y, self._output_shape).astype(self._y_dtype)
        rng = np.random.default_rng(seed)
        for epoch in range(1, epochs + 1):
            for idx in batches(len(x), self._batch, rng):
                self._run["train"](x=x[idx], y=y[idx])
            if on_epoch is not None:
                on_epoch(epoch)
        weights = self._read("get_weights", "w")
        if self.spec.scaffold:  # read now: evaluate's set_weights starts the sums again
            self._gradient = self._read(GET_GRADIENT, "g")
        if MOMENTS not in self._run:
            return weights
        statistics = (
            {int(name[1:]): value for name, value in self._run[MOMENTS](x=x[idx]).items()}
            for idx in batches(len(x), self._batch, np.random.default_rng(seed))
        )
        return calibrated(weights, statistics)

    def mean_gradient(self) -> list[np.ndarray]:
        if not self.spec.scaffold:
            raise ValueError("the mean gradient is kept for a SCAFFOLD run only")
        return list(self._gradient)

    def evaluate(self, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> Evaluation:
        self._set(weights, None)
        x = x.reshape((-1, *self._input_shape)).astype(np.float32)
        outputs = []
        for start in range(0, len(x), self._batch):
            batch = x[start : start + self._batch]
            padded = np.resize(batch, (self._batch, *self._input_shape))  # fixed batch size
            (out,) = self._run["infer"](x=padded).values()
            outputs.append(out[: len(batch)])
        return self.task.evaluate(np.concatenate(outputs), x, y)
