"""Structural pruning: whole channels, together with every channel coupled to them, and the smaller
model without them.

A *unit* is one output channel of a layer that makes new channels, a *producer*: a Dense, Conv1D
or Conv2D layer (a column of its kernel) or a SeparableConv2D (a column of its pointwise kernel).
Channels are *coupled* when one cannot go without the other (DepGraph, Fang et al. 2023): the
inputs of an ``Add`` (``Subtract``, ``Multiply``, ``Average``, ``Maximum``, ``Minimum``) channel by
channel, and so what made them and what consumes them; a depthwise convolution's outputs follow
its input's channels; a ``Concatenate`` lines its inputs' channels up one after the other; Flatten
and global pooling pass channels on to the next Dense. :class:`Coupling` walks the model's graph
and finds the *groups* of coupled channels, and their *families*: the groups the same producers
make (a residual stage: its convolutions and its projection). A group that reaches the model's
input or output is never pruned, so the last producer (the classes) keeps all its units.

Unit masks live in the TF-MOT wrappers' own mask variables, as weight masks do (a pruned unit is a
slice of zeros there), so stripping, checkpoints and the wire see nothing new.
:meth:`Coupling.silence` holds what a removed group gives at zero; :func:`rebuild` then makes the
physically smaller model: fewer units, every layer on the way cut to match (after Flatten too),
and what a removed channel still carries, a constant, folded into the next producer's bias. It
gives the same outputs as the masked model it came from. A layer whose channels cannot be cut
(one it does not know, a softmax, a Reshape that moves the channels, ...) is carried over as it
is, and the channels around it stay; :func:`check` says which, and refuses in one line a model
with nothing to remove, a nested model, or a layer used twice.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tf_keras

from fedprune.converters import graph
from fedprune.coordinator.global_model import Cutter
from fedprune.protocol.errors import ConfigError

log = logging.getLogger("fedprune.coordinator")

layers = tf_keras.layers

_PRODUCERS: dict[type, str] = {
    layers.Dense: "units",
    layers.Conv1D: "filters",
    layers.Conv2D: "filters",
    layers.SeparableConv2D: "filters",
}
"""Layers whose units can be removed, and the config key that counts them."""
_ACTIVATIONS = (layers.Activation, layers.ReLU, layers.LeakyReLU, layers.ELU)
_PASS = (
    layers.Dropout,
    layers.MaxPooling1D,
    layers.MaxPooling2D,
    layers.AveragePooling1D,
    layers.AveragePooling2D,
    layers.GlobalAveragePooling1D,
    layers.GlobalAveragePooling2D,
    layers.GlobalMaxPooling1D,
    layers.GlobalMaxPooling2D,
    layers.ZeroPadding1D,
    layers.ZeroPadding2D,
    layers.BatchNormalization,
    layers.Reshape,
    *_ACTIVATIONS,
)
"""Layers that pass each channel on by itself (a constant channel stays constant, but for the
border a zero padding adds)."""


def _multiply(values: list[np.ndarray]) -> np.ndarray:
    spread = np.broadcast_arrays(*values)
    return np.where(np.any(np.equal(spread, 0), axis=0), 0.0, np.prod(spread, axis=0))


_MERGES: dict[type, Callable[[list[np.ndarray]], np.ndarray]] = {
    layers.Add: lambda v: np.sum(np.broadcast_arrays(*v), axis=0),
    layers.Subtract: lambda v: v[0] - v[1],
    layers.Average: lambda v: np.mean(np.broadcast_arrays(*v), axis=0),
    layers.Maximum: lambda v: np.max(np.broadcast_arrays(*v), axis=0),
    layers.Minimum: lambda v: np.min(np.broadcast_arrays(*v), axis=0),
    layers.Multiply: _multiply,
}
"""Layers that combine their inputs channel by channel, on the constants removed channels carry
(NaN: a channel of width-1 input that is not constant, broadcast over the channels)."""

_SHAPES = (layers.DepthwiseConv2D, layers.Concatenate, layers.Flatten, layers.Softmax)
"""The other layers the walk follows: channels repeated, lined up, spread over positions."""


def check(model: tf_keras.Model) -> None:
    """``ConfigError``, in one line, unless unit pruning can remove channels of ``model``; logs
    the layers whose channels it leaves alone."""
    coupling = Coupling(model)
    around = "; ".join(coupling.opaque)
    if not coupling.size:
        reason = f" (it keeps those around {around})" if around else ""
        raise ConfigError(
            f"unit pruning finds no channels it can remove in model {model.name!r}{reason}"
        )
    if around:
        log.info("unit pruning keeps the channels around %s", around)


def unit_layers(model: tf_keras.Model) -> list[str]:
    """The producers with units that may be pruned (all but those whose channels reach the
    model's input or output), in call order."""
    return Coupling(model).producers


def unit_norms(kernel: np.ndarray, order: int) -> np.ndarray:
    """Each unit's L1 (``order`` 1) or L2 norm: over every axis of the kernel but the last."""
    flat = np.abs(kernel.reshape(-1, kernel.shape[-1]))
    norms = flat.sum(axis=0) if order == 1 else np.sqrt((flat**2).sum(axis=0))
    return np.asarray(norms, np.float64)


def alive(mask: np.ndarray) -> np.ndarray:
    """Which units of a kernel mask keep any weight."""
    return np.asarray(mask.reshape(-1, mask.shape[-1]).any(axis=0), bool)


def _refused(model: Any, reason: str) -> ConfigError:
    return ConfigError(f"unit pruning cannot rebuild model {model.name!r}: {reason}")


class Coupling:
    """The groups of coupled channels of ``model`` (see the module docstring).

    Groups are numbered 0..G-1 (``size`` G). ``channels[i]`` gives, for each channel of call
    ``i``'s output, its group (-1: never pruned); ``units[name]`` the same for each unit of
    producer ``name``; ``families`` maps each family's name (its producers joined by ``+``) to its
    groups.
    """

    def __init__(self, model: tf_keras.Model) -> None:
        for layer in model.layers:
            if isinstance(layer, tf_keras.Model):
                raise _refused(model, f"{graph.named(layer)} is a nested model")
        self.model = model
        self.calls = graph.calls(model, _refused)
        self.width = int(model.input_shape[-1])
        self._parent: list[int] = []
        self.opaque: list[str] = []  # the layers whose channels stay, and why
        source = self._fresh(self.width)
        self._pinned = list(source)  # the input's channels, and channels broadcast to others
        outputs: list[np.ndarray] = []
        self.carried: set[int] = set()  # the calls of those layers: carried over as they are
        for i, (layer, inputs) in enumerate(self.calls):
            ins = [source if j < 0 else outputs[j] for j in inputs]
            before = len(self.opaque)
            outputs.append(self._atoms(layer, ins, last=i == len(self.calls) - 1))
            if len(self.opaque) > before:
                self.carried.add(i)
        pinned = {self._find(a) for a in (*self._pinned, *outputs[-1])}
        group: dict[int, int] = {}  # root atom -> group
        owners: list[list[str]] = []  # group -> its producers, in call order
        for (layer, _), atoms in zip(self.calls, outputs, strict=True):
            for atom in atoms if type(layer) in _PRODUCERS else ():
                root = self._find(atom)
                if root in pinned:
                    continue
                if root not in group:
                    group[root] = len(group)
                    owners.append([])
                if layer.name not in owners[group[root]]:
                    owners[group[root]].append(layer.name)

        def groups_of(atoms: np.ndarray) -> np.ndarray:
            return np.array([group.get(self._find(a), -1) for a in atoms], np.int64)

        self.size = len(group)
        self.channels = [groups_of(atoms) for atoms in outputs]
        self._call_of = {layer.name: i for i, (layer, _) in enumerate(self.calls)}
        self.units = {
            layer.name: self.channels[i]
            for i, (layer, _) in enumerate(self.calls)
            if type(layer) in _PRODUCERS
        }
        self.producers = [name for name, g in self.units.items() if (g >= 0).any()]
        families: dict[str, list[int]] = {}
        for g, names in enumerate(owners):
            families.setdefault("+".join(names), []).append(g)
        self.families = {name: np.array(g, np.int64) for name, g in families.items()}

    # --- the walk: each channel an atom, coupled atoms joined (union-find) -----------------

    def _fresh(self, width: int) -> np.ndarray:
        start = len(self._parent)
        self._parent.extend(range(start, start + width))
        return np.arange(start, start + width)

    def _find(self, atom: int) -> int:
        while self._parent[atom] != atom:
            self._parent[atom] = self._parent[self._parent[atom]]
            atom = self._parent[atom]
        return int(atom)

    def _atoms(self, layer: Any, ins: list[np.ndarray], *, last: bool) -> np.ndarray:
        """The atoms of ``layer``'s output channels, given its inputs'."""
        kind = type(layer)
        if reason := self._opaque(layer, ins[0].size, last=last):
            # its channels cannot be cut: those around it stay, the layer is carried as it is
            self.opaque.append(f"{graph.named(layer)}: {reason}")
            self._pinned.extend(a for atoms in ins for a in atoms)
            out = self._fresh(int(layer.output_shape[-1]))
            self._pinned.extend(out)
            return out
        if kind in _PRODUCERS:
            return self._fresh(int(getattr(layer, _PRODUCERS[kind])))
        if kind is layers.DepthwiseConv2D:
            return np.repeat(ins[0], layer.depth_multiplier)
        if kind in _MERGES:
            wide = max(a.size for a in ins)
            first = next(a for a in ins if a.size == wide)
            for a in ins:
                if a.size == wide and wide > 1:
                    for x, y in zip(a, first, strict=True):
                        self._parent[self._find(x)] = self._find(y)
                else:  # broadcast over every channel (or one channel each): none can go alone
                    self._pinned.extend(a)
            return first
        if kind is layers.Concatenate:
            return np.concatenate(ins)
        if kind is layers.Flatten:
            return np.tile(ins[0], int(np.prod(layer.input_shape[1:-1])))
        return ins[0]

    @staticmethod
    def _opaque(layer: Any, width: int, *, last: bool) -> str:
        """Why the channels through ``layer`` cannot be cut ("" if they can)."""
        kind = type(layer)
        activation = getattr(getattr(layer, "activation", None), "__name__", "")
        reasons = {
            "channels_first data": (
                getattr(layer, "data_format", "channels_last") != "channels_last"
            ),
            "a softmax mixes its channels": (
                ("softmax" in activation or kind is layers.Softmax) and not last  # or softmax_v2
            ),
            "a grouped convolution": getattr(layer, "groups", 1) != 1,
            "it does not concatenate the channels": (
                kind is layers.Concatenate and layer.axis not in (-1, len(layer.input_shape[0]) - 1)
            ),
            "it does not keep the channels as its last axis": (
                kind is layers.Reshape and tuple(layer.target_shape)[-1:] != (width,)
            ),
            "it does not normalize the last axis": (
                kind is layers.BatchNormalization
                and layer.axis not in ([-1], [len(layer.input_shape) - 1])
            ),
            "a layer unit pruning does not cut": kind
            not in (*_PRODUCERS, *_PASS, *_MERGES, *_SHAPES),
        }
        return next((reason for reason, found in reasons.items() if found), "")

    # --- what the pruner asks -----------------------------------------------------------------

    def alive(self, masks: dict[str, np.ndarray]) -> np.ndarray:
        """Which groups any unit of the producers' kernel ``masks`` (by name) keeps."""
        kept = np.zeros(self.size, bool)
        for name, groups in self.units.items():
            units = alive(masks[name]) if name in masks else np.ones(groups.size, bool)
            kept[groups[units & (groups >= 0)]] = True
        return kept

    def norms(self, kernels: dict[str, np.ndarray], order: int) -> np.ndarray:
        """Each group's norm: the summed L1 or L2 norms of its producers' units."""
        total = np.zeros(self.size)
        for name, groups in self.units.items():
            member = groups >= 0
            norms = unit_norms(kernels[name], order)[member]
            total += np.bincount(groups[member], weights=norms, minlength=self.size)
        return total

    def kept(self, call: int, groups: np.ndarray) -> np.ndarray:
        """Which channels of call ``call``'s output (-1: the input; a producer's call: its
        units) stay when only ``groups`` (a boolean per group) stay."""
        if call < 0:
            return np.ones(self.width, bool)
        channels = self.channels[call]
        return np.where(channels >= 0, groups[np.maximum(channels, 0)], True)

    def producer_kept(self, name: str, groups: np.ndarray) -> np.ndarray:
        """Which units of producer ``name`` stay when only ``groups`` stay."""
        return self.kept(self._call_of[name], groups)

    def silence(self, groups: np.ndarray) -> None:
        """Make the channels of the groups ``groups`` leaves out give exactly zero: their
        producers' bias, the depthwise biases and the scale, shift and running mean of the
        BatchNormalization layers on their way held at zero (with an activation of zero that is
        zero nothing is left for a producer to fold, and a same-padded convolution next does not
        keep them)."""
        for i, (layer, _) in enumerate(self.calls):
            if type(layer) is layers.BatchNormalization:
                variables = [layer.gamma, layer.beta, layer.moving_mean]
            elif type(layer) in _PRODUCERS or type(layer) is layers.DepthwiseConv2D:
                variables = [layer.bias] if layer.use_bias else []
            else:
                continue
            kept = self.kept(i, groups)
            for variable in variables:
                if variable is not None:
                    variable.assign(variable.numpy() * kept)


def rebuild(
    model: tf_keras.Model, masks: dict[str, np.ndarray], keep: dict[str, np.ndarray]
) -> tuple[tf_keras.Model, dict[str, np.ndarray], Cutter]:
    """The model without the units ``keep`` leaves out (by producer name, a boolean per unit),
    with the weights of ``model`` and its kernel ``masks`` (by layer name) cut to match. A group
    stays if any of its units does, and so does a removed group whose constant output cannot be
    folded into the next producer (a convolution with ``same`` padding or no bias next).
    Returns the new model, its kernel masks, and what cuts other arrays laid out as the
    model's weights the same way (:data:`Cutter`)."""
    coupling = Coupling(model)
    groups = coupling.alive(
        {name: np.asarray(units, bool)[None, :] for name, units in keep.items()}
    )
    while True:
        cut = _Cut(coupling, masks, groups)
        config = cut.walk()
        if not cut.stuck:
            break
        groups[sorted(cut.stuck)] = True
        for family, members in coupling.families.items():
            if count := len(cut.stuck.intersection(members.tolist())):
                log.warning(
                    "unit pruning keeps %d removed unit(s) of %s in the rebuilt model: they"
                    " give a constant no bias next can stand for (a convolution next pads with"
                    " zeros, has no bias, or a gate varies it)",
                    count,
                    family,
                )
    rebuilt = type(model).from_config(config)
    for layer in rebuilt.layers:
        if layer.name in cut.weights:
            layer.set_weights(cut.weights[layer.name])
    return rebuilt, cut.masks, _cutter(model, rebuilt, cut.slices)


Slice = Callable[[list[np.ndarray]], list[np.ndarray]]
"""How one layer's weights are cut (without the constants folded into its bias)."""


def _unchanged(values: list[np.ndarray]) -> list[np.ndarray]:
    return values


def _cutter(old: Any, new: Any, slices: dict[str, Slice]) -> Cutter:
    """Cuts arrays laid out as ``old``'s weights to ``new``'s, layer by layer, by ``slices``
    (a layer without one is carried as it is)."""
    old_at = {id(v): i for i, v in enumerate(old.weights)}
    new_at = {id(v): i for i, v in enumerate(new.weights)}
    layers_of = [
        (
            la.name,
            [old_at[id(v)] for v in la.weights],
            [new_at[id(v)] for v in new.get_layer(la.name).weights],
        )
        for la in old.layers
        if la.weights
    ]

    def cut(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        out: list[np.ndarray] = [np.zeros(0)] * len(new_at)
        for name, before, after in layers_of:
            values = [np.asarray(arrays[i]) for i in before]
            for i, value in zip(after, slices.get(name, _unchanged)(values), strict=True):
                out[i] = value
        return out

    return cut


class _Cut:
    """One walk of :func:`rebuild`: each call's weights, kernel mask and config cut to the
    channels that stay, and the constant each removed channel carries (NaN for those that stay,
    and varying ones), folded into the bias of the producer that takes it. ``stuck``: the groups
    whose constant could not be folded."""

    def __init__(
        self, coupling: Coupling, masks: dict[str, np.ndarray], groups: np.ndarray
    ) -> None:
        self.coupling, self.old_masks, self.groups = coupling, masks, groups
        self.stuck: set[int] = set()
        self.weights: dict[str, list[np.ndarray]] = {}
        self.masks: dict[str, np.ndarray] = {}
        # layer -> how its weights are cut (the weights then take the folded constants too)
        self.slices: dict[str, Slice] = {}

    def walk(self) -> dict[str, Any]:
        """The new model's config (``weights`` and ``masks`` filled on the way)."""
        config: dict[str, Any] = copy.deepcopy(self.coupling.model.get_config())
        entries = {entry["config"]["name"]: entry["config"] for entry in config["layers"]}
        consts: list[np.ndarray] = []
        for layer, inputs in self.coupling.calls:
            entry = entries[layer.name]
            entry.pop("build_config", None)  # the old input shape
            ins = [np.full(self.coupling.width, np.nan) if j < 0 else consts[j] for j in inputs]
            consts.append(self._call(layer, len(consts), inputs[0], ins, entry))
        return config

    def _call(
        self, layer: Any, i: int, source: int, ins: list[np.ndarray], entry: dict[str, Any]
    ) -> np.ndarray:
        """Cut call ``i`` of ``layer`` (its first input: call ``source``); the constants of its
        output's channels."""
        kind = type(layer)
        if i in self.coupling.carried:  # its channels all stay: as it is
            self.weights[layer.name] = layer.get_weights()
            return np.full(self.coupling.channels[i].size, np.nan)
        kept = self.coupling.kept(source, self.groups)
        const = ins[0]
        if kind in _MERGES:
            return _MERGES[kind](ins)
        if kind is layers.Concatenate:
            return np.concatenate(ins)
        if kind is layers.Flatten:
            return np.tile(const, int(np.prod(layer.input_shape[1:-1])))
        if kind in (layers.ZeroPadding1D, layers.ZeroPadding2D):
            self._unfolded(source, kept, const, sees_all=False)  # the border is zero
        elif kind is layers.Reshape:
            entry["target_shape"] = [*entry["target_shape"][:-1], int(kept.sum())]
        elif kind is layers.BatchNormalization:
            self.slices[layer.name] = lambda ws: [np.asarray(w)[kept] for w in ws]
            self.weights[layer.name] = self.slices[layer.name](layer.get_weights())
            gamma = np.ones(const.size) if layer.gamma is None else layer.gamma.numpy()
            beta = np.zeros(const.size) if layer.beta is None else layer.beta.numpy()
            scale = gamma / np.sqrt(layer.moving_variance.numpy() + layer.epsilon)
            return np.asarray((const - layer.moving_mean.numpy()) * scale + beta, np.float64)
        elif isinstance(layer, _ACTIVATIONS) or kind is layers.Softmax:
            return _apply(layer, const)
        elif kind is layers.DepthwiseConv2D:
            return self._depthwise(layer, source, kept, const)
        elif kind in _PRODUCERS:
            return self._producer(layer, i, source, kept, const, entry)
        return const

    def _unfolded(
        self, source: int, kept: np.ndarray, const: np.ndarray, *, sees_all: bool
    ) -> None:
        """The groups of the removed channels of call ``source``'s output that carry a constant
        a layer cannot fold (it does not see the constant everywhere, ``sees_all``, or it varies)
        go into ``stuck``, to be kept."""
        carrying = ~kept & (const != 0)
        if not sees_all or not np.isfinite(const[carrying]).all():
            channels = self.coupling.channels[source][carrying] if source >= 0 else []
            self.stuck.update(int(g) for g in channels if g >= 0)

    def _depthwise(
        self, layer: Any, source: int, kept: np.ndarray, const: np.ndarray
    ) -> np.ndarray:
        kernel, *rest = (np.asarray(w, np.float32) for w in layer.get_weights())
        self._unfolded(source, kept, const, sees_all=_sees_all(layer))
        out = (const[:, None] * kernel.sum(axis=(0, 1))).reshape(-1)
        out = out + rest[0] if rest else out
        through = np.repeat(kept, layer.depth_multiplier)
        self.slices[layer.name] = lambda ws: [ws[0][:, :, kept]] + [b[through] for b in ws[1:]]
        self.weights[layer.name] = self.slices[layer.name]([kernel, *rest])
        if layer.name in self.old_masks:
            self.masks[layer.name] = self.old_masks[layer.name][:, :, kept]
        return _apply(layers.Activation(layer.activation), np.where(through, np.nan, out))

    def _producer(
        self,
        layer: Any,
        i: int,
        source: int,
        kept: np.ndarray,
        const: np.ndarray,
        entry: dict[str, Any],
    ) -> np.ndarray:
        """Cut a producer's inputs to what flows in (folding the removed inputs' constants into
        its bias) and its units to those kept."""
        weights = [np.asarray(w, np.float32) for w in layer.get_weights()]
        head: list[np.ndarray] = []
        if type(layer) is layers.SeparableConv2D:  # a depthwise step, then a 1x1 kernel
            depthwise, kernel, *rest = weights
            self._unfolded(source, kept, const, sees_all=_sees_all(layer))
            const = (const[:, None] * depthwise.sum(axis=(0, 1))).reshape(-1)
            head = [depthwise[:, :, kept]]
            through, sees_all = np.repeat(kept, layer.depth_multiplier), True
        else:
            kernel, *rest = weights
            through, sees_all = kept, type(layer) is layers.Dense or _sees_all(layer)
        bias = rest[0].copy() if rest else None
        carrying = ~through & (const != 0)
        if carrying.any() and (
            bias is None or not sees_all or not np.isfinite(const[carrying]).all()
        ):
            per_input = carrying.reshape(kept.size, -1).any(axis=1)
            self._unfolded(source, kept, np.where(per_input, np.nan, 0.0), sees_all=False)
        elif carrying.any() and bias is not None:
            spread = kernel[..., carrying, :].reshape(-1, int(carrying.sum()), kernel.shape[-1])
            bias += np.einsum("pio,i->o", spread, const[carrying])
        units = self.coupling.kept(i, self.groups)
        separable = bool(head)

        def cut(ws: list[np.ndarray]) -> list[np.ndarray]:
            k = 1 if separable else 0
            out = [ws[0][:, :, kept]] if separable else []
            out.append(ws[k][..., through, :][..., units])
            return out + [b[units] for b in ws[k + 1 :]]

        self.slices[layer.name] = cut
        originals = weights[:1] if separable else []  # a separable layer's depthwise kernel
        self.weights[layer.name] = cut([*originals, kernel, *([] if bias is None else [bias])])
        if layer.name in self.old_masks:
            self.masks[layer.name] = self.old_masks[layer.name][..., through, :][..., units]
        entry[_PRODUCERS[type(layer)]] = int(units.sum())
        # A removed unit's kernel is zero: it gives activation(bias) everywhere.
        out = np.zeros(units.size) if bias is None else bias.astype(np.float64)
        return _apply(layers.Activation(layer.activation), np.where(units, np.nan, out))


def _sees_all(layer: Any) -> bool:
    """Whether a spatial kernel sees a constant input channel as a constant everywhere: valid
    padding, or a kernel of one position."""
    return bool(layer.padding == "valid" or all(k == 1 for k in layer.kernel_size))


def _apply(activation: Any, values: np.ndarray) -> np.ndarray:
    """An elementwise activation layer on a vector of constants (NaN: not a constant)."""
    out = np.full(values.shape, np.nan)
    finite = np.isfinite(values)
    if finite.any():
        applied = activation(np.asarray(values[finite][None, :], np.float32))
        out[finite] = np.asarray(applied, np.float64)[0]
    return out
