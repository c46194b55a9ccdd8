"""The compiled path (``model.compile``): one traced energy/forces/stress graph must give the eager model's
numbers in float64 (outputs and the weight gradients of a force loss), reuse its graph across batch sizes,
and fall back to the eager model, with one log line, wherever it does not apply."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from atoms_testkit import cu_au_cell, make_batch, methane, small_model, to_item

from mlff_distiller import StudentCalculator
from mlff_distiller.data import keys
from mlff_distiller.data.batch import collate_atoms
from mlff_distiller.models import compiled
from mlff_distiller.models.compiled import compile_mode


def _outputs_and_gradients(model: torch.nn.Module, batch) -> list[torch.Tensor]:
    """Energy, forces, stress and, in training mode, the weight gradients of a force-dependent loss."""
    out = model(batch)
    outputs = [out[keys.ENERGY], out[keys.FORCES], out[keys.STRESS]]
    if not model.training:  # eval mode (an ASE calculator): the forces carry no graph for the weights
        return outputs
    loss = out[keys.ENERGY].pow(2).sum() + 10 * out[keys.FORCES].pow(2).sum() + out[keys.STRESS].pow(2).sum()
    return outputs + list(torch.autograd.grad(loss, list(model.parameters())))


def _pair(name: str, mode: str, **sizes: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    eager = small_model(name, compute_stress=True, **sizes)
    traced = small_model(name, compute_stress=True, compile=mode, **sizes)
    traced.load_state_dict(eager.state_dict())
    assert set(traced.state_dict()) == set(eager.state_dict())  # checkpoints load either way
    return eager, traced


def _assert_same(eager, traced, batch) -> None:
    for a, b in zip(_outputs_and_gradients(eager, batch), _outputs_and_gradients(traced, batch)):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_compile_modes_are_named_or_refused():
    assert [compile_mode(v) for v in (False, None, True, "fx", "Inductor", "none")] == [
        "none",
        "none",
        "inductor",
        "fx",
        "inductor",
        "none",
    ]
    with pytest.raises(ValueError, match="model.compile='max' is not a compile mode; accepted"):
        compile_mode("max")


@pytest.mark.parametrize("name", ["schnet", "painn"])
def test_the_traced_graph_equals_the_eager_model_in_float64(name):
    eager, traced = _pair(name, "fx")
    for model in (eager, traced):
        model.train()
    _assert_same(eager, traced, make_batch([cu_au_cell(0), cu_au_cell(1, gold=8)]))
    # Other sizes (atoms, edges, structures) reuse the graph: its sizes are symbolic.
    _assert_same(eager, traced, make_batch([cu_au_cell(2), cu_au_cell(3, gold=2), cu_au_cell(4)]))
    assert traced.compiled.traces == 1
    assert copy.deepcopy(traced).compiled.graphs == {}  # a copy (e.g. StudentCalculator's) traces its own


def test_a_compiled_calculator_gives_the_eager_numbers():
    """One structure per call, eval mode, frozen weights: the graph an MD run uses."""
    model = small_model("schnet")
    atoms = cu_au_cell(5)
    expected = StudentCalculator(model, dtype=torch.float64)
    calculator = StudentCalculator(model, dtype=torch.float64, compile="fx")
    assert model.compiled is None and calculator.model.compiled.mode == "fx"
    for step in range(2):
        atoms.positions[0, 0] += 0.01 * step
        results = [calc.get_property(p, atoms) for calc in (expected, calculator) for p in ("energy", "forces")]
        assert results[0] == pytest.approx(results[2], rel=1e-12)
        np.testing.assert_allclose(results[3], results[1], rtol=1e-10, atol=1e-12)
    assert calculator.model.compiled.traces == 1
    assert StudentCalculator(calculator.model, compile=False).model.compiled is None


def test_batches_the_graph_does_not_apply_to_run_eagerly_with_one_log_line(caplog):
    eager, traced = _pair("schnet", "fx")
    unpaired_items = [to_item(cu_au_cell(0)), to_item(methane())]
    for item in unpaired_items:
        del item[keys.NUM_EDGE_PAIRS]
    unpaired = collate_atoms(unpaired_items)
    with caplog.at_level(logging.WARNING, logger=compiled.__name__):
        for _ in range(2):
            _assert_same(eager, traced, unpaired)
    assert [r.getMessage() for r in caplog.records] == [
        "model.compile=fx: the batch's edges are not paired by the data pipeline (no 'num_edge_pairs'); "
        "running the eager model for these batches."
    ]
    # Positions that require grad (Hessian rows differentiate the forces again) run eagerly too.
    batch = make_batch([cu_au_cell(1), methane()])
    positions = batch[keys.POSITIONS].clone().requires_grad_(True)
    forces = traced(batch.replace(**{keys.POSITIONS: positions}))[keys.FORCES]
    (row,) = torch.autograd.grad(forces[0, 0], positions)
    (expected,) = torch.autograd.grad(eager(batch.replace(**{keys.POSITIONS: positions}))[keys.FORCES][0, 0], positions)
    torch.testing.assert_close(row, expected, rtol=1e-10, atol=1e-12)
    assert traced.compiled.traces == 0 and "positions require grad" in caplog.text


def test_a_graph_whose_weight_gradients_differ_from_eager_is_not_used(monkeypatch, caplog):
    """Without relinking autograd's saved outputs, PaiNN's traced forces are wrong in the weights (its sqrt):
    the first-run check must catch it and keep the eager model."""
    monkeypatch.setattr(compiled, "_relink_saved_outputs", lambda graph_module: None)
    eager, traced = _pair("painn", "fx", interactions=1)
    for model in (eager, traced):
        model.train()
    batch = make_batch([cu_au_cell(0), cu_au_cell(1)])
    with caplog.at_level(logging.WARNING, logger=compiled.__name__):
        _assert_same(eager, traced, batch)
        _assert_same(eager, traced, batch)
    assert "differs from the eager model's" in caplog.text and len(caplog.records) == 1


@pytest.fixture
def inductor(request):
    if not request.config.getoption("--inductor"):
        pytest.skip("compiles with inductor for minutes; run with --inductor")


@pytest.mark.parametrize("name", ["schnet", "painn"])
def test_the_inductor_graph_equals_the_eager_model_in_float64(name, inductor):
    eager, traced = _pair(name, "inductor")
    for model in (eager, traced):
        model.train()
    for structures in ([cu_au_cell(0), cu_au_cell(1, gold=8)], [cu_au_cell(2), methane(), cu_au_cell(3)]):
        _assert_same(eager, traced, make_batch(structures))
    assert traced.compiled.traces == 1 and all(traced.compiled.graphs.values())
