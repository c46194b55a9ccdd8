"""MD throughput of a student in every engine, next to the teacher in ASE, and the per-call overhead of the student
interface (issue 17 item 4).

    python benchmarks/md_throughput.py [--sizes 32 256 2048] [--steps 50] [--engines ase lammps ipi openmm torchsim]
                                       [--teacher emt] [--batch 64] [--threads 2] [--model schnet]

Three tables, each measured side by side in one process (run it on a quiet machine: absolute figures are
meaningless under load, ratios less so):

1. **Per-call overhead.** Energy + forces calls/s through ASE for a SchNet 64x3 student (untrained: speed does not
   depend on the weights) at each size, the atoms moving by a thermal-sized step (0.01 Å rms) before every call, as
   in MD: "fresh list" is the calculator as it was before the MD work (a new vesin list, graph and batch every call,
   ASE's generic state check), "student interface" is :class:`~mlff_distiller.calculator.StudentCalculator` now
   (skin lists, lean path). Target: >= 2x at 32 atoms, >= 1.5x at 2048 (with helper-speed's model work).
2. **Engines.** NVE of Cu-Au fcc cells at 300 K, 1 fs: atom-steps/s and ns/day from the driver's wall time (engine
   steps only; one energy evaluation at the start and end), every engine, and the teacher in ASE.
3. **torch-sim batched.** ``--batch`` systems of 32 atoms stepped as one ``SimState`` vs the same systems stepped
   one at a time, both through the torch-sim student model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes

sys.path.insert(0, str(Path(__file__).resolve().parent))


def cell(atoms_count: int, seed: int = 0):
    repeats = {32: 2, 108: 3, 256: 4, 864: 6, 2048: 8}[atoms_count]
    atoms = bulk("Cu", "fcc", a=3.70, cubic=True) * (repeats, repeats, repeats)
    rng = np.random.default_rng(seed)
    symbols = np.array(atoms.get_chemical_symbols())
    symbols[rng.random(len(atoms)) < 0.25] = "Au"
    atoms.set_chemical_symbols(symbols.tolist())
    atoms.rattle(0.05, seed=seed)
    return atoms


def student(name: str):
    from mlff_distiller.data.statistics import DatasetStatistics
    from mlff_distiller.models.painn import PaiNN
    from mlff_distiller.models.schnet import SchNet

    torch.manual_seed(0)
    statistics_ = DatasetStatistics(atomic_energies={29: -3.5, 79: -3.0}, force_rms=0.8, avg_num_neighbors=43.0)
    return {"schnet": SchNet, "painn": PaiNN}[name](statistics=statistics_)


class FreshListCalculator(Calculator):
    """The student calculator as it was before the MD work: a new neighbour list, graph and batch every call."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, model, dtype=torch.float32):
        super().__init__()
        import copy

        self.model = copy.deepcopy(model).to(dtype=dtype).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.dtype = dtype

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        from mlff_distiller.data import keys
        from mlff_distiller.data.batch import collate_atoms
        from mlff_distiller.data.dataset import atoms_to_graph

        super().calculate(atoms, properties, system_changes)
        self.model.check_elements(self.atoms.numbers)
        batch = collate_atoms([atoms_to_graph(self.atoms, self.model.cutoff, with_labels=False, dtype=self.dtype)])
        self.model.compute_stress = False
        output = self.model(batch)
        self.results = {
            "energy": float(output[keys.ENERGY].detach().sum()),
            "forces": output[keys.FORCES].detach().double().numpy(),
        }


def calls_per_second(calculator, atoms, seconds: float, seed: int = 0) -> float:
    atoms = atoms.copy()
    atoms.calc = calculator
    rng = np.random.default_rng(seed)
    origin = atoms.positions.copy()
    atoms.get_forces()  # warm-up
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        # A thermal-sized step (0.01 Å rms per component), around the start so the walk stays physical.
        atoms.positions = origin + rng.normal(0.0, 0.01, size=origin.shape) + 0.3 * (atoms.positions - origin)
        start = time.perf_counter()
        atoms.get_forces()
        times.append(time.perf_counter() - start)
    return 1.0 / statistics.median(times)


def overhead_table(model_name: str, sizes: list[int], seconds: float) -> None:
    from mlff_distiller.calculator import StudentCalculator

    model = student(model_name)
    print(f"\n## Per-call overhead: {model_name} energy + forces through ASE (calls/s; median of {seconds:.0f} s)")
    print("| atoms | fresh list | student interface | ratio |\n|---|---|---|---|")
    for size in sizes:
        atoms = cell(size)
        rounds = []
        for _ in range(2):  # alternating, so that load changes hit both
            before = calls_per_second(FreshListCalculator(model), atoms, seconds / 2)
            after = calls_per_second(StudentCalculator(model), atoms, seconds / 2)
            rounds.append((before, after))
        before = statistics.mean(r[0] for r in rounds)
        after = statistics.mean(r[1] for r in rounds)
        print(f"| {size} | {before:.1f} | {after:.1f} | {after / before:.2f}x |")


def teacher_calculator(name: str):
    if name == "emt":
        from ase.calculators.emt import EMT

        return EMT()
    from mlff_distiller.teachers.calculators import make_calculator

    return make_calculator(name)


def engine_table(model_name: str, sizes: list[int], engines: list[str], steps: int, teacher: str) -> None:
    from mlff_distiller.md.driver import MDSettings, run_md
    from mlff_distiller.md.engines import engine_available
    from mlff_distiller.md.potential import StudentPotential

    model = student(model_name)
    print(f"\n## Engines: NVE, {steps} steps of 1 fs, {model_name} (float32) and the {teacher} teacher in ASE")
    print("| atoms | engine | atom-steps/s | ns/day |\n|---|---|---|---|")
    settings = MDSettings(ensemble="nve", temperature_K=300.0, timestep_fs=1.0, steps=steps, thermo_interval=steps,
                          write_interval=steps, min_distance=0.0)  # fmt: skip
    for size in sizes:
        atoms = cell(size)
        for engine in engines:
            if not engine_available(engine):
                print(f"| {size} | {engine} | not installed | |")
                continue
            summary = run_md(StudentPotential(model), atoms, settings, engine=engine)
            print(f"| {size} | {engine} | {summary.atom_steps_per_s:.0f} | {summary.ns_per_day:.3f} |")
        summary = run_md(teacher_calculator(teacher), atoms, settings, engine="ase")
        print(f"| {size} | teacher ({teacher}) in ase | {summary.atom_steps_per_s:.0f} | {summary.ns_per_day:.3f} |")


def batched_table(model_name: str, batch: int, steps: int) -> None:
    from mlff_distiller.md.engines import engine_available

    if not engine_available("torchsim"):
        print("\n## torch-sim batched: torch-sim is not installed")
        return
    from torch_sim.integrators import nve
    from torch_sim.integrators.md import MDState
    from torch_sim.units import MetalUnits

    from mlff_distiller.md.driver import initial_momenta
    from mlff_distiller.md.engines.torchsim_engine import student_model
    from mlff_distiller.md.potential import StudentPotential

    systems = [cell(32, seed=k) for k in range(batch)]
    for k, atoms in enumerate(systems):
        atoms.set_momenta(initial_momenta(atoms, 300.0, k))

    def state(group):
        f = torch.float32
        positions = torch.tensor(np.concatenate([a.positions for a in group]), dtype=f)
        counts = [len(a) for a in group]
        return MDState(
            positions=positions,
            momenta=torch.tensor(np.concatenate([a.get_momenta() for a in group]), dtype=f),
            energy=torch.zeros(len(group), dtype=f),
            forces=torch.zeros_like(positions),
            masses=torch.tensor(np.concatenate([a.get_masses() for a in group]), dtype=f),
            cell=torch.tensor(np.stack([a.cell.array.T for a in group]), dtype=f),
            pbc=True,
            atomic_numbers=torch.tensor(np.concatenate([a.numbers for a in group])),
            system_idx=torch.repeat_interleave(torch.arange(len(group)), torch.tensor(counts)),
        )

    def run(group) -> float:
        model = student_model(StudentPotential(student(model_name)))
        _, update = nve(model, dt=torch.tensor(1e-3 * MetalUnits.time), kT=torch.tensor(300 * MetalUnits.temperature))
        current = state(group)
        output = model(current)
        current.energy, current.forces = output["energy"], output["forces"]
        start = time.perf_counter()
        for _ in range(steps):
            current = update(current)
        return time.perf_counter() - start

    together = run(systems)
    alone = sum(run([atoms]) for atoms in systems)
    atom_steps = 32 * batch * steps
    print(f"\n## torch-sim: {batch} systems of 32 atoms, {steps} NVE steps ({model_name}, float32)")
    print("| mode | atom-steps/s |\n|---|---|")
    print(f"| one batch | {atom_steps / together:.0f} |\n| one at a time | {atom_steps / alone:.0f} |")
    print(f"batched / one at a time: {alone / together:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 256, 2048])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--engines", nargs="+", default=["ase", "lammps", "ipi", "openmm", "torchsim"])
    parser.add_argument("--teacher", default="emt", help="emt | chgnet | sevenn")
    parser.add_argument("--model", default="schnet", help="schnet | painn")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=4.0, help="per size and calculator, overhead table")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], help="overhead | engines | batched")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    if "overhead" not in args.skip:
        overhead_table(args.model, args.sizes, args.seconds)
    if "engines" not in args.skip:
        engine_table(args.model, args.sizes, args.engines, args.steps, args.teacher)
    if "batched" not in args.skip:
        batched_table(args.model, args.batch, args.steps)


if __name__ == "__main__":
    main()
