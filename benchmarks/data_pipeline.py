"""Data pipeline: neighbour-list and batching throughput (structures/s) on the default dataset, and their
share of a default-job training step (SchNet 64x3 with stress, batch 32).

Neighbour lists are built once per structure when the dataset is loaded (the structures do not
move), so a training step pays only for batching; the share of a step is also shown for building
the neighbour lists every step, the cost that caching avoids. DataLoader workers (0 and 2) are
compared on a full pass over the training set.

    python benchmarks/data_pipeline.py [--threads 1] [--repeats 3] [--steps 6]

Target: data under 10% of the step time of the default job.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _task import CUTOFF, data_module, loss_function, student


def median_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="training steps timed for the step time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from mlff_distiller.data.batch import collate_atoms
    from mlff_distiller.data.dataset import AtomsDataset, read_labelled_structures

    data = data_module()
    structures = read_labelled_structures(data.path)
    batch_size = data.batch_size
    train = data.datasets["train"]
    graphs = train.graphs

    neighbour_time = median_time(lambda: AtomsDataset(structures, CUTOFF), args.repeats)
    batches = [graphs[k : k + batch_size] for k in range(0, len(graphs) - batch_size + 1, batch_size)]
    collate_time = median_time(lambda: [collate_atoms(items) for items in batches], args.repeats) / len(batches)
    loader_times = {}
    for workers in (0, 2):
        loader = data_module(num_workers=workers).train_loader()
        for _ in loader:  # starts the (persistent) workers
            pass
        loader_times[workers] = median_time(lambda loader=loader: [None for _ in loader], args.repeats)

    model, loss_fn = student("schnet", data), loss_function()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    ready = [collate_atoms(items) for items in batches[: args.steps]]

    def step(batch) -> None:
        loss_fn(model, batch)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(ready[0])
    step_time = statistics.median([median_time(lambda b=b: step(b), 1) for b in ready])

    per_structure_nl = neighbour_time / len(structures)
    print(
        f"Default Cu-Au set: {len(structures)} structures of 32 atoms, cutoff {CUTOFF} Å, "
        f"{data.statistics.avg_num_neighbors:.1f} neighbours/atom; batch {batch_size}; {args.threads} thread(s)"
    )
    print(f"{'stage':<44}{'structures/s':>14}{'ms per batch':>14}{'share of step':>15}")
    rows = [
        ("neighbour lists (once, when loading)", 1 / per_structure_nl, 1e3 * per_structure_nl * batch_size, None),
        ("batching (collate_atoms)", batch_size / collate_time, 1e3 * collate_time, collate_time / step_time),
    ]
    for workers, seconds in loader_times.items():
        per_batch = seconds / len(data.train_loader())
        name = f"DataLoader pass, {workers} workers"
        rows.append((name, batch_size / per_batch, 1e3 * per_batch, per_batch / step_time))
    uncached = per_structure_nl * batch_size + collate_time
    name = "if neighbour lists were built every step"
    rows.append((name, batch_size / uncached, 1e3 * uncached, uncached / step_time))
    rows.append(("training step (SchNet 64x3 + stress)", batch_size / step_time, 1e3 * step_time, 1.0))
    for name, rate, ms, share in rows:
        print(f"{name:<44}{rate:>14.0f}{ms:>14.2f}{'' if share is None else f'{share:.1%}':>15}")
    share = loader_times[0] / len(data.train_loader()) / step_time
    verdict = "met" if share < 0.1 else "NOT met"
    print(f"Data share of a training step (DataLoader, 0 workers): {share:.1%} (target < 10%: {verdict})")


if __name__ == "__main__":
    main()
