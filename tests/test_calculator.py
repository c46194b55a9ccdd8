"""`StudentCalculator`: a student as an ASE calculator, in memory and rebuilt from an mlff-train checkpoint."""

from __future__ import annotations

import copy
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111
from hydra.utils import instantiate
from torch import nn

from mlff_distiller.calculator import StudentCalculator
from mlff_distiller.data import keys
from mlff_distiller.data.batch import collate_atoms
from mlff_distiller.data.dataset import atoms_to_graph
from mlff_distiller.data.statistics import DatasetStatistics
from mlff_distiller.models.base import UnknownElementError
from mlff_distiller.models.painn import PaiNN
from mlff_distiller.models.schnet import SchNet
from mlff_distiller.training import CheckpointError, Trainer, TrainingConfig

torch.set_num_threads(1)

BIN = Path(sys.executable).parent
MLFF_TRAIN = str(BIN / "mlff-train") if (BIN / "mlff-train").exists() else shutil.which("mlff-train")
CUTOFF = 4.0
STATISTICS = DatasetStatistics(atomic_energies={29: -3.5, 79: -3.0}, force_rms=0.8, avg_num_neighbors=18.0)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


def alloy(seed: int = 0) -> Atoms:
    """32-atom Cu-Au fcc cell, rattled."""
    rng = np.random.default_rng(seed)
    atoms = bulk("Cu", "fcc", a=3.7, cubic=True) * (2, 2, 2)
    numbers = atoms.numbers.copy()
    numbers[rng.permutation(len(atoms))[:8]] = 79
    atoms.numbers = numbers
    atoms.positions += rng.normal(0.0, 0.08, size=atoms.positions.shape)
    return atoms


def free_cluster(seed: int = 1) -> Atoms:
    """Non-periodic 7-atom Cu-Au cluster."""
    rng = np.random.default_rng(seed)
    positions = 2.2 * np.array([[0, 0, 0], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])
    return Atoms("Cu5Au2", positions=positions + rng.normal(0.0, 0.1, size=(7, 3)), pbc=False)


def slab(seed: int = 2) -> Atoms:
    atoms = fcc111("Cu", (2, 2, 3), a=3.7, vacuum=6.0)
    atoms.numbers[[0, 5]] = 79
    atoms.rattle(0.05, seed=seed)
    return atoms


STRUCTURES = {"periodic": alloy, "cluster": free_cluster, "slab": slab}


def student(name: str, **kwargs) -> nn.Module:
    cls = {"schnet": SchNet, "painn": PaiNN}[name]
    return cls(cutoff=CUTOFF, hidden=16, interactions=2, num_rbf=8, statistics=STATISTICS, **kwargs).eval()


def model_output(model: nn.Module, atoms: Atoms, dtype=torch.float32) -> tuple[float, np.ndarray]:
    graph = atoms_to_graph(atoms, model.cutoff, with_labels=False)
    out = model(collate_atoms([graph]).to("cpu", dtype=dtype))
    return float(out[keys.ENERGY].detach().sum()), out[keys.FORCES].detach().double().numpy()


def calculator_output(calc: StudentCalculator, atoms: Atoms) -> tuple[float, np.ndarray]:
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms.get_potential_energy(), atoms.get_forces()


@pytest.mark.parametrize("name", ["schnet", "painn"])
@pytest.mark.parametrize("kind", STRUCTURES)
def test_energy_and_forces_are_the_models_own_output(name, kind):
    model = student(name)
    atoms = STRUCTURES[kind]()
    energy, forces = model_output(copy.deepcopy(model), atoms)
    calc = StudentCalculator(model)
    got_energy, got_forces = calculator_output(calc, atoms)
    assert got_energy == pytest.approx(energy, rel=1e-6, abs=1e-6)
    assert got_forces.shape == (len(atoms), 3) and got_forces.dtype == np.float64
    np.testing.assert_allclose(got_forces, forces, rtol=1e-5, atol=1e-6)
    assert calc.results["free_energy"] == calc.results["energy"]
    assert np.abs(got_forces).max() > 1e-3  # a meaningful comparison
    if kind != "cluster":
        # Every image counted: the energy differs from that of the same atoms without periodicity.
        open_atoms = atoms.copy()
        open_atoms.pbc = False
        assert abs(calculator_output(calc, open_atoms)[0] - got_energy) > 1e-3


def test_the_calculator_follows_the_atoms():
    model = student("schnet")
    reference = copy.deepcopy(model)
    atoms = alloy(3)
    atoms.calc = StudentCalculator(model)
    first = atoms.get_potential_energy()
    atoms.positions[0] += [0.05, -0.03, 0.02]
    moved = atoms.get_potential_energy()
    assert moved != first
    assert moved == pytest.approx(model_output(reference, atoms)[0], rel=1e-6)
    np.testing.assert_allclose(atoms.get_forces(), model_output(reference, atoms)[1], rtol=1e-5, atol=1e-6)
    atoms.set_cell(atoms.cell.array * 1.01, scale_atoms=True)
    assert atoms.get_potential_energy() == pytest.approx(model_output(reference, atoms)[0], rel=1e-6)


def _directional_derivatives(atoms: Atoms, directions, h: float) -> np.ndarray:
    """Central differences of the calculator energy along each (unit) direction."""
    positions = atoms.positions.copy()
    out = []
    for direction in directions:
        atoms.positions = positions + h * direction
        plus = atoms.get_potential_energy()
        atoms.positions = positions - h * direction
        minus = atoms.get_potential_energy()
        out.append((plus - minus) / (2 * h))
    atoms.positions = positions
    return np.array(out)


def _directions(forces: np.ndarray, seed: int = 5) -> list[np.ndarray]:
    """Along the forces (a large derivative) and two random directions, all of unit length."""
    rng = np.random.default_rng(seed)
    directions = [forces, rng.standard_normal(forces.shape), rng.standard_normal(forces.shape)]
    return [d / np.linalg.norm(d) for d in directions]


@pytest.mark.parametrize("name", ["schnet", "painn"])
@pytest.mark.parametrize("kind", ["periodic", "cluster"])
def test_forces_are_minus_the_finite_difference_gradient_of_the_energy(name, kind):
    atoms = STRUCTURES[kind]()
    atoms.calc = StudentCalculator(student(name), dtype=torch.float64)
    forces = atoms.get_forces()
    directions = _directions(forces)
    expected = np.array([-np.sum(forces * d) for d in directions])
    assert expected[0] < -0.02  # along the forces the energy falls (by |F|)
    # h = 1e-2 Å: the truncation error (~1e-6 eV/Å here) stays well inside the tolerance; the tight
    # float64 check (small h) is a separate test below.
    np.testing.assert_allclose(_directional_derivatives(atoms, directions, 1e-2), expected, rtol=0, atol=5e-5)
    if kind == "periodic":
        np.testing.assert_allclose(forces.sum(0), 0.0, atol=1e-10)  # translation invariance


def test_a_float64_calculator_computes_in_float64():
    model = student("schnet").double()
    reference = copy.deepcopy(model)
    atoms = alloy(4)
    items = {
        keys.POSITIONS: torch.tensor(atoms.positions, dtype=torch.float64),
        keys.ATOMIC_NUMBERS: torch.tensor(atoms.numbers),
        keys.CELL: torch.tensor(atoms.cell.array, dtype=torch.float64),
        keys.PBC: torch.tensor(atoms.pbc),
    }
    graph = atoms_to_graph(atoms, CUTOFF, with_labels=False)
    items[keys.EDGE_INDEX] = graph[keys.EDGE_INDEX]
    items[keys.CELL_SHIFTS] = graph[keys.CELL_SHIFTS].double()
    exact = float(reference(collate_atoms([items]))[keys.ENERGY].detach().sum())
    energy, forces = calculator_output(StudentCalculator(model, dtype=torch.float64), atoms)
    assert energy == pytest.approx(exact, abs=1e-10)
    # With float64 positions the finite differences of the calculator energy agree with its forces to
    # ~1e-8 eV/Å at h = 1e-3 Å (as they do for the model on a float64 graph).
    atoms.calc = StudentCalculator(copy.deepcopy(reference), dtype=torch.float64)
    directions = _directions(forces)
    expected = np.array([-np.sum(forces * d) for d in directions])
    np.testing.assert_allclose(_directional_derivatives(atoms, directions, 1e-3), expected, rtol=0, atol=1e-6)


def test_a_non_atomistic_model_is_refused():
    with pytest.raises(TypeError, match="cutoff"):
        StudentCalculator(nn.Linear(3, 1))


def test_wrapping_a_model_leaves_it_trainable():
    model = student("schnet").train()
    StudentCalculator(model, dtype=torch.float64)
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.training


# ----------------------------------------------------------------------- from_checkpoint


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`mlff-train experiment=smoke` with EMA, run once as a user runs it."""
    if MLFF_TRAIN is None:
        pytest.skip("mlff-train is not installed (pip install -e .)")
    cwd = tmp_path_factory.mktemp("cli")
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}  # 2-core CI: no oversubscription
    result = subprocess.run(
        [MLFF_TRAIN, "experiment=smoke", "trainer.ema_decay=0.9", "hydra.run.dir=run"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return cwd / "run" / "checkpoints"


def _energies(calc: StudentCalculator, structures) -> np.ndarray:
    return np.array([calculator_output(calc, atoms)[0] for atoms in structures])


def _model_from(state: dict, use_ema: bool) -> nn.Module:
    model = instantiate(state["config"]["extra"]["model_config"])
    weights = dict(state["model"])
    if use_ema:
        weights.update(state["ema"]["shadow"])
    model.load_state_dict(weights)
    return model.eval()


@pytest.mark.parametrize("filename", ["best_model.pt", "last.pt"])
def test_from_checkpoint_rebuilds_the_student_with_ema_weights(cli_run, filename):
    path = cli_run / filename
    state = torch.load(path, map_location="cpu", weights_only=True)
    config = state["config"]["extra"]["model_config"]
    assert config["_target_"].endswith("SchNet") and config["hidden"] == 16 and config["interactions"] == 1
    assert state["ema"] and state["ema"]["num_updates"] > 0
    raw, shadow = state["model"], state["ema"]["shadow"]
    assert set(shadow) <= set(raw)
    assert any(not torch.allclose(shadow[k], raw[k], atol=1e-6) for k in shadow), "EMA equals the raw weights"

    structures = [alloy(10), alloy(11), free_cluster(12)]
    from_file = StudentCalculator.from_checkpoint(path)
    assert isinstance(from_file.model, SchNet) and from_file.model.cutoff == 5.0
    ema_energies = _energies(from_file, structures)
    by_hand = _energies(StudentCalculator(_model_from(state, use_ema=True)), structures)
    np.testing.assert_allclose(ema_energies, by_hand, rtol=1e-6, atol=1e-6)
    # The dataset statistics came back from the checkpoint's buffers (no statistics at construction).
    assert float(from_file.model.scale) == pytest.approx(float(raw["scale"]))
    assert float(from_file.model.scale) != 1.0

    raw_energies = _energies(StudentCalculator.from_checkpoint(path, use_ema=False), structures)
    by_hand_raw = _energies(StudentCalculator(_model_from(state, use_ema=False)), structures)
    np.testing.assert_allclose(raw_energies, by_hand_raw, rtol=1e-6, atol=1e-6)
    assert np.abs(raw_energies - ema_energies).max() > 1e-4


def test_from_checkpoint_passes_calculator_options(cli_run):
    calc = StudentCalculator.from_checkpoint(cli_run / "best_model.pt", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in calc.model.parameters())
    single = StudentCalculator.from_checkpoint(cli_run / "best_model.pt")
    structure = alloy(13)
    assert calculator_output(calc, structure)[0] == pytest.approx(calculator_output(single, structure)[0], rel=1e-5)


def test_a_checkpoint_without_model_config_is_refused(tmp_path):
    model = student("schnet")
    batch = collate_atoms([atoms_to_graph(free_cluster(), CUTOFF, with_labels=False)])
    config = TrainingConfig(max_epochs=1, checkpoint_dir=None, device="cpu")
    trainer = Trainer(model, [batch], config=config, loggers=[], loss_fn=lambda m, b: m(b)[keys.ENERGY].sum())
    path = trainer.save_checkpoint(tmp_path / "python_api.pt")  # the Python API records no model_config
    with pytest.raises(CheckpointError) as info:
        StudentCalculator.from_checkpoint(path)
    message = str(info.value)
    assert "python_api.pt" in message and "model_config" in message and "StudentCalculator(model)" in message


def test_a_missing_checkpoint_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere.pt"):
        StudentCalculator.from_checkpoint(tmp_path / "nowhere.pt")


# ----------------------------------------------------------------------- unseen elements
def test_a_checkpointed_student_refuses_elements_it_never_saw(cli_run):
    calc = StudentCalculator.from_checkpoint(cli_run / "best_model.pt")
    assert calc.model.elements == [29, 79]  # the Cu-Au training split, recorded in the checkpoint
    for symbol in ("Ag", "H"):
        atoms = alloy(3)
        atoms[0].symbol = symbol
        atoms.calc = calc
        with pytest.raises(UnknownElementError, match=f"contains {symbol}, which the student was never trained on"):
            atoms.get_potential_energy()
    atoms = alloy(3)
    atoms.calc = calc
    assert np.isfinite(atoms.get_potential_energy())


def test_checkpoints_without_the_element_record_infer_it_from_reference_energies():
    model = SchNet(cutoff=CUTOFF, hidden=8, interactions=1, num_rbf=4, statistics=STATISTICS)
    state = {k: v for k, v in model.state_dict().items() if k != "trained_elements"}  # an older checkpoint
    fresh = SchNet(cutoff=CUTOFF, hidden=8, interactions=1, num_rbf=4)
    assert fresh.elements == []  # no statistics, no record: accepts anything
    fresh.check_elements([1, 47])
    from mlff_distiller.training.checkpoint import load_model_state

    load_model_state(fresh, state, "old.pt")
    assert fresh.elements == [29, 79]
    with pytest.raises(UnknownElementError, match="contains H, Ag.*knows only Cu, Au"):
        fresh.check_elements(np.array([29, 47, 1]))
