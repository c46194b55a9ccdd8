"""Observables of the distillation report agree with ASE used directly and measure known perturbations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk, molecule
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT
from ase.eos import EquationOfState
from ase.optimize import BFGS
from ase.phonons import Phonons
from ase.vibrations import Vibrations

from mlff_distiller.distill.observables import (
    compare_eos,
    compare_frequencies,
    eos_volumes,
    equation_of_state,
    langevin_frames,
    observables_report,
    radial_distribution,
    rdf_difference,
    system_kind,
    vibrational_frequencies,
)
from mlff_distiller.teachers.systems import water_box

A_EMT_CU = 3.5897  # Å, EMT's fcc Cu lattice constant (V0 = 11.565 Å³/atom below)


class ScaledEMT(Calculator):
    """EMT with energies and forces multiplied by ``factor``: force constants, and so squared frequencies and
    the bulk modulus, scale by it; volumes and geometries do not."""

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        emt = EMT()
        copy = self.atoms.copy()
        copy.calc = emt
        energy = self.factor * copy.get_potential_energy()
        self.results = {"energy": energy, "free_energy": energy, "forces": self.factor * copy.get_forces()}


class StretchedEMT(Calculator):
    """E'(x) = E_EMT(s x): the same crystal with lengths shrunk by s, so V0' = V0 / s³ and B' = s³ B."""

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, stretch: float):
        super().__init__()
        self.stretch = stretch

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        copy = self.atoms.copy()
        copy.set_cell(copy.cell.array * self.stretch, scale_atoms=True)
        copy.calc = EMT()
        energy = copy.get_potential_energy()
        self.results = {"energy": energy, "free_energy": energy, "forces": self.stretch * copy.get_forces()}


@pytest.fixture(scope="module")
def copper() -> Atoms:
    return bulk("Cu", "fcc", a=A_EMT_CU, cubic=True)  # 4 atoms: Gamma + the three X points of fcc


def test_eos_equals_a_direct_ase_fit_and_emt_copper_modulus(copper):
    ours = equation_of_state(EMT(), copper, points=7, max_volume_strain=0.06)
    volumes, energies = [], []
    for volume in copper.get_volume() * (1 + np.linspace(-0.06, 0.06, 7)):
        strained = copper.copy()
        strained.set_cell(copper.cell * (volume / copper.get_volume()) ** (1 / 3), scale_atoms=True)
        strained.calc = EMT()
        volumes.append(strained.get_volume())
        energies.append(strained.get_potential_energy())
    v0, e0, modulus = EquationOfState(volumes, energies, eos="birchmurnaghan").fit()
    np.testing.assert_allclose(ours.volumes, volumes, rtol=1e-12)
    np.testing.assert_allclose(ours.energies, energies, rtol=1e-12)
    assert ours.v0 == pytest.approx(v0, rel=1e-10) and ours.e0 == pytest.approx(e0, rel=1e-10)
    assert ours.bulk_modulus_GPa == pytest.approx(modulus / units.GPa, rel=1e-10)
    # EMT copper, measured here: B = 134.4 GPa, V0 = 11.565 Å³/atom (a = 3.5897 Å).
    assert ours.bulk_modulus_GPa == pytest.approx(134.4, abs=0.3)
    assert ours.v0 / len(copper) == pytest.approx(11.565, abs=0.002)
    assert ours.v0_in_range


def test_eos_errors_measure_known_perturbations(copper):
    teacher = equation_of_state(EMT(), copper)
    same = compare_eos(equation_of_state(EMT(), copper), teacher)
    assert same["bulk_modulus_rel_error"] == 0.0 and same["v0_rel_error"] == 0.0
    scaled = compare_eos(equation_of_state(ScaledEMT(1.1), copper), teacher)
    assert scaled["bulk_modulus_rel_error"] == pytest.approx(0.1, rel=1e-6)
    assert scaled["v0_rel_error"] < 1e-8
    stretch = 1.01
    stretched = compare_eos(equation_of_state(StretchedEMT(stretch), copper), teacher)
    assert stretched["v0_rel_error"] == pytest.approx(1 - stretch**-3, rel=1e-3)
    assert stretched["bulk_modulus_rel_error"] == pytest.approx(stretch**3 - 1, rel=2e-2)
    assert stretched["eos_extrapolated"] == 0.0


def test_eos_rejects_bad_options(copper):
    with pytest.raises(ValueError, match="eos_points=3"):
        eos_volumes(copper, points=3)
    with pytest.raises(ValueError, match="eos_max_volume_strain=0.7"):
        eos_volumes(copper, max_volume_strain=0.7)


def test_frequencies_equal_ase_phonons_on_the_same_cell(copper, tmp_path):
    ours = vibrational_frequencies(EMT(), copper)
    phonons = Phonons(copper, EMT(), supercell=(1, 1, 1), name=str(tmp_path / "ph"))
    phonons.run()
    phonons.read()
    direct = np.sort(phonons.band_structure([[0, 0, 0]], verbose=False)[0] / units.invcm)
    assert ours.method == "phonons-gamma" and len(ours.frequencies_cm1) == 3 * len(copper) - 3
    np.testing.assert_allclose(ours.frequencies_cm1, direct[3:], atol=1e-8)  # the 3 acoustic modes go
    # The acoustic sum rule makes the removed modes zero up to round-off (ASE: |omega| ~ 1e-5 cm⁻¹).
    assert np.abs(ours.rigid_body_cm1).max() < 1e-4 and np.abs(direct[:3]).max() < 1e-4
    assert ours.num_imaginary == 0


def test_frequencies_are_the_crystal_phonons_at_the_folded_q_points(copper, tmp_path):
    """The Gamma modes of the 4-atom cubic cell are fcc copper's phonons at Gamma and the three X points,
    from ASE's force constants of the primitive cell in a 5x5x5 supercell."""
    ours = vibrational_frequencies(EMT(), copper).frequencies_cm1
    phonons = Phonons(bulk("Cu", "fcc", a=A_EMT_CU), EMT(), supercell=(5, 5, 5), name=str(tmp_path / "ph"))
    phonons.run()
    phonons.read()
    q_points = [[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]
    crystal = np.sort(phonons.band_structure(q_points, verbose=False).ravel() / units.invcm)[3:]
    np.testing.assert_allclose(ours, crystal, atol=0.01)  # cm⁻¹, of 100-272
    assert ours.max() == pytest.approx(271.6, abs=0.1)


def test_frequency_error_of_scaled_forces_is_sqrt_of_the_scale(copper):
    teacher = vibrational_frequencies(EMT(), copper)
    same = compare_frequencies(vibrational_frequencies(EMT(), copper), teacher)
    assert same["frequency_mae_cm1"] == 0.0 and same["frequency_mae_rel"] == 0.0
    scaled = compare_frequencies(vibrational_frequencies(ScaledEMT(1.1), copper), teacher)
    assert scaled["frequency_mae_rel"] == pytest.approx(math.sqrt(1.1) - 1, rel=1e-6)
    assert scaled["frequency_mean_teacher_cm1"] == pytest.approx(np.abs(teacher.frequencies_cm1).mean())
    assert scaled["imaginary_modes_student"] == 0.0 and scaled["frequency_num_modes"] == 9.0


def test_imaginary_modes_are_kept_as_negative_frequencies():
    """A saddle: copper compressed on one axis and stretched on the others is unstable in some modes;
    they stay in the spectrum, negative, and are counted."""
    atoms = bulk("Cu", "fcc", a=A_EMT_CU, cubic=True).repeat((2, 1, 1))
    atoms.set_cell(atoms.cell.array @ np.diag([0.8, 1.25, 1.25]), scale_atoms=True)
    result = vibrational_frequencies(EMT(), atoms)
    direct_count = int((result.frequencies_cm1 < 0).sum())
    assert result.num_imaginary == direct_count > 0
    assert len(result.frequencies_cm1) == 3 * len(atoms) - 3


def test_isolated_molecule_uses_vibrations_and_drops_rotations(tmp_path):
    n2 = Atoms("N2", positions=[(0, 0, 0), (0, 0, 1.1)])
    n2.calc = EMT()
    BFGS(n2, logfile=None).run(fmax=1e-4)
    ours = vibrational_frequencies(EMT(), n2)
    direct = Vibrations(n2, name=str(tmp_path / "vib"))
    direct.run()
    stretch = float(direct.get_frequencies().real.max())
    assert ours.method == "vibrations" and len(ours.rigid_body_cm1) == 5  # linear: 3 translations, 2 rotations
    np.testing.assert_allclose(ours.frequencies_cm1, [stretch], rtol=1e-10)
    water = molecule("H2O")
    assert len(vibrational_frequencies(EMT(), water).frequencies_cm1) == 3  # 9 - 6


def test_system_kind():
    assert system_kind(bulk("Cu", "fcc", a=3.6, cubic=True)) == "crystal"
    assert system_kind(bulk("NaCl", "rocksalt", a=5.64)) == "crystal"
    assert system_kind(water_box(8)) == "liquid"
    assert system_kind(molecule("H2O")) == "molecule"
    with pytest.raises(ValueError, match="pbc"):
        system_kind(Atoms("Cu2", positions=[(0, 0, 0), (2.5, 0, 0)], cell=[5, 5, 5], pbc=[True, True, False]))


def test_rdf_of_perfect_fcc_peaks_at_the_nearest_neighbour_distance():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((3, 3, 3))
    result = radial_distribution([atoms], bin_width=0.02)
    nearest = 3.6 / math.sqrt(2)
    assert abs(result.peak_position() - nearest) <= 0.02
    # The first shell holds 12 neighbours: the sum of rho g(r) x (volume of each bin's shell) up to between shells.
    density = len(atoms) / atoms.get_volume()
    shell = result.r < 0.5 * (nearest + 3.6)
    volumes = 4 / 3 * math.pi * ((result.r + 0.01) ** 3 - (result.r - 0.01) ** 3)
    coordination = (density * result.g["total"] * volumes)[shell].sum()
    assert coordination == pytest.approx(12.0, rel=1e-9)
    np.testing.assert_allclose(result.g["Cu-Cu"], result.g["total"])
    assert result.r[-1] < 5.0 < result.r[-1] + 0.02  # ASE's default: at most 5 Å
    longer = radial_distribution([atoms], rmax=5.35, bin_width=0.05)  # the 10.8 Å cell allows up to 5.4 Å
    assert abs(longer.peak_position() - nearest) <= 0.05 and longer.r[-1] > 5.3
    with pytest.raises(ValueError, match="rdf_rmax=5.45"):
        radial_distribution([atoms], rmax=5.45)


def test_partial_rdfs_and_their_difference():
    atoms = bulk("Cu", "fcc", a=3.75, cubic=True).repeat((3, 3, 3))
    atoms.symbols[::4] = "Au"  # L1_2 Cu3Au: an Au has only Cu nearest neighbours
    result = radial_distribution([atoms])
    assert set(result.g) == {"total", "Au-Au", "Au-Cu", "Cu-Cu"}
    assert result.peak_position("Au-Cu") == pytest.approx(3.75 / math.sqrt(2), abs=0.05)
    assert result.peak_position("Au-Au") == pytest.approx(3.75, abs=0.05)
    g = result.g["total"]
    assert rdf_difference(g, g) == 0.0 and rdf_difference(2 * g, g) == pytest.approx(1.0)


class NaNAfter(EMT):
    """EMT whose energy becomes NaN after ``calls`` calculations (a student whose MD blows up)."""

    def __init__(self, calls: int):
        super().__init__()
        self.left = calls

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.left -= 1
        if self.left < 0:
            self.results["energy"] = float("nan")


def test_langevin_frames_are_seeded_and_stop_when_not_finite():
    start = bulk("Cu", "fcc", a=A_EMT_CU, cubic=True).repeat((2, 2, 2))
    options = {"steps": 20, "equilibration_steps": 5, "interval": 10, "temperature_K": 300.0}
    first = langevin_frames(EMT(), start, seed=3, **options)
    again = langevin_frames(EMT(), start, seed=3, **options)
    other = langevin_frames(EMT(), start, seed=4, **options)
    assert len(first) == 2 and not first[0].calc
    np.testing.assert_array_equal(first[-1].positions, again[-1].positions)
    assert np.abs(first[-1].positions - other[-1].positions).max() > 1e-3
    assert np.abs(first[0].positions - start.positions).max() > 1e-3  # it moved
    # One force call per step: equilibration ends at call 6, frame 1 at 16, the NaN comes before frame 2 at 26.
    assert len(langevin_frames(NaNAfter(20), start, seed=3, **options)) == 1


def test_report_student_equal_to_teacher_gives_zero_and_scaled_student_the_expected_errors(tmp_path):
    copper = bulk("Cu", "fcc", a=3.6, cubic=True)  # not at EMT's minimum: the report relaxes and rescales it
    options = {
        "observables": ["eos", "frequencies", "rdf"],
        "md_min_atoms": 32,
        "md_steps": 20,
        "md_equilibration_steps": 10,
        "md_interval": 10,
    }
    same = observables_report(EMT(), EMT(), copper, tmp_path / "same", **options)
    for name in ("bulk_modulus_rel_error", "v0_rel_error", "frequency_mae_rel", "rdf_difference"):
        assert same[f"observables/{name}"] == 0.0, name
    assert same["observables/bulk_modulus_teacher_GPa"] == pytest.approx(134.4, abs=0.3)
    assert same["observables/rdf_frames_teacher"] == same["observables/rdf_frames_student"] == 2
    assert same["observables/rdf_peak_teacher_A"] == pytest.approx(A_EMT_CU / math.sqrt(2), abs=0.1)
    for plot in ("eos.png", "frequencies.png", "rdf.png", "observables.json"):
        assert (tmp_path / "same" / plot).stat().st_size > 1000
    saved = json.loads((tmp_path / "same" / "observables.json").read_text())
    assert saved["metrics"] == same and saved["curves"]["kind"] == "crystal"

    scaled = observables_report(ScaledEMT(1.1), EMT(), copper, tmp_path / "scaled", **options)
    assert scaled["observables/bulk_modulus_rel_error"] == pytest.approx(0.1, rel=1e-5)
    # Frequencies at the teacher's minimum (V0), where the scaled student is at rest too.
    assert scaled["observables/frequency_mae_rel"] == pytest.approx(math.sqrt(1.1) - 1, rel=1e-5)
    assert scaled["observables/reference_student_max_force_eV_A"] < 1e-3
    assert scaled["observables/rdf_difference"] > 0.0


def test_report_defaults_by_kind_and_refuses_bad_options_before_work(tmp_path):
    molecule_metrics = observables_report(EMT(), EMT(), molecule("H2O"), tmp_path / "h2o", relax_steps=0)
    assert molecule_metrics["observables/frequency_num_modes"] == 3.0
    assert "observables/bulk_modulus_rel_error" not in molecule_metrics
    copper = bulk("Cu", "fcc", a=3.6, cubic=True)
    with pytest.raises(ValueError, match="unknown names"):
        observables_report(EMT(), EMT(), copper, tmp_path / "x", observables=["eos", "phonons"])
    with pytest.raises(ValueError, match="kind='liquid_metal'"):
        observables_report(EMT(), EMT(), copper, tmp_path / "x", kind="liquid_metal")
    with pytest.raises(ValueError, match="max_frequency_atoms=64"):
        observables_report(EMT(), EMT(), copper.repeat((3, 3, 3)), tmp_path / "x")
    with pytest.raises(ValueError, match="eos and rdf need a periodic cell"):
        observables_report(EMT(), EMT(), molecule("H2O"), tmp_path / "x", observables=["eos"])
    with pytest.raises(ValueError, match="rdf_rmax=9"):
        observables_report(EMT(), EMT(), copper, tmp_path / "x", observables=["rdf"], rdf_rmax=9.0)
    slab = copper.copy()
    slab.pbc = [True, True, False]
    with pytest.raises(ValueError, match="pbc"):
        observables_report(EMT(), EMT(), slab, tmp_path / "x", kind="crystal")
    assert not (tmp_path / "x").exists()


def test_report_measures_a_student_calculator(tmp_path):
    """A (small, untrained) SchNet through StudentCalculator goes through the same protocol: its frequencies
    are those of ASE's Phonons driven by it directly at the teacher's geometry."""
    import torch

    from mlff_distiller import StudentCalculator
    from mlff_distiller.data.statistics import DatasetStatistics
    from mlff_distiller.models.schnet import SchNet

    torch.manual_seed(0)
    statistics = DatasetStatistics(atomic_energies={29: -3.5}, force_rms=0.8, avg_num_neighbors=12.0)
    model = SchNet(cutoff=4.0, hidden=8, interactions=1, num_rbf=8, statistics=statistics)
    student = StudentCalculator(model, dtype=torch.float64)
    copper = bulk("Cu", "fcc", a=A_EMT_CU, cubic=True)
    metrics = observables_report(student, EMT(), copper, tmp_path, observables=["frequencies"], relax_steps=0)
    direct = vibrational_frequencies(student, copper)
    teacher = vibrational_frequencies(EMT(), copper)
    expected = compare_frequencies(direct, teacher)
    assert metrics["observables/frequency_mae_cm1"] == pytest.approx(expected["frequency_mae_cm1"], rel=1e-9)
    assert metrics["observables/frequency_mae_cm1"] > 1.0  # an untrained student is far from EMT
