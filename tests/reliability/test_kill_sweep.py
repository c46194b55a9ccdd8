"""SIGKILL sweep: a training process is killed K times at random moments and inside checkpoint writes;
every restart must resume from the newest checkpoint whose write had completed, and the run that
finally completes must end bitwise where an uninterrupted run ends.

K is ``--kill-sweep`` (default 6 in CI; the closing note's figures use 24).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from mlff_distiller.training.checkpoint import load_latest_checkpoint

CHILD = Path(__file__).resolve().parent / "kill_child.py"
# Kill moments cycle through these: anywhere in training, halfway through writing a checkpoint's
# temporary file, and after that file is complete but before it is renamed over last.pt.
MOMENTS = ("random", "mid_write", "random", "before_replace")


def _child(run_dir: Path, work: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [
        sys.executable,
        str(CHILD),
        "--dir",
        str(run_dir),
        "--results",
        str(work / "results.jsonl"),
        "--ready",
        str(work / "ready"),
        *extra,
    ]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.005)
    raise TimeoutError(f"{path} did not appear within {timeout} s")


def test_sigkill_sweep_always_resumes_from_newest_complete_checkpoint(tmp_path, request, reliability_report):
    kills = request.config.getoption("--kill-sweep")
    rng = random.Random(2026)
    run_dir, work = tmp_path / "run", tmp_path / "work"
    work.mkdir()
    moments: dict[str, int] = {m: 0 for m in MOMENTS}
    for index in range(kills):
        for marker in ("ready", "paused"):
            (work / marker).unlink(missing_ok=True)
        moment = MOMENTS[index % len(MOMENTS)]
        extra = (
            []
            if moment == "random"
            else [
                "--pause",
                moment,
                "--pause-marker",
                str(work / "paused"),
                "--pause-after-saves",
                str(rng.randint(1, 4)),
            ]
        )
        process = _child(run_dir, work, *extra)
        assert _wait_for(work / "ready", process), process.communicate()
        if moment == "random":
            time.sleep(rng.uniform(0.0, 0.4))
        else:
            assert _wait_for(work / "paused", process), process.communicate()
        assert process.poll() is None, "the child finished before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        moments[moment] += 1

    # The last restart checks the last kill's resume and then trains to completion.
    last_path, last_state = load_latest_checkpoint(run_dir)
    final_epochs = last_state["epoch"] + 2
    (work / "ready").unlink(missing_ok=True)
    final = _child(run_dir, work, "--max-epochs", str(final_epochs), "--final", str(work / "final.pt"))
    out, err = final.communicate(timeout=120)
    assert final.returncode == 0, err

    reference_work = tmp_path / "reference_work"
    reference_work.mkdir()
    straight = _child(
        tmp_path / "reference",
        reference_work,
        "--max-epochs",
        str(final_epochs),
        "--final",
        str(reference_work / "final.pt"),
    )
    out_ref, err_ref = straight.communicate(timeout=120)
    assert straight.returncode == 0, err_ref
    assert json.loads(out.strip().splitlines()[-1]) == json.loads(out_ref.strip().splitlines()[-1])

    reports = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()]
    assert len(reports) == kills + 1
    after_kills = reports[1:]  # the first process started on an empty directory
    good = sum(r["ok"] for r in after_kills)
    resumed = [r for r in after_kills if r["resumed"]]
    bad = [r for r in after_kills if not r["ok"]]
    assert good == kills, bad

    resumed_weights = torch.load(work / "final.pt", weights_only=True)
    straight_weights = torch.load(reference_work / "final.pt", weights_only=True)
    max_diff = max((resumed_weights[k] - straight_weights[k]).abs().max().item() for k in straight_weights)
    assert all(torch.equal(resumed_weights[k], straight_weights[k]) for k in straight_weights)
    leftovers = [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers

    reliability_report(
        "SIGKILL sweep",
        f"K={kills} kills ({', '.join(f'{v} {k}' for k, v in moments.items())}); good resumes {good}/{kills} "
        f"({len(resumed)} from a checkpoint, {sum(r.get('mid_epoch', False) for r in resumed)} of them mid-epoch; "
        f"{kills - len(resumed)} before the first checkpoint); completed run vs uninterrupted run after "
        f"{final_epochs} epochs: max |dw| = {max_diff:.1e} (bitwise equal); no temporary files left",
    )
