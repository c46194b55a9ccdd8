"""Random-number streams: seeding a fresh run, and capturing and restoring every stream the loop draws from
(so that a resumed run shuffles, drops out and samples exactly as the uninterrupted one)."""

from __future__ import annotations

import random
from typing import Any

import torch


def seed_everything(seed: int, loader: Any = None) -> None:
    """Seed python, numpy and torch RNGs (and the loader's own generator, if it has one)."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass
    generator = loader_generator(loader)
    if generator is not None:
        generator.manual_seed(seed)


def loader_generator(loader: Any) -> torch.Generator | None:
    """The loader's own generator (``DataLoader(generator=...)``), which draws its order, if it has one."""
    generator = getattr(loader, "generator", None)
    return generator if isinstance(generator, torch.Generator) else None


def capture_rng_state() -> dict[str, Any]:
    """Every global RNG the training loop draws from, as plain data."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _to_lists(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return state
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = {
        "name": name,
        "keys": torch.from_numpy(keys.astype("int64")),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`. The states may arrive on another device (a checkpoint read with
    ``map_location="cuda"``); torch takes RNG states as CPU byte tensors only."""
    torch.set_rng_state(state["torch"].cpu())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if "numpy" in state:
        import numpy as np

        s = state["numpy"]
        keys = s["keys"].cpu().numpy().astype("uint32")
        np.random.set_state((s["name"], keys, s["pos"], s["has_gauss"], s["gauss"]))


def _to_lists(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_lists(v) for v in value]
    return value
