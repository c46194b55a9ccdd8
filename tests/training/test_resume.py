"""Resume equivalence: an interrupted run continued from last.pt ends exactly where the straight run ends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from trainer_testkit import RESUME_VARIANTS, StopAfterEpoch, build_resume_run

COMPARED = ("epoch", "lr", "train/loss", "val/loss")
TESTKIT_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTKIT_DIR.parents[1]


def _straight(tmp_path, variant):
    trainer = build_resume_run(variant, str(tmp_path / "straight"))
    trainer.fit()
    return trainer


def _interrupted(tmp_path, variant):
    """Runs epochs 1-2 and stops, as if the process had been killed after writing last.pt."""
    trainer = build_resume_run(variant, str(tmp_path / "resumed"), callbacks=[StopAfterEpoch(2)])
    history = trainer.fit()
    assert history["epoch"] == [1.0, 2.0]
    return trainer


def _assert_same_run(straight, resumed_history, resumed_params, resumed_ema=None):
    for name in COMPARED:
        assert resumed_history[name] == straight.history[name], name
    for (name, expected), actual in zip(straight.model.state_dict().items(), resumed_params.values()):
        assert torch.equal(expected, actual), name
    if resumed_ema is not None:
        for name, expected in straight.ema.state_dict()["shadow"].items():
            assert torch.equal(expected, resumed_ema[name]), f"ema {name}"


@pytest.mark.parametrize("variant", sorted(RESUME_VARIANTS))
def test_resumed_run_equals_straight_run(tmp_path, variant):
    """4 epochs straight == 2 epochs, then a FRESH model + FRESH Trainer + load_checkpoint(last.pt) + fit():
    same final weights, same per-epoch lr and losses (and the same EMA shadow), with shuffling, dropout,
    EMA and cosine/plateau schedules in play."""
    straight = _straight(tmp_path, variant)
    _interrupted(tmp_path, variant)

    torch.manual_seed(999)  # whatever the global RNG holds now must not matter
    resumed = build_resume_run(variant, str(tmp_path / "resumed"), model_seed=7)
    assert not torch.equal(resumed.model[0].weight, straight.model[0].weight)
    resumed.load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert (resumed.epoch, resumed.global_step) == (2, 12)
    resumed.fit()

    assert resumed.global_step == straight.global_step == 24
    _assert_same_run(
        straight,
        resumed.history,
        resumed.model.state_dict(),
        resumed.ema.state_dict()["shadow"] if resumed.ema is not None else None,
    )
    if resumed.ema is not None:
        assert resumed.ema.num_updates == straight.ema.num_updates == 24
    assert resumed.best_metric == straight.best_metric and resumed.best_epoch == straight.best_epoch
    lrs = straight.history["lr"]
    assert lrs[3] < lrs[1]  # the schedule really moves after the resume point


def test_plateau_variant_reduces_lr_after_resume_point(tmp_path):
    """Guard for the plateau variant: the lr drop it must reproduce happens in the resumed half."""
    lrs = _straight(tmp_path, "plateau_ema").history["lr"]
    assert lrs[:2] == [0.05, 0.05]
    assert min(lrs[2:]) < 0.05


def test_resume_in_a_separate_process(tmp_path):
    """The continuation runs in a new Python process (no shared memory, new RNG) and still reproduces the
    straight run bit for bit."""
    variant = "cosine_ema_loader_generator"
    straight = _straight(tmp_path, variant)
    _interrupted(tmp_path, variant)
    script = tmp_path / "resume_child.py"
    script.write_text(
        textwrap.dedent(f"""
        import json, sys
        import torch
        sys.path.insert(0, {str(TESTKIT_DIR)!r})
        from trainer_testkit import build_resume_run

        torch.set_num_threads(1)
        trainer = build_resume_run({variant!r}, {str(tmp_path / "resumed")!r}, model_seed=31)
        trainer.load_checkpoint({str(tmp_path / "resumed" / "last.pt")!r})
        trainer.fit()
        torch.save({{"model": trainer.model.state_dict(), "ema": trainer.ema.state_dict()["shadow"]}},
                   {str(tmp_path / "child_result.pt")!r})
        json.dump(trainer.history, open({str(tmp_path / "child_history.json")!r}, "w"))
    """)
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    completed = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    result = torch.load(tmp_path / "child_result.pt", weights_only=True)
    history = json.loads((tmp_path / "child_history.json").read_text())
    _assert_same_run(straight, history, result["model"], result["ema"])


def test_resume_with_more_epochs_extends_cosine_to_the_new_end(tmp_path):
    """Raising max_epochs on resume (an allowed change) trains the extra epochs, and the cosine schedule
    continues from where it was, decreasing monotonically to min_lr at the new last epoch."""
    variant = "cosine"
    interrupted = _interrupted(tmp_path, variant)
    longer = build_resume_run(variant, str(tmp_path / "resumed"), model_seed=5, max_epochs=6)
    longer.load_checkpoint(tmp_path / "resumed" / "last.pt")
    history = longer.fit()
    lrs = history["lr"]
    assert history["epoch"] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert lrs[:2] == interrupted.history["lr"]
    assert all(a > b > 0 for a, b in zip(lrs[1:], lrs[2:]))
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # min_lr after epoch 6
    assert longer.global_step == 36


def test_resume_of_finished_cosine_run_with_more_epochs_stays_at_min_lr(tmp_path):
    """A finished cosine schedule that is given more epochs stays at its minimum (documented), it does
    not rise again."""
    finished = build_resume_run("cosine", str(tmp_path / "run"), min_lr=0.001)
    finished.fit()
    longer = build_resume_run("cosine", str(tmp_path / "run"), model_seed=5, max_epochs=7, min_lr=0.001)
    longer.load_checkpoint(tmp_path / "run" / "last.pt")
    lrs = longer.fit()["lr"]
    assert lrs[:4] == finished.history["lr"]
    assert lrs[4:] == pytest.approx([0.001] * 3, rel=1e-9)
