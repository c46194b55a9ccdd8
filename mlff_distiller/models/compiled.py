"""Energy, forces and stress of a student as one traced graph, optionally compiled by inductor.

``torch.compile`` cannot compile a force-trained model directly: its backward (aot_autograd) does not
support the double backward that a force loss takes through ``forces = -dE/dx``. Instead the whole
computation, the inner ``autograd.grad`` included, is traced by ``make_fx`` into one graph of aten
ops whose inputs are the weights and the batch tensors and whose outputs are energy, forces and
stress. Training then needs only a first-order backward of that graph, which inductor can compile
(the idea of nequip 0.19's compiled training). The traced graph keeps sizes symbolic (atoms, edges,
structures), so batches of any size reuse it; it specialises on what it reads as Python values:

* the number of structures being 1 or more (one-structure calls, e.g. from an ASE calculator, get
  their own graph), whether stress is computed, dtypes and device, and the batch's keys;
* edges paired by the data pipeline (``keys.NUM_EDGE_PAIRS``): pairing them inside the forward
  needs a host sync, which cannot be traced, so such batches run eagerly.

Batches it does not apply to (positions that require grad, i.e. Hessian rows; autocast; fewer than
two atoms or edges; unpaired edges) run the eager model, and so does every case whose trace or
compilation fails; each such reason is logged once, on one line. The first run of each graph is
checked against the eager model on the same batch.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..data import keys

log = logging.getLogger(__name__)

COMPILE_MODES = ("none", "fx", "inductor")
"""``none``: eager. ``fx``: the traced graph, run op by op (no code generation; a check of the trace).
``inductor``: the traced graph compiled by ``torch.compile`` (C++/OpenMP kernels on CPU)."""

_NOT_INPUTS = frozenset(keys.LABEL_KEYS) | frozenset(keys.HESSIAN_KEYS)
"""Labels never reach the model: they are left out of the graph's inputs (and of its cache key)."""

_CHECK_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
"""Largest difference to eager on the first batch of a graph, relative to the largest value of each output."""


def compile_mode(value: bool | str | None) -> str:
    """The mode named by a ``model.compile`` setting: false/null -> "none", true -> "inductor", or a mode name."""
    if value is None or value is False:
        return "none"
    if value is True:
        return "inductor"
    if isinstance(value, str) and value.lower() in COMPILE_MODES:
        return value.lower()
    raise ValueError(
        f"model.compile={value!r} is not a compile mode; accepted: false, true (= inductor), "
        f"{', '.join(repr(m) for m in COMPILE_MODES)}."
    )


class _Eager(nn.Module):
    """The model's eager energy/forces/stress, as a module for ``functional_call`` (weights as inputs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.enable_grad():
            return self.model.eager_forward(batch)


class _Graph:
    """One traced (and maybe compiled) graph: ``run(model, batch)`` -> the output dict."""

    def __init__(self, function: Callable[..., Any], state_names: list[str], input_keys: list[str]) -> None:
        self.function = function
        self.state_names = state_names
        self.input_keys = input_keys
        self.output_keys: list[str] = []
        self.checked = False

    def run(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state = dict(model.named_parameters())
        state.update(model.named_buffers())
        flat = [state[name] for name in self.state_names] + [batch[key] for key in self.input_keys]
        return dict(zip(self.output_keys, self.function(*flat)))


@contextlib.contextmanager
def _no_duck_shapes() -> Iterator[None]:
    """Sizes that happen to be equal in the example batch (atoms == edges, structures == a layer width) must
    stay separate symbols, or the graph would only fit batches where they are equal again."""
    import torch.fx.experimental._config as fx_config

    previous = fx_config.use_duck_shape
    fx_config.use_duck_shape = False
    try:
        yield
    finally:
        fx_config.use_duck_shape = previous


def _relink_saved_outputs(graph_module: torch.fx.GraphModule) -> None:
    """Let gradients flow through the outputs that autograd saved for the inner backward.

    Autograd saves an op's output for its backward (sqrt, sigmoid, exp, norm...) without its history and
    restores the history when it unpacks it; ``make_fx`` records the two steps as ``detach(detach(y))``
    and loses the restore. The traced forces would then be constants in ``y``, and a force loss would
    get wrong weight gradients (PaiNN's sqrt). Such pairs are replaced by ``y``; a single ``detach`` (the
    model's own, e.g. of the positions) stays.
    """
    detach = torch.ops.aten.detach.default
    for node in list(graph_module.graph.nodes):
        source = node.args[0] if node.target is detach else None
        if isinstance(source, torch.fx.Node) and source.target is detach:
            node.replace_all_uses_with(source.args[0])
    graph_module.graph.eliminate_dead_code()
    graph_module.recompile()


def trace(model: nn.Module, batch: Mapping[str, torch.Tensor], input_keys: list[str]) -> _Graph:
    """``model.eager_forward`` on batches like ``batch`` as one graph of aten ops with symbolic sizes."""
    from torch.fx.experimental.proxy_tensor import make_fx

    eager = _Eager(model)
    state = {f"model.{n}": p for n, p in model.named_parameters()}
    state.update({f"model.{n}": b for n, b in model.named_buffers()})
    names = list(state)
    graph = _Graph(None, [n.removeprefix("model.") for n in names], input_keys)  # type: ignore[arg-type]

    def energy_forces_stress(*flat: torch.Tensor) -> list[torch.Tensor]:
        weights = dict(zip(names, flat[: len(names)]))
        inputs = dict(zip(input_keys, flat[len(names) :]))
        out = torch.func.functional_call(eager, weights, (inputs,))
        graph.output_keys = sorted(out)
        return [out[k] for k in graph.output_keys]

    examples = [t.detach().clone() for t in state.values()] + [batch[k].detach().clone() for k in input_keys]
    # Fake-tensor caching made the trace 3x slower: with symbolic sizes nearly every op misses the cache.
    no_cache = torch._dynamo.config.patch(fake_tensor_cache_enabled=False)
    with _no_duck_shapes(), no_cache, torch.enable_grad():
        graph.function = make_fx(
            energy_forces_stress,
            tracing_mode="symbolic",
            _allow_non_fake_inputs=True,
            _error_on_data_dependent_ops=True,
        )(*examples)
    _relink_saved_outputs(graph.function)
    return graph


class CompiledForward:
    """The traced graphs of one model, by what they specialise on; see the module docstring.

    ``__call__(model, batch)`` returns the outputs, or None when the eager model must run instead.
    A deep copy (e.g. ``StudentCalculator``'s) or a pickle starts with no graphs: they belong to one
    model object, and are rebuilt on first use.
    """

    def __init__(self, mode: str) -> None:
        self.mode = compile_mode(mode)
        self.graphs: dict[tuple, _Graph | None] = {}
        self.traces = 0
        """Graphs traced so far (each inductor graph may also recompile; dynamo counts those)."""
        self._reported: set[str] = set()

    def __deepcopy__(self, memo: dict) -> CompiledForward:
        return CompiledForward(self.mode)

    def __getstate__(self) -> dict[str, Any]:
        return {"mode": self.mode}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["mode"])  # type: ignore[misc]

    def _eager(self, reason: str) -> None:
        if reason not in self._reported:
            self._reported.add(reason)
            log.warning("model.compile=%s: %s; running the eager model for these batches.", self.mode, reason)
        return None

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        positions = batch[keys.POSITIONS]
        if positions.requires_grad:
            return self._eager("positions require grad (derivatives of the forces, e.g. Hessian rows)")
        if torch.is_autocast_enabled(positions.device.type):
            return self._eager("autocast is on (mixed precision)")
        if keys.NUM_EDGE_PAIRS not in batch:
            return self._eager(f"the batch's edges are not paired by the data pipeline (no {keys.NUM_EDGE_PAIRS!r})")
        if positions.shape[0] < 2 or batch[keys.EDGE_INDEX].shape[1] < 2:
            return self._eager("a batch has fewer than two atoms or edges")
        input_keys = sorted(k for k in batch if k not in _NOT_INPUTS)
        parameter = next(model.parameters())
        key = (
            batch[keys.NUM_ATOMS].shape[0] == 1,
            bool(getattr(model, "compute_stress", False)),
            positions.dtype,
            parameter.dtype,
            positions.device,
            tuple(input_keys),
        )
        if key not in self.graphs:
            self.graphs[key] = self._build(model, batch, input_keys)
        graph = self.graphs[key]
        if graph is None:
            return None
        if not graph.checked:
            return self._first_run(key, graph, model, batch)
        return graph.run(model, batch)

    def _build(self, model: nn.Module, batch: Mapping[str, torch.Tensor], input_keys: list[str]) -> _Graph | None:
        start = time.perf_counter()
        try:
            graph = trace(model, batch, input_keys)
        except Exception as error:  # noqa: BLE001 - any failure to trace means: run eagerly
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            self._eager(f"tracing failed ({type(error).__name__}: {first_line[:200]})")
            return None
        self.traces += 1
        if self.mode == "inductor":
            graph.function = torch.compile(graph.function, dynamic=True, fullgraph=True)
        log.info(
            "model.compile=%s: traced energy/forces%s graph %d in %.1f s%s",
            self.mode,
            "/stress" if getattr(model, "compute_stress", False) else "",
            self.traces,
            time.perf_counter() - start,
            " (inductor compiles it on its first run)" if self.mode == "inductor" else "",
        )
        return graph

    def _first_run(
        self, key: tuple, graph: _Graph, model: nn.Module, batch: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor] | None:
        """Run a new graph (compiling it) and compare it with the eager model on the same batch: the outputs
        and, when the weights are trained, the weight gradients of a force-dependent probe. The probe uses
        a run of its own: inductor's backward frees its buffers, so the returned outputs need a fresh graph."""
        start = time.perf_counter()
        try:
            checked = graph.run(model, batch)
        except Exception as error:  # noqa: BLE001
            self.graphs[key] = None
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            return self._eager(f"the traced graph failed to run ({type(error).__name__}: {first_line[:200]})")
        reference = model.eager_forward(batch)
        pairs = [(name, checked.get(name), value) for name, value in reference.items()]
        weights = [p for p in model.parameters() if p.requires_grad]
        trained = weights and model.training and torch.is_grad_enabled()  # in eval mode forces are not trained
        if trained:
            probes = [_probe(outputs) for outputs in (checked, reference)]
            if all(probe.requires_grad for probe in probes):
                got, expected = (torch.autograd.grad(probe, weights, allow_unused=True) for probe in probes)
                pairs += [(f"gradient of {n}", g, e) for n, g, e in zip(_names(model, weights), got, expected)]
        for name, got, expected in pairs:
            if not _close(got, expected):
                self.graphs[key] = None
                return self._eager(f"the traced graph's {name} differs from the eager model's")
        graph.checked = True
        seconds = time.perf_counter() - start
        log.info(
            "model.compile=%s: first run of graph %d (compiling it for inductor) checked against eager in %.1f s",
            self.mode,
            self.traces,
            seconds,
        )
        return graph.run(model, batch) if trained else checked


def _probe(outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A scalar that depends on every output (forces included), for comparing weight gradients."""
    return sum(value.double().pow(2).sum() for value in outputs.values())  # type: ignore[return-value]


def _names(model: nn.Module, weights: list[torch.Tensor]) -> list[str]:
    ids = {id(p): n for n, p in model.named_parameters()}
    return [ids[id(w)] for w in weights]


def _close(got: torch.Tensor | None, expected: torch.Tensor | None) -> bool:
    """Equal within the dtype's tolerance, relative to the largest value (a missing gradient counts as zeros)."""
    if expected is None or got is None:
        return (got is None or not got.any()) and (expected is None or not expected.any())
    got, expected = got.detach(), expected.detach()
    if got.shape != expected.shape:
        return False
    if not expected.numel():
        return True
    scale = float(expected.abs().max())
    return float((got - expected).abs().max()) <= _CHECK_TOLERANCE.get(expected.dtype, 1e-2) * scale + 1e-30
