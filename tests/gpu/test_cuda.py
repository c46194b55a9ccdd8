"""The Trainer and the students on a CUDA device (skipped without one): fp16 with a GradScaler and bf16
autocast, exact resume with the CUDA RNG stream, a one-rank NCCL group under torchrun, and the students on
cuda against cpu and against finite differences.

Figures (fp16 skipped steps, bf16 force deviations, cuda-cpu differences) are printed at the end of the run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

TESTS_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = TESTS_DIR.parent
# The kits live beside the tests that own them; pytest puts only this test's own directory on sys.path.
for kit_dir in (TESTS_DIR / "training", TESTS_DIR / "models"):
    if str(kit_dir) not in sys.path:
        sys.path.insert(0, str(kit_dir))

from atoms_testkit import (  # noqa: E402
    assert_forces_are_minus_the_gradient,
    cu_au_cell,
    make_batch,
    methane,
    predict,
    small_model,
    to_item,
)
from trainer_testkit import (  # noqa: E402
    RESUME_VARIANTS,
    RecordingLogger,
    StopAfterEpoch,
    loader,
    make_config,
    mlp,
    regression_data,
)

from mlff_distiller import StudentCalculator  # noqa: E402
from mlff_distiller.data import keys  # noqa: E402
from mlff_distiller.data.statistics import compute_statistics  # noqa: E402
from mlff_distiller.losses.energy_force import EnergyForceLoss  # noqa: E402
from mlff_distiller.training import Trainer, load_checkpoint_file  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = "cuda"
MODEL_NAMES = ["schnet", "painn"]
COMPARED = ("epoch", "lr", "train/loss", "val/loss")
RESUME_VARIANT = "cosine_ema_loader_generator"
"""The kit's richest resume run: dropout, a shuffled loader with its own generator, EMA, warmup, cosine. Its
loader draws from its own (CPU) generator, so the dropout on the GPU is the only draw from a global stream."""


def _trainer(model: torch.nn.Module, train: Any, val: Any, *, loggers: Any = (), callbacks: Any = None, **config):
    """A silent Trainer on the GPU; keyword arguments are TrainingConfig fields (the kit's ``make_trainer`` is CPU)."""
    return Trainer(
        model,
        train,
        val,
        config=make_config(device=DEVICE, **config),
        device=DEVICE,
        loggers=list(loggers),
        callbacks=callbacks,
    )


def _resume_run(directory: Path, precision: str, model_seed: int = 0, callbacks: Any = None) -> Trainer:
    """The kit's ``build_resume_run`` on the GPU, 4 epochs of 6 steps."""
    options = {key: value for key, value in RESUME_VARIANTS[RESUME_VARIANT].items() if not key.startswith("_")}
    x, y = regression_data(n=48, seed=1, noise=0.3)
    xv, yv = regression_data(n=32, seed=2, noise=2.0)
    train = loader(x, y, batch_size=8, shuffle=True, generator=torch.Generator())
    return _trainer(
        mlp(hidden=16, dropout=0.3, seed=model_seed),
        train,
        loader(xv, yv, batch_size=16),
        callbacks=callbacks,
        max_epochs=4,
        checkpoint_dir=str(directory),
        seed=123,
        mixed_precision=precision,
        **options,
    )


def _straight_and_resumed(tmp_path: Path, precision: str) -> tuple[Trainer, Trainer]:
    """4 epochs straight, and 2 epochs + a FRESH model and Trainer that loads last.pt (not yet fitted)."""
    straight = _resume_run(tmp_path / "straight", precision)
    straight.fit()
    interrupted = _resume_run(tmp_path / "resumed", precision, callbacks=[StopAfterEpoch(2)])
    assert interrupted.fit()["epoch"] == [1.0, 2.0]
    torch.manual_seed(999)  # whatever the global streams (CPU and CUDA) hold now must not matter
    resumed = _resume_run(tmp_path / "resumed", precision, model_seed=7)
    resumed.load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert (resumed.epoch, resumed.global_step) == (2, 12)
    return straight, resumed


# ------------------------------------------------------------------------------------------- fp16
def test_fp16_with_grad_scaler_trains_and_checkpoints_the_scaler(tmp_path, reliability_report):
    """mixed_precision='fp16' on cuda: the layers run in float16, the loss falls (< 0.2x after 15 epochs, as the
    CPU bf16 test asks), nothing non-finite reaches the weights or the history, every skipped step is one
    GradScaler backoff (scale = 65536 / 2^skips) in the first half of the run (CPU fp16 autocast: steps 0, 1 and 8
    of 120), and last.pt holds the scaler's exact state."""
    x, y = regression_data(n=64, seed=0)
    xv, yv = regression_data(n=32, seed=1)
    model = mlp(hidden=16)
    layer_dtypes: set[torch.dtype] = set()
    model[0].register_forward_hook(lambda module, args, out: layer_dtypes.add(out.dtype))
    logger = RecordingLogger()
    trainer = _trainer(
        model,
        loader(x, y),
        loader(xv, yv),
        loggers=[logger],
        max_epochs=15,
        optimizer="adam",
        learning_rate=0.02,
        mixed_precision="fp16",
        checkpoint_dir=str(tmp_path / "run"),
    )
    history = trainer.fit()

    assert layer_dtypes == {torch.float16}
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in model.parameters())
    for name in ("train/loss", "val/loss"):
        assert all(math.isfinite(v) for v in history[name]), name
        assert history[name][-1] < 0.2 * history[name][0], (name, history[name])

    skipped = [step for step, metrics in logger.records if "train/nonfinite_steps" in metrics]
    initial_scale = torch.amp.GradScaler(DEVICE).get_scale()
    scale = trainer.scaler.get_scale()
    assert len(skipped) == trainer.nonfinite["total"] == round(math.log2(initial_scale / scale))
    assert all(step < trainer.global_step // 2 for step in skipped), skipped  # calibration, not divergence
    saved = load_checkpoint_file(tmp_path / "run" / "last.pt")["grad_scaler"]
    assert saved == trainer.scaler.state_dict()
    # Successful steps since the last backoff: the tracker a resumed scaler must continue from.
    assert saved["_growth_tracker"] == trainer.global_step - (max(skipped) + 1 if skipped else 0)
    reliability_report(
        "fp16 GradScaler (cuda)",
        f"{len(skipped)} skipped steps {skipped} of {trainer.global_step}, scale {initial_scale:g} -> {scale:g}, "
        f"train loss {history['train/loss'][0]:.3g} -> {history['train/loss'][-1]:.3g}",
    )


@pytest.mark.parametrize("precision", ["off", "fp16"])
def test_resumed_run_on_cuda_equals_the_straight_run(tmp_path, precision):
    """As tests/training/test_resume.py on the CPU, bit for bit: 4 epochs straight == 2 epochs, then a fresh model
    and Trainer + load_checkpoint(last.pt) + fit(): the same per-epoch lr and losses, weights, EMA shadow and (fp16)
    GradScaler state."""
    straight, resumed = _straight_and_resumed(tmp_path, precision)
    if precision == "fp16":
        saved = load_checkpoint_file(tmp_path / "resumed" / "last.pt")["grad_scaler"]
        assert resumed.scaler.state_dict() == saved
    resumed.fit()

    assert resumed.global_step == straight.global_step == 24
    for name in COMPARED:
        assert resumed.history[name] == straight.history[name], name
    for name, expected in straight.model.state_dict().items():
        actual = resumed.model.state_dict()[name]
        assert actual.device.type == DEVICE and torch.equal(actual, expected), name
    for name, expected in straight.ema.state_dict()["shadow"].items():
        assert torch.equal(resumed.ema.state_dict()["shadow"][name], expected), f"ema {name}"
    if precision == "fp16":
        assert resumed.scaler.state_dict() == straight.scaler.state_dict()


def test_checkpoints_hold_the_cuda_rng_stream_and_the_resume_depends_on_it(tmp_path):
    """last.pt holds every GPU's RNG state, advanced by the dropout on the GPU since the seed; a resume that
    restores it reproduces the straight run, and the same resume with the CUDA stream reseeded does not (so the
    dropout really draws from it, and the equality above is the restored stream's doing)."""
    straight, resumed = _straight_and_resumed(tmp_path, "off")
    shutil.copytree(tmp_path / "resumed", tmp_path / "reseeded")  # epoch 2, before `resumed` writes epoch 4 there
    resumed.fit()  # first: loading a checkpoint sets the global streams, which the other resume below replaces
    final = straight.model.state_dict()
    assert all(torch.equal(resumed.model.state_dict()[k], v) for k, v in final.items())
    cuda_states = load_checkpoint_file(tmp_path / "reseeded" / "last.pt")["rng"]["cuda"]
    assert len(cuda_states) == torch.cuda.device_count()
    torch.manual_seed(123)  # the run's seed: where the stream started
    assert not torch.equal(cuda_states[0].cpu(), torch.cuda.get_rng_state()), "the dropout drew nothing on the GPU"

    reseeded = _resume_run(tmp_path / "reseeded", "off", model_seed=7)
    reseeded.load_checkpoint(tmp_path / "reseeded" / "last.pt")
    assert reseeded.global_step == 12
    torch.cuda.manual_seed_all(2024)  # only the CUDA stream differs from the resume above
    reseeded.fit()
    assert reseeded.global_step == 24
    assert not all(torch.equal(reseeded.model.state_dict()[k], v) for k, v in final.items())


# ------------------------------------------------------------------------------------------- bf16
def _emt_batches() -> tuple[list, list, Any]:
    """EMT-labelled 32-atom Cu-Au cells in float32: 3 training batches of 4, one validation batch of 4, and the
    training split's statistics (reference energies, force scale) for the student."""
    from ase.calculators.emt import EMT

    cells = [cu_au_cell(seed) for seed in range(16)]
    for atoms in cells:
        atoms.calc = EMT()
    train = [make_batch(cells[i : i + 4], dtype=torch.float32, labels=True) for i in (0, 4, 8)]
    val = [make_batch(cells[12:], dtype=torch.float32, labels=True)]
    statistics = compute_statistics([to_item(atoms, labels=True) for atoms in cells[:12]])
    return train, val, statistics


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_bf16_autocast_trains_a_student_whose_validation_forces_stay_close_to_float32(name, reliability_report):
    """mixed_precision='bf16' on cuda trains a student on energies and forces (its linear layers run in bfloat16):
    the training loss falls below 0.05x and the validation loss below 0.1x of their first epoch (CPU bf16
    autocast: ~0.006x and ~0.01x). Evaluated by Trainer.validate (eval mode, frozen weights, under the Trainer's
    autocast), its forces stay within 5% of the largest force of the same weights in float32 (CPU bf16: <= 1.1%)."""
    train, val, statistics = _emt_batches()
    model = small_model(name, statistics=statistics).float()
    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    layer_dtypes: set[torch.dtype] = set()
    probe = linear.register_forward_hook(lambda module, args, out: layer_dtypes.add(out.dtype))
    loss = EnergyForceLoss(energy_weight=1.0, force_weight=10.0)
    options = {"optimizer": "adam", "learning_rate": 0.01, "grad_clip": 10.0}
    config = make_config(max_epochs=30, mixed_precision="bf16", device=DEVICE, **options)
    bf16 = Trainer(model, train, val, config=config, device=DEVICE, loggers=[], loss_fn=loss)
    history = bf16.fit()
    probe.remove()
    assert layer_dtypes == {torch.bfloat16}
    assert all(math.isfinite(v) for v in history["train/loss"] + history["val/loss"])
    assert history["train/loss"][-1] < 0.05 * history["train/loss"][0], history["train/loss"]
    assert history["val/loss"][-1] < 0.1 * history["val/loss"][0], history["val/loss"]

    forces: list[torch.Tensor] = []
    capture = model.register_forward_hook(lambda module, args, out: forces.append(out[keys.FORCES].detach().clone()))
    low = bf16.validate(val)
    full = Trainer(
        model, train, val, config=make_config(device=DEVICE, **options), device=DEVICE, loggers=[], loss_fn=loss
    )
    high = full.validate(val)
    capture.remove()
    low_forces, high_forces = forces
    assert low_forces.device.type == DEVICE and low_forces.dtype == high_forces.dtype == torch.float32
    deviation = float((low_forces - high_forces).abs().max() / high_forces.abs().max())
    assert deviation <= 0.05, deviation
    reliability_report(
        f"bf16 autocast {name} (cuda)",
        f"train loss {history['train/loss'][0]:.3g} -> {history['train/loss'][-1]:.3g}; validation forces vs float32: "
        f"max |dF| = {100 * deviation:.2f}% of max |F|; val/force_mae {low['val/force_mae']:.1f} (bf16) vs "
        f"{high['val/force_mae']:.1f} meV/A (float32)",
    )


# ------------------------------------------------------------------------------------------- nccl
NCCL_CHILD = """
import json, os
import torch
import torch.distributed as dist
from mlff_distiller.training import distributed
from mlff_distiller.train import main

if __name__ == "__main__":  # the data generator spawns workers, which import this file again
    # One GPU: NCCL refuses two ranks on one device, so this group has one rank, and init_from_env joins a group
    # only for WORLD_SIZE > 1; this one-process launch is declared distributed to take its GPU path
    # (backend cpu:gloo,cuda:nccl).
    distributed.launched_distributed = lambda: True
    main()
    probe = torch.ones(2, device="cuda")
    dist.all_reduce(probe)  # a real NCCL collective: the communicator is created here
    result = {
        "backend": str(dist.get_backend_config()),
        "world_size": dist.get_world_size(),
        "all_reduce": probe.tolist(),
        "device": torch.cuda.current_device(),
    }
    with open(os.environ["NCCL_PROBE"], "w") as handle:
        json.dump(result, handle)
    dist.destroy_process_group()
"""
SMOKE = ["experiment=smoke", "trainer.max_epochs=1", "logger=none", "data.num_train=16", "trainer.batch_size=8"]


def _run(command: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", **env}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def test_one_rank_nccl_group_under_torchrun_trains_like_a_plain_run(tmp_path):
    """torchrun --nproc_per_node 1 runs mlff-train's task on cuda inside a cpu:gloo,cuda:nccl group joined by
    distributed.init_from_env (an NCCL all-reduce included) and writes the run's files; its weights equal a plain
    single-process cuda run's as tests/test_distributed.py asks of gloo (atol 1e-5, far below how far they moved)."""
    script = tmp_path / "nccl_child.py"
    script.write_text(textwrap.dedent(NCCL_CHILD))
    probe = tmp_path / "nccl.json"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    _run([*torchrun, str(script), *SMOKE, "trainer.device=cuda", "hydra.run.dir=nccl"], tmp_path, NCCL_PROBE=str(probe))
    found = json.loads(probe.read_text())
    assert "cuda:nccl" in found["backend"] and found["world_size"] == 1, found
    assert found["all_reduce"] == [1.0, 1.0] and found["device"] == 0
    run_dir = tmp_path / "nccl"
    files = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith("."))
    assert files == ["best_model.pt", "last.pt"] and (run_dir / "metrics.json").is_file()

    _run(
        [sys.executable, "-m", "mlff_distiller.train", *SMOKE, "trainer.device=cuda", "hydra.run.dir=single"], tmp_path
    )
    grouped = load_checkpoint_file(run_dir / "checkpoints/last.pt")
    single = load_checkpoint_file(tmp_path / "single/checkpoints/last.pt")
    assert grouped["config"]["device"] == "cuda:0" and single["config"]["device"] == "cuda"
    assert grouped["global_step"] == single["global_step"] == 2
    for name, value in single["model"].items():
        torch.testing.assert_close(grouped["model"][name], value, rtol=0, atol=1e-5)
    shadow = single["ema"]["shadow"]
    moved = max((single["model"][k].double() - shadow[k].double()).abs().max().item() for k in shadow)
    assert moved > 1e-4, moved  # ten times the tolerance
    assert grouped["history"]["val/force_mae"] == pytest.approx(single["history"]["val/force_mae"], rel=1e-5)


# ------------------------------------------------------------------------------------------- students
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_student_calculator_on_cuda_agrees_with_cpu_in_float32(name, reliability_report):
    """StudentCalculator in float32 on cuda and on cpu, same weights: energies within 1e-5 relative, forces and
    stress within 2e-5 of their largest component (float32 against float64 on a CPU: ~1e-6 to 2e-6 of it)."""
    model = small_model(name, compute_stress=True)
    worst: dict[str, float] = {}
    for atoms in (cu_au_cell(5), methane()):
        properties = ["energy", "forces"] + (["stress"] if atoms.pbc.all() else [])
        results = {}
        for device in ("cpu", DEVICE):
            calculator = StudentCalculator(model, device=device, dtype=torch.float32)
            assert {p.device.type for p in calculator.model.parameters()} == {device}
            copy = atoms.copy()
            results[device] = {p: np.asarray(calculator.get_property(p, copy)) for p in properties}
        cpu, gpu = results["cpu"], results[DEVICE]
        assert gpu["energy"] == pytest.approx(cpu["energy"], rel=1e-5), len(atoms)
        for key in properties[1:]:
            largest = float(np.abs(cpu[key]).max())
            assert largest > 1e-6, f"{key} vanish: the comparison would be vacuous"
            np.testing.assert_allclose(gpu[key], cpu[key], rtol=0, atol=2e-5 * largest, err_msg=f"{key}, {len(atoms)}")
            worst[key] = max(worst.get(key, 0.0), float(np.abs(gpu[key] - cpu[key]).max()) / largest)
        worst["energy"] = max(
            worst.get("energy", 0.0), abs(float(gpu["energy"] - cpu["energy"]) / float(cpu["energy"]))
        )
    reliability_report(f"{name} float32 cuda vs cpu", ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))


STRUCTURES = {"periodic": lambda: cu_au_cell(seed=3), "molecule": methane}


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forces_are_minus_the_energy_gradient_on_cuda_in_float64(name, structure):
    """As tests/models/test_students_physics.py on the CPU: central differences of the energy (eps 1e-5 Å) along
    random directions and single coordinates equal -F.d within 1e-6 of the force scale."""
    model = small_model(name).to(DEVICE).eval()
    batch = make_batch([STRUCTURES[structure]()]).to(DEVICE)
    _, forces = predict(model, batch)
    assert forces.device.type == DEVICE and forces.dtype == torch.float64
    assert_forces_are_minus_the_gradient(model, batch)
