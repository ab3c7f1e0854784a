"""Unit pruning of graphs (residual, depthwise-separable, MobileNet): coupled channels go
together on the schedule, and the rebuilt model gives the masked one's outputs mid-run."""

from __future__ import annotations

import numpy as np
import pytest

from fedprune.coordinator import models
from fedprune.coordinator.config import ScheduleConfig
from fedprune.coordinator.pruning import Pruner, pruner_for
from fedprune.coordinator.structure import Coupling, alive

X = np.random.default_rng(0).random((16, 8, 8, 1)).astype(np.float32)


def _groups(pruner: Pruner) -> np.ndarray:
    """Which groups of coupled channels the wrappers' masks keep."""
    masks = {w.layer.name: w.pruning_vars[0][1].numpy() for w in pruner.wrappers if w.pruning_vars}
    assert pruner.coupling is not None
    return pruner.coupling.alive(masks)


def _coupled_units_agree(pruner: Pruner) -> None:
    """Every unit of a group is kept or removed with the others."""
    coupling = pruner.coupling
    assert coupling is not None
    groups = _groups(pruner)
    for w in pruner.wrappers:
        if w.layer.name in coupling.producers:
            units = alive(w.pruning_vars[0][1].numpy())
            np.testing.assert_array_equal(units, coupling.producer_kept(w.layer.name, groups))


@pytest.mark.parametrize("preset", ["resnet8", "dscnn", "mobilenet"])
def test_coupled_groups_go_together_and_rebuilding_mid_run_keeps_the_outputs(preset: str) -> None:
    schedule = ScheduleConfig(units="l2", target=0.5, begin_round=1, end_round=4, rebuild_every=2)
    pruner = pruner_for(models.build(preset), schedule)
    original = dict(pruner.units)
    rng = np.random.default_rng(1)
    rebuilt = 0
    for round_ in range(1, 5):
        pruner.set_weights(  # what a round's aggregate does: every weight moves a little
            [
                w + rng.normal(0, 0.01, w.shape).astype(np.float32)
                for w in pruner.stripped.get_weights()
            ]
        )
        pruner.step(round_)
        _coupled_units_agree(pruner)
        if pruner.rebuild_due(round_):
            expected, before = pruner.stripped(X).numpy(), pruner.parameters()
            old = pruner.model().weights
            smaller = pruner.rebuild()
            rebuilt += smaller
            np.testing.assert_allclose(pruner.stripped(X).numpy(), expected, atol=2e-5)
            assert (pruner.parameters() < before) == smaller
            assert all(m is None or m.all() for m in pruner.model().masks)
            if smaller:  # the server optimizer's state is cut as the weights were
                _cut_as_the_weights(pruner, old)

    assert rebuilt == 2  # rounds 3 and 4 (round 1 removes nothing yet)
    assert pruner.coupling is not None
    assert {f: g.size for f, g in pruner.coupling.families.items()} == {
        f: round(n / 2) for f, n in original.items()
    }


def _cut_as_the_weights(pruner: Pruner, old: list[np.ndarray]) -> None:
    """``pruner.cut`` takes arrays laid out as the weights before the rebuild to the rebuilt
    model's: the weights themselves come out as the rebuilt ones, but for the biases that took
    the constants of removed channels."""
    assert pruner.cut is not None
    model = pruner.model()
    cut = pruner.cut(old)
    assert [a.shape for a in cut] == [w.shape for w in model.weights]
    for i, (got, want) in enumerate(zip(cut, model.weights, strict=True)):
        if want.ndim > 1 or i in model.exact:  # kernels, BatchNormalization statistics
            np.testing.assert_array_equal(got, want)


def test_a_residual_stage_is_one_family() -> None:
    """ResNet-8: each stage's channels (its convolutions that feed the Adds, and its
    projection) are one family; the convolution inside each block is a family of its own."""
    families = Coupling(models.resnet8()).families

    assert sorted(len(name.split("+")) for name in families) == [1, 1, 1, 2, 2, 2]
    assert sorted(g.size for g in families.values()) == [16, 16, 32, 32, 64, 64]


def test_a_weight_pruned_model_is_never_rebuilt() -> None:
    pruner = pruner_for(models.resnet8(), ScheduleConfig(target=0.5, begin_round=1, end_round=2))
    pruner.step(1)
    before = pruner.architecture()

    assert not pruner.rebuild()
    assert pruner.architecture() == before
