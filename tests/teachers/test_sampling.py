"""Distillation sampling: seeds by name or file, rattle + strain, MD, deduplication, provenance, and the
cached, resumable labelled set."""

from __future__ import annotations

import json

import ase.io
import numpy as np
import pytest
from ase.calculators.emt import EMT

from mlff_distiller.teachers import calculators as calculators_module
from mlff_distiller.teachers import read_labelled
from mlff_distiller.teachers.hessian import stored_hessian_rows
from mlff_distiller.teachers.sampling import (
    SamplingConfig,
    build_distillation_dataset,
    contact_copies,
    deduplicate,
    rattle_and_strain,
    sample_structures,
    seed_structures,
    volume_copies,
)
from mlff_distiller.teachers.structures import fresh_copy

SMALL = {
    "system_options": {"min_atoms": 8},
    "num_rattle": 6,
    "temperatures": [600.0],
    "snapshots_per_run": 3,
    "equilibration_steps": 5,
    "snapshot_interval": 5,
    "hessian_rows": 1,
}


def test_seeds_by_name_and_from_a_file(tmp_path):
    (cu,) = seed_structures("Cu")
    assert len(cu) == 32 and cu.pbc.all() and set(cu.get_chemical_symbols()) == {"Cu"}
    np.testing.assert_allclose(cu.cell.lengths(), [7.22, 7.22, 3.61 * 2])
    alloys = seed_structures("CuAu", num_seeds=3, fraction_range=(0.25, 0.5), seed=1)
    assert len(alloys) == 3
    for atoms in alloys:
        fraction = np.mean(atoms.numbers == 79)
        assert 0.25 <= fraction <= 0.5
        a_vegard = (1 - fraction) * 3.61 + fraction * 4.08
        assert atoms.get_volume() / len(atoms) == pytest.approx(a_vegard**3 / 4)
        assert atoms.info["provenance"].startswith("seed:alloy=CuAu:Au=")
    (water,) = seed_structures("H2O")
    assert len(water) == 3 and not water.pbc.any() and water.info["provenance"] == "seed:molecule=H2O"
    (salt,) = seed_structures("NaCl", kind="bulk", crystalstructure="rocksalt", lattice_constant=5.64)
    assert len(salt) == 32 and salt.get_chemical_formula() == "Cl16Na16"

    ase.io.write(tmp_path / "seeds.extxyz", [cu, water])
    from_file = seed_structures(path=tmp_path / "seeds.extxyz")
    assert [len(a) for a in from_file] == [32, 3]
    assert from_file[1].info["provenance"] == "seed:file=seeds.extxyz:index=1"
    with pytest.raises(ValueError, match="neither an element"):
        seed_structures("Xyzzy")
    with pytest.raises(ValueError, match="exactly one"):
        seed_structures("Cu", path=tmp_path / "seeds.extxyz")


def test_rattle_and_strain_are_seeded_and_bounded():
    seeds = seed_structures("Cu", min_atoms=32)
    rattled = rattle_and_strain(seeds, 4, rattle_std=0.05, strain_max=0.02, seed=3)
    again = rattle_and_strain(seeds, 4, rattle_std=0.05, strain_max=0.02, seed=3)
    for a, b in zip(rattled, again):
        np.testing.assert_array_equal(a.positions, b.positions)
    lengths = np.array([atoms.cell.lengths() for atoms in rattled]) / seeds[0].cell.lengths()
    assert np.abs(lengths - 1).max() <= 0.02 + 1e-9 and np.abs(lengths - 1).max() > 0.002
    unstrained = rattle_and_strain(seeds, 1, rattle_std=0.05, strain_max=0.0, seed=3)[0]
    displacement = unstrained.positions - seeds[0].positions
    displacement -= np.round(displacement / 3.61) * 3.61  # undo wrapping into the cell
    assert np.std(displacement) == pytest.approx(0.05, rel=0.15)
    assert rattled[2].info == {
        "provenance": "rattle:seed=0:i=2:std=0.05:strain=0.02",
        "config_type": "rattle",
        "seed_index": 0,
    }


def test_deduplicate_removes_moved_permuted_copies_and_keeps_rattled_ones():
    seeds = seed_structures("CuAu", num_seeds=1, min_atoms=16)
    original = rattle_and_strain(seeds, 1, rattle_std=0.05, seed=0)[0]
    copy = original[np.random.default_rng(0).permutation(len(original))]  # reordered atoms
    copy.translate([0.3, -1.0, 2.0])
    copy.wrap()
    nearby = original.copy()
    nearby.positions[3] += 0.02  # a genuinely different structure
    kept = deduplicate([original, copy, nearby, original.copy()], tolerance=0.01)
    assert len(kept) == 2 and kept[0] is original and kept[1] is nearby
    rotated = seed_structures("H2O")[0]
    spun = rotated.copy()
    spun.rotate(40, "z", center="COM")
    assert len(deduplicate([rotated, spun])) == 1


def test_sampled_structures_carry_provenance():
    seeds = seed_structures("CuAu", num_seeds=2, min_atoms=8)
    config = SamplingConfig(
        num_rattle=5, temperatures=(300, 900), snapshots_per_run=3, equilibration_steps=5, snapshot_interval=5
    )
    structures = sample_structures(seeds, EMT(), config)
    kinds = [atoms.info["config_type"] for atoms in structures]
    assert kinds.count("rattle") == 5 and kinds.count("md_300K") == 3 and kinds.count("md_900K") == 3
    assert all("provenance" in atoms.info for atoms in structures)
    md = [atoms for atoms in structures if atoms.info["config_type"] == "md_900K"]
    assert [atoms.info["provenance"] for atoms in md] == [f"md:T=900K:seed=1:run=1:step={s}" for s in (10, 15, 20)]
    assert {atoms.info["md_run"] for atoms in md} == {1}
    for atoms in structures:
        distances = atoms.get_all_distances(mic=True)[np.triu_indices(len(atoms), k=1)]
        assert distances.min() > 1.8


def _counting_teachers(monkeypatch, counting_emt, fail_after=None):
    """make_calculator returns counting EMTs; the first one made (the teacher) may die after some calls."""
    made = []

    def make_calculator(name, **kwargs):
        made.append(counting_emt(fail_after=fail_after if not made else None))
        return made[-1]

    monkeypatch.setattr(calculators_module, "make_calculator", make_calculator)
    return made


def test_distillation_set_is_cached_labelled_with_rows_and_resumable(tmp_path, monkeypatch, counting_emt):
    def small(cache: str, **changes) -> SamplingConfig:
        # Seeds as given: the teacher's calls here are the labels' alone (seed placement: the test below).
        options = {"system": "Cu", "cache_dir": str(tmp_path / cache), "md_driver": "emt", "progress": False}
        return SamplingConfig(**{**options, **SMALL, "seed_volume": "given", **changes})

    made = _counting_teachers(monkeypatch, counting_emt, fail_after=20)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        build_distillation_dataset(small("a", chunk_size=2))
    assert len(made) == 2 and made[1].calls > 0  # the cheap MD driver ran
    assert len(list((tmp_path / "a").glob("*.sampled.extxyz"))) == 1
    assert not [p for p in (tmp_path / "a").glob("*.extxyz") if p.name.count(".") == 1]  # no final-looking file

    made = _counting_teachers(monkeypatch, counting_emt)
    path = build_distillation_dataset(small("a", chunk_size=2))
    assert len(made) == 1  # no MD again: the sampled structures were kept
    frames = read_labelled(path)
    # 1 seed + 6 rattled + 3 MD snapshots; 3 calls each (energy+forces, 2 for the Hessian row); 6 done before
    assert len(frames) == 10 and made[0].calls == 3 * 10 - 18
    assert not list((tmp_path / "a").glob("*.partial.extxyz")) and not list((tmp_path / "a").glob("*.sampled*"))
    for frame in frames:
        coords, rows = stored_hessian_rows(frame)
        assert coords.shape == (1,) and rows.shape == (1, 24) and np.isfinite(rows).all()
        assert frame.info["provenance"].split(":")[0] in {"seed", "rattle", "md"}
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["num_structures"] == 10 and meta["config"]["hessian"]["rows"] == 1

    made = _counting_teachers(monkeypatch, counting_emt)
    assert small("a")() == path  # calling the config builds (here: finds) the set
    assert made == []  # cached: no calculator built
    fresh = build_distillation_dataset(small("b", chunk_size=2))
    assert fresh.name == path.name and fresh.read_bytes() == path.read_bytes()


def test_sampling_config_is_checked_and_names_the_bad_field(tmp_path):
    with pytest.raises(ValueError, match=r"SamplingConfig.num_rattle=-1 \(data.source.num_rattle\).*>= 0"):
        SamplingConfig(system="Cu", num_rattle=-1)
    with pytest.raises(ValueError, match=r"unknown keys \['min_atom'\].*accepted: .*min_atoms"):
        SamplingConfig(system="Cu", system_options={"min_atom": 8})
    with pytest.raises(ValueError, match="temperatures"):
        SamplingConfig(system="Cu", temperatures=[300, -5])
    with pytest.raises(ValueError, match="exactly one of system"):
        SamplingConfig(cache_dir=str(tmp_path))()  # checked before any work
    with pytest.raises(ValueError, match="Unknown sampling options"):
        SamplingConfig.from_dict({"system": "Cu", "num_ratle": 3})
    assert SamplingConfig(system="Cu", hessian_rows=2).teacher_calls_per_structure() == 5


def test_cache_keys_of_existing_sets_are_kept():
    """Users' cached sets stay valid: these names were computed by the code before the teachers API became
    public modules (commit 364fb48), for the default built-in set and the distill_chgnet recipe's set."""
    from mlff_distiller.teachers.cache import cache_files, cache_key
    from mlff_distiller.teachers.generate import _dataset_config

    default_set, _ = cache_files(None, "cuau_emt", _dataset_config(1100, 0, "emt", {}, {}))
    assert default_set.name == "cuau_emt_f60ba9053c92.extxyz"
    recipe = SamplingConfig(
        system="CuAu",
        teacher="chgnet",
        system_options={"min_atoms": 32},
        num_rattle=120,
        temperatures=[300, 600, 900],
        snapshots_per_run=15,
        snapshot_interval=5,
        hessian_rows=2,
        hessian_method="fd",
        seed_volume="given",
    )
    assert cache_key(recipe.cache_config()) == "2b5dbdc002fe"
    # Seeds placed at the teacher's volume (the default) are other structures, so another set.
    assert cache_key(recipe.replace(seed_volume="teacher").cache_config()) != "2b5dbdc002fe"
    # Rows by autograd (the default for CHGNet: hessian_method=auto) are other labels, so another set.
    assert cache_key(recipe.replace(hessian_method="auto").cache_config()) != "2b5dbdc002fe"
    # A volume scan adds structures, so another set; an empty one is the same set.
    assert cache_key(recipe.replace(volume_scan=[]).cache_config()) == "2b5dbdc002fe"
    assert cache_key(recipe.replace(volume_scan=[-0.05, 0.05]).cache_config()) != "2b5dbdc002fe"


def test_volume_copies_scale_each_crystal_seed_isotropically_and_count_in_round_0():
    (cu,) = seed_structures("Cu", min_atoms=8)
    (water,) = seed_structures("H2O")
    copies = volume_copies([cu, water], [-0.06, 0.03])
    assert [atoms.get_volume() / cu.get_volume() for atoms in copies] == pytest.approx([0.94, 1.03])
    np.testing.assert_allclose(copies[0].get_scaled_positions(), cu.get_scaled_positions(), atol=1e-12)
    np.testing.assert_allclose(copies[0].cell.angles(), cu.cell.angles())
    assert copies[1].info == {"provenance": "volume:seed=0:dv=+0.03", "config_type": "volume", "seed_index": 0}
    config = SamplingConfig(system="Cu", system_options={"min_atoms": 8}, num_rattle=5, temperatures=[])
    assert config.replace(volume_scan=[-0.06, 0.03]).most_structures() == config.most_structures() + 2 == 8
    with pytest.raises(ValueError, match=r"volume_scan=\[0.0\].*non-zero and in \(-0.5, 0.5\)"):
        config.replace(volume_scan=[0.0])


def test_crystal_seeds_sit_at_the_teachers_equilibrium_volume(tmp_path, counting_emt):
    """EMT copper's lattice constant is not the experimental 3.61 Å the seeds are built with: after placement
    the seed's energy is at its minimum against isotropic strain, found by an independent scan; the volumes
    are cached, so a second call costs no teacher call; a water box (a liquid) is kept as given."""
    config = SamplingConfig(system="Cu", cache_dir=str(tmp_path), progress=False)
    (given,) = config.seeds()
    teacher = counting_emt()
    (placed,) = config.teacher_seeds(teacher)
    assert teacher.calls == config.seed_teacher_calls() == 9
    scale = (placed.get_volume() / given.get_volume()) ** (1 / 3)
    assert abs(scale - 1) > 0.003  # EMT's Cu is not at 3.61 Å
    lattice = 3.61 * scale

    def energy(a: float) -> float:
        atoms = given.copy()
        atoms.set_cell(given.cell.array * a / 3.61, scale_atoms=True)
        atoms.calc = EMT()
        return atoms.get_potential_energy()

    scan = np.linspace(lattice - 0.02, lattice + 0.02, 41)
    assert abs(scan[int(np.argmin([energy(a) for a in scan]))] - lattice) <= 0.0015
    again = counting_emt()
    assert np.allclose(config.teacher_seeds(again)[0].cell.array, placed.cell.array) and again.calls == 0
    water = SamplingConfig(system="water", cache_dir=str(tmp_path), progress=False)
    assert water.seed_teacher_calls() == 0
    assert all(np.allclose(a.cell.array, b.cell.array) for a, b in zip(water.teacher_seeds(None), water.seeds()))


def _displacements(atoms, base):
    """Each atom's displacement from ``base`` (fresh_copy wraps positions into the cell: modulo the cell)."""
    step = atoms.positions - base.positions
    return step - np.round(step @ np.linalg.inv(base.cell.array)) @ base.cell.array


def test_contact_copies_push_a_pair_together_moving_whole_molecules():
    """Water: the pushed pair ends at its recorded distance, within the range x its element pair's closest contact
    in the bases; two molecules move whole by equal and opposite steps along the pair's line (a bond pushed
    within one molecule moves its two atoms alone); no other pair comes closer than the range's low end allows;
    every element pair comes up; seeded."""
    from mlff_distiller.md.stability import closest_contacts, pair_name

    seeds = seed_structures("water", min_atoms=36, num_seeds=2)
    bases = [
        fresh_copy(atoms, provenance=f"base:{k}")
        for k, atoms in enumerate(rattle_and_strain(seeds, 4, rattle_std=0.05))
    ]
    contacts = closest_contacts(bases)
    assert set(contacts) == {"H-H", "H-O", "O-O"}
    copies = contact_copies(bases, 40, (0.7, 0.9), seed=3)
    seen, kinds = set(), set()
    for atoms in copies:
        fields = dict(part.split("=") for part in atoms.info["provenance"].split(":")[1:])
        base = bases[int(fields["base"])]
        i, j = int(fields["i"]), int(fields["j"])
        assert atoms.info["derived_from"] == base.info["provenance"]
        molecule = np.arange(len(base)) // 3  # the built-in box lists each molecule as O, H, H
        step = _displacements(atoms, base)
        moved = set(np.flatnonzero(np.linalg.norm(step, axis=1) > 1e-9))
        if molecule[i] == molecule[j]:
            assert moved == {i, j}
            kinds.add("bond")
        else:
            assert moved == set(np.flatnonzero((molecule == molecule[i]) | (molecule == molecule[j])))
            kinds.add("molecules")
        for atom in moved:  # each side rigidly, the two sides opposite
            expected = (
                step[i] if atom == i or (molecule[atom] == molecule[i] and molecule[i] != molecule[j]) else -step[i]
            )
            np.testing.assert_allclose(step[atom], expected, atol=1e-9)
        before = base.get_distance(i, j, mic=True, vector=True)
        assert abs(np.dot(step[i], before)) == pytest.approx(np.linalg.norm(step[i]) * np.linalg.norm(before))
        after = atoms.get_distance(i, j, mic=True)
        name = pair_name((int(atoms.numbers[i]), int(atoms.numbers[j])))
        assert fields["pair"] == name and after == pytest.approx(float(fields["to"]), abs=1e-3)
        assert after < np.linalg.norm(before)
        assert 0.7 * contacts[name] - 1e-9 <= after <= 0.9 * contacts[name] + 1e-9
        for pair, distance in closest_contacts([atoms]).items():
            assert distance >= 0.7 * contacts[pair] - 1e-9
        assert atoms.info["config_type"] == "contact" and atoms.info["train_only"] is True
        seen.add(name)
    assert seen == {"H-H", "H-O", "O-O"} and kinds == {"bond", "molecules"}
    again = contact_copies(bases, 40, (0.7, 0.9), seed=3)
    assert all(np.array_equal(a.positions, b.positions) for a, b in zip(copies, again))
    other = contact_copies(bases, 40, (0.7, 0.9), seed=4)
    assert not all(np.array_equal(a.positions, b.positions) for a, b in zip(copies, other))


def test_contact_copies_of_a_metal_move_the_two_atoms_alone():
    (alloy,) = seed_structures("CuAu", num_seeds=1, min_atoms=32)
    base = rattle_and_strain([alloy], 1, rattle_std=0.05)[0]
    for atoms in contact_copies([base], 6, (0.75, 0.8), seed=0):
        fields = dict(part.split("=") for part in atoms.info["provenance"].split(":")[1:])
        step = _displacements(atoms, base)
        moved = np.flatnonzero(np.linalg.norm(step, axis=1) > 1e-9)
        assert sorted(moved) == sorted([int(fields["i"]), int(fields["j"])])


def test_contact_copies_in_round_0_count_key_the_cache_and_are_checked():
    seeds = seed_structures("CuAu", num_seeds=2, min_atoms=8)
    config = SamplingConfig(
        num_rattle=5, temperatures=[600], snapshots_per_run=3, equilibration_steps=5, snapshot_interval=5
    )
    structures = sample_structures(seeds, EMT(), config.replace(num_contacts=4))
    contacts = [atoms for atoms in structures if atoms.info["config_type"] == "contact"]
    md = [atoms for atoms in structures if atoms.info["config_type"] == "md_600K"]
    assert len(contacts) == 4 and len(structures) == len(sample_structures(seeds, EMT(), config)) + 4
    # pushed from the MD snapshots
    assert {int(a.info["provenance"].split(":")[1].split("=")[1]) for a in contacts} <= set(range(len(md)))
    sized = SamplingConfig(system="Cu", system_options={"min_atoms": 8}, num_rattle=5, temperatures=[600])
    assert sized.replace(num_contacts=7).most_structures() == sized.most_structures() + 7
    key = sized.cache_config()
    assert sized.replace(num_contacts=0, contact_range=[0.5, 0.6]).cache_config() == key  # none: the same set
    assert sized.replace(num_contacts=3).cache_config() != key
    assert (
        sized.replace(num_contacts=3).cache_config()
        != sized.replace(num_contacts=3, contact_range=[0.8, 1]).cache_config()
    )
    with pytest.raises(
        ValueError, match=r"contact_range=\[0.9, 0.8\] \(data.source.contact_range\).*0 < low <= high <= 1"
    ):
        sized.replace(contact_range=[0.9, 0.8])
    with pytest.raises(ValueError, match=r"num_contacts=-2 \(data.source.num_contacts\)"):
        sized.replace(num_contacts=-2)
    with pytest.raises(ValueError, match=r"num_contacts=3 \(data.source.num_contacts\).*pushed from MD snapshots"):
        sized.replace(temperatures=[], num_contacts=3)  # no MD to push from
