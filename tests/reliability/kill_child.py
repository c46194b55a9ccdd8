"""A training process for the SIGKILL sweep (``test_kill_sweep.py``).

It resumes from ``--dir`` when a checkpoint is there, checks that what it loaded is the newest
checkpoint whose write had completed (from a journal written around every checkpoint write), reports
that as one JSON line in ``--results``, then trains until it is killed (or ``--max-epochs``).

``--pause`` slows one kind of write so that the parent can kill inside it: ``mid_write`` stops halfway
through writing the temporary file, ``before_replace`` after the temporary file is complete but
before it is renamed over the old one.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from reliability_kit import build_run, digest  # noqa: E402

import mlff_distiller.training.checkpoint as checkpoint_module  # noqa: E402
from mlff_distiller.training import Trainer  # noqa: E402
from mlff_distiller.training.checkpoint import resume_candidates  # noqa: E402


def journal(path: Path, entry: dict) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(entry) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_journal(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by the kill
            pass
    return entries


def install_pause(kind: str, marker: Path, seconds: float, after_saves: int) -> None:
    """Make the ``after_saves``-th checkpoint write stop for ``seconds`` at the chosen point."""
    count = {"n": 0}
    real_save, real_replace = torch.save, os.replace

    def paused() -> None:
        marker.touch()
        time.sleep(seconds)

    def save(obj, handle, *args, **kwargs):
        count["n"] += 1
        if kind != "mid_write" or count["n"] != after_saves:
            return real_save(obj, handle, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        handle.write(data[: len(data) // 2])
        handle.flush()
        paused()
        handle.write(data[len(data) // 2 :])

    def replace(src, dst):
        if kind == "before_replace" and str(dst).endswith("last.pt") and count["n"] == after_saves:
            paused()
        return real_replace(src, dst)

    checkpoint_module.torch.save = save
    checkpoint_module.os.replace = replace


class JournaledTrainer(Trainer):
    """Records each checkpoint write's content digest before it starts and after it completes."""

    journal_path: Path

    def _write_checkpoints(self, best, epoch_end):
        entry = {"step": self.global_step, "digest": digest(self.model.state_dict())}
        journal(self.journal_path, {"event": "begin", **entry})
        path = super()._write_checkpoints(best, epoch_end)
        journal(self.journal_path, {"event": "end", **entry})
        return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--results", required=True)
    parser.add_argument("--ready", required=True)
    parser.add_argument("--max-epochs", type=int, default=100_000)
    parser.add_argument("--pause", choices=["none", "mid_write", "before_replace"], default="none")
    parser.add_argument("--pause-marker", default="")
    parser.add_argument("--pause-after-saves", type=int, default=3)
    parser.add_argument("--final", default="", help="write the final weights here when training completes")
    args = parser.parse_args()

    run_dir = Path(args.dir)
    journal_path = run_dir.parent / (run_dir.name + ".journal")
    JournaledTrainer.journal_path = journal_path
    trainer = build_run(
        str(run_dir),
        scheduler="step",
        trainer_cls=JournaledTrainer,
        max_epochs=args.max_epochs,
        step_size=50,
        keep_last=2,
        checkpoint_every_n_steps=4,
    )
    report: dict = {"resumed": False}
    entries = read_journal(journal_path)
    if resume_candidates(run_dir):
        state = trainer.load_checkpoint(run_dir)
        loaded = {"step": state["global_step"], "digest": digest(trainer.model.state_dict())}
        # The newest completed write, or any write begun after it: the kill may have come after its
        # rename (the commit) but before the journal's "end" line.
        last_end = max((i for i, e in enumerate(entries) if e["event"] == "end"), default=-1)
        acceptable = [{"step": e["step"], "digest": e["digest"]} for e in entries[max(last_end, 0) :]]
        report = {
            "resumed": True,
            "ok": loaded in acceptable,
            "loaded": loaded,
            "acceptable": acceptable,
            "mid_epoch": state.get("epoch_progress") is not None,
        }
    else:
        report["ok"] = not any(e["event"] == "end" for e in entries)  # nothing was ever committed
    with open(args.results, "a") as handle:
        handle.write(json.dumps(report) + "\n")
    if args.pause != "none":
        install_pause(args.pause, Path(args.pause_marker), 2.0, args.pause_after_saves)
    Path(args.ready).touch()
    trainer.fit()
    if args.final:
        torch.save({k: v.clone() for k, v in trainer.model.state_dict().items()}, args.final)
        print(json.dumps({"epoch": trainer.epoch, "step": trainer.global_step}))


if __name__ == "__main__":
    main()
