r"""A log density and its gradient traced into one graph per batch shape: the chains' hot path.

A Pyro model's log density is a Python program: every evaluation runs Pyro's messengers, builds
its distributions and records autograd's graph, which on a small model costs several times the
arithmetic itself. :class:`TracedLogProb` records once, for a batch shape, the tensor operations
of

.. math:: x \mapsto \left(\log \pi_X(x),\; \nabla_x \log \pi_X(x)\right)

(the forward and the backward pass, as ATen operations, by
:func:`torch.fx.experimental.proxy_tensor.make_fx`), and then runs that graph with no Python in
between (in TorchScript's interpreter where this torch has it). Measured on the posteriordb
models with 4 chains: 2-6x faster than the eager density and its backward pass.

The operations that do not depend on ``x`` (a model's work on its data alone, such as a design
matrix or basis functions computed inside the model) run once, when the graph is recorded, and are
kept as constants (torch.fx's constant folding).

It is the same arithmetic, and it is checked:

- the graph is recorded on *fake* tensors, which carry shapes but no values, so a model whose
  Python branches on a parameter's value (``if sigma > 1``, ``float(x)``) cannot be recorded:
  such a density stays eager, as does any that fails to record;
- the traced value and gradient are compared with the eager ones at the point that triggered
  the recording (agreement to 1e-6, relative), else the density stays eager for that shape;
- an evaluation that raises inside the graph, or where one of the model's linear-algebra checks
  fails (a Cholesky factorization of a matrix that is not positive definite), is evaluated again
  eagerly, so errors (and which of them count as divergences) are the model's own;
- a batch shape is recorded on its ``TRACE_AFTER``-th evaluation, so shapes seen once or twice
  (the halves of a batch that isolate a failing chain, the flow check's draws) stay eager;
- every ``CHECK_EVERY``-th traced evaluation is compared with the eager density at the same points:
  a density that depends on anything but ``x`` (state that changed after the recording) is caught
  there, warned about, and evaluated eagerly from then on;
- the value carries the traced gradient for autograd; second derivatives (``create_graph=True``,
  a Hessian) are taken through the eager density.

The same machinery (:class:`TracedFunction`) traces a whole evaluation of a latent target, the
flow's pass with the density and both gradients, ``z -> (log pi(z), x, ladj, grad)``
(:class:`~pyro_nfmala.engine.targets.PosteriorPullback` with ``trace=True``, as the samplers build it for a
model): 3x faster than eager for a staged map with a coupling-flow stage (d = 10, 4 chains). A
traced function called while another records runs eagerly, inside the outer graph (:func:`recording`).

The graph holds the model's data as constants: it is right for the arguments the density was
built with, as is the density itself. A flow's parameters are constants of the graph too, and what is
computed from them alone is folded: a flow changed after the recording (in place or replaced) is caught
by the spot checks; the samplers build a new target for a refined flow. Like Pyro's ``jit_compile``, it
assumes the density is a function of ``x`` alone (no Python state that changes between
evaluations); pass ``trace_density=False`` to the sampler for one that is not.

Example:
    >>> log_prob = lambda x: -0.5 * (x**2).sum(-1)
    >>> traced = TracedLogProb(log_prob, trace_after=1)
    >>> x = torch.randn(4, 3, requires_grad=True)
    >>> value = traced(x)
    >>> torch.allclose(value, log_prob(x)), traced.traced_shapes
    (True, [(4, 3)])
    >>> (grad,) = torch.autograd.grad(value.sum(), x)
    >>> torch.allclose(grad, -x)
    True
"""

from __future__ import annotations

__all__ = [
    "CHECK_EVERY",
    "TRACE_AFTER",
    "TracedFunction",
    "TracedLogProb",
    "ValueWithGradient",
    "recording",
    "value_and_gradient",
]

import logging
import os
import threading
import traceback
import warnings

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from torch import Tensor

from .errors import is_out_of_memory

logger = logging.getLogger(__name__)

#: A batch shape is traced on its this-many-th evaluation, as recording costs about as much as a few
#: hundred evaluations (a tenth of a second to a few seconds) and only shapes evaluated often repay it.
TRACE_AFTER = 100
#: Every this-many-th traced evaluation of a shape is checked against the eager function.
CHECK_EVERY = 500
#: Relative agreement of the traced outputs with the eager ones at the traced point.
TOLERANCE = 1e-6

#: Warned when a spot check finds the traced function off the eager one.
CHANGED_WARNING = (
    "{what}, traced, disagreed with its eager evaluation at a spot check ({detail}): it depends on "
    "something besides its input that changed after it was traced (Python state, a model's data or a "
    "flow's parameters changed in place). It is evaluated eagerly from now on; draws made before may be "
    "off: rerun with trace_density=False if the model is meant to change."
)

_state = threading.local()


def recording() -> bool:
    """Whether a graph is being recorded in this thread: a traced function called inside another's
    recording runs eagerly, so that the outer graph holds its operations."""
    return getattr(_state, "depth", 0) > 0


class TracedFunction:
    r"""``function`` (a tensor ``(..., d)`` to a tuple of tensors, detached), traced per input shape.

    Arguments:
        function: The eager function; evaluated as it is wherever tracing does not apply.
        trace_after: The evaluation of a shape at which it is traced (1: the first).
        what: What the function is, for the spot check's warning.
        can_trace: An optional test of an input, before recording, that the function suits a trace.

    Calling it returns ``function(x)``'s outputs. ``traced_shapes`` lists the shapes that run traced,
    ``eager_shapes`` those that failed to.
    """

    def __init__(
        self,
        function: Callable[[Tensor], tuple[Tensor, ...]],
        trace_after: int = TRACE_AFTER,
        what: str = "the function",
        can_trace: Callable[[Tensor], bool] | None = None,
    ) -> None:
        if int(trace_after) < 1:
            raise ValueError(f"trace_after must be >= 1, got {trace_after}")
        self.function = function
        self.trace_after = int(trace_after)
        self.what = what
        self.can_trace = can_trace
        self._graphs: dict[tuple, Callable | None] = {}  # None: stays eager
        self._calls: dict[tuple, int] = {}  # evaluations per shape (before tracing: to decide; after: checks)
        self._num_outputs = 0  # the function's outputs, known once a graph is recorded

    @property
    def traced_shapes(self) -> list[tuple[int, ...]]:
        return [key[0] for key, graph in self._graphs.items() if graph is not None]

    @property
    def eager_shapes(self) -> list[tuple[int, ...]]:
        return [key[0] for key, graph in self._graphs.items() if graph is None]

    def __call__(self, x: Tensor) -> tuple[Tensor, ...]:
        graph = self.graph_for(x)
        return self.function(x) if graph is None else self.run(graph, x)

    def graph_for(self, x: Tensor) -> Callable | None:
        """The graph to evaluate ``x`` with, ``None`` for the eager function: counts the shape's
        evaluations, records the graph on the ``trace_after``-th, and every ``CHECK_EVERY``-th after
        that checks it against the eager function."""
        if recording():
            return None
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self._graphs:
            self._calls[key] = self._calls.get(key, 0) + 1
            if self._calls[key] < self.trace_after:
                return None
            self._graphs[key] = self._record(x)
            self._calls[key] = 0
        graph = self._graphs[key]
        if graph is None:
            return None
        self._calls[key] += 1
        if self._calls[key] % CHECK_EVERY == 0 and not self._passes_spot_check(x, key):
            return None
        return graph

    def run(self, graph: Callable, x: Tensor) -> tuple[Tensor, ...]:
        """The outputs at ``x`` by ``graph``, or by the eager function where the graph raised or one of
        its error checks failed."""
        try:
            *outputs, failures = _split(graph(x.detach()), self._num_outputs)
            if not any(bool(failure.any()) for failure in failures):
                return tuple(outputs)
        except Exception as error:  # noqa: BLE001 - evaluated again eagerly: the function's own error
            logger.debug("%s raised traced (%s): evaluating eagerly", self.what, error)
        return self.function(x)

    def _passes_spot_check(self, x: Tensor, key: tuple) -> bool:
        """Whether the graph agrees with the eager function at ``x``; else warns and drops the graph."""
        try:
            *got, failures = _split(self._graphs[key](x.detach()), self._num_outputs)
        except Exception:  # noqa: BLE001 - not a disagreement: such points are evaluated eagerly anyway
            return True
        if any(bool(failure.any()) for failure in failures):
            return True
        expected = self.function(x)
        if all(_agree(a, b) for a, b in zip(got, expected)):
            return True
        difference = float((got[0] - expected[0]).abs().nan_to_num(0).max())
        detail = f"shape {key[0]}, largest difference {difference:.3g}"
        warnings.warn(CHANGED_WARNING.format(what=self.what, detail=detail), RuntimeWarning, stacklevel=5)
        self._graphs[key] = None
        return False

    def _record(self, x: Tensor) -> Callable | None:
        """The traced function for ``x``'s shape, or ``None`` where it cannot be recorded or disagrees
        with the eager function at ``x``."""
        shape = tuple(x.shape)
        try:
            from torch.fx.experimental.proxy_tensor import make_fx

            if self.can_trace is not None and not self.can_trace(x):
                return None
            _state.depth = getattr(_state, "depth", 0) + 1
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    graph = make_fx(self.function, tracing_mode="fake", _allow_non_fake_inputs=True)(
                        x.detach()
                    )
            finally:
                _state.depth -= 1
            expected = self.function(x)
            self._num_outputs = len(expected)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph = _interpreted(_folded(_with_error_outputs(graph)), x.detach())
            *got, _ = _split(graph(x.detach()), self._num_outputs)
        except Exception as error:  # noqa: BLE001 - a function that cannot be traced stays eager
            if is_out_of_memory(error):
                raise
            logger.info("%s cannot be traced for shape %s (%s): it stays eager", self.what, shape, error)
            _say_data_dependent(error, shape)
            return None
        if len(got) != len(expected) or not all(_agree(a, b) for a, b in zip(got, expected)):
            logger.info(
                "%s, traced, disagrees with its eager evaluation for shape %s: eager", self.what, shape
            )
            return None
        logger.debug("traced %s for shape %s", self.what, shape)
        return graph

    def __getstate__(self) -> dict:  # traced graphs do not pickle: a copy traces again
        return {**self.__dict__, "_graphs": {}, "_calls": {}}


#: The user's code lines (with the batch shape) already named by :func:`_say_data_dependent`.
_SAID_DATA_DEPENDENT: set[tuple[str, tuple]] = set()
#: Folders of the library and of the packages below it: not the user's code.
_LIBRARY_PATHS = tuple(
    os.sep + os.path.join(*parts) + os.sep
    for parts in [("torch",), ("pyro",), ("zuko",)]
    + [("pyro_nfmala", part) for part in ("engine", "model", "flows", "fit", "samplers")]
)


def _say_data_dependent(error: BaseException, shape: tuple) -> None:
    """Warns, once per line of the user's code and batch shape, where a density could not be traced
    because it reads a tensor's value in Python (``float(x)``, ``.item()``, ``if x > 0``): it then runs
    eagerly, several times slower, and the user can usually write that line with tensors instead."""
    message = str(error)
    if "data-dependent" not in message and "DataDependent" not in type(error).__name__:
        return
    frames = traceback.extract_tb(error.__traceback__)
    user = [frame for frame in frames if not any(part in frame.filename for part in _LIBRARY_PATHS)]
    where = f"{user[-1].filename}:{user[-1].lineno} ({user[-1].line})" if user else "the model"
    if (where, shape) in _SAID_DATA_DEPENDENT:
        return
    _SAID_DATA_DEPENDENT.add((where, shape))
    warnings.warn(
        f"the model's log density cannot be traced into one graph: {where} reads a tensor's value in "
        "Python (float(), .item(), int(), or an if on a tensor), so every evaluation runs the model "
        "eagerly, several times slower (the approximate GP of pyro_nfmala.examples: 5x). Write it with "
        "tensors (a constant from the data: keep it a tensor; a branch on a parameter: torch.where), or "
        "compute such constants outside the model and pass them in",
        UserWarning,
        stacklevel=2,
    )


def _split(outputs, count: int) -> tuple:
    """A graph's outputs as ``(*the function's outputs, the error checks' flags)``."""
    outputs = tuple(outputs)
    return (*outputs[:count], outputs[count:])


class TracedLogProb:
    r"""``log_prob`` (a batch ``(..., d)`` to ``(...)``) with its value and gradient traced per shape.

    Arguments:
        log_prob: The eager log density; evaluated as it is wherever tracing does not apply.
        trace_after: The evaluation of a batch shape at which it is traced (1: the first).

    Calling it returns the log density, differentiable in ``x`` (the gradient is the traced one).
    ``traced_shapes`` lists the shapes that run traced, ``eager_shapes`` those that failed to.
    """

    def __init__(self, log_prob: Callable[[Tensor], Tensor], trace_after: int = TRACE_AFTER) -> None:
        self.log_prob = log_prob
        self.value_and_grad = TracedFunction(
            partial(_eager_value_and_grad, log_prob), trace_after, "the log density", self._depends_on_x
        )

    @property
    def trace_after(self) -> int:
        return self.value_and_grad.trace_after

    @trace_after.setter
    def trace_after(self, value: int) -> None:
        self.value_and_grad.trace_after = int(value)

    @property
    def traced_shapes(self) -> list[tuple[int, ...]]:
        return self.value_and_grad.traced_shapes

    @property
    def eager_shapes(self) -> list[tuple[int, ...]]:
        return self.value_and_grad.eager_shapes

    def __call__(self, x: Tensor) -> Tensor:
        graph = self.value_and_grad.graph_for(x)
        if graph is None:
            return self.log_prob(x)
        return ValueWithGradient.apply(x, partial(self.value_and_grad.run, graph), self._eager_gradient)

    def _eager_gradient(self, x: Tensor, grad: Tensor) -> Tensor:
        """The gradient through the eager density, differentiable (second derivatives)."""
        with torch.enable_grad():
            return torch.autograd.grad(self.log_prob(x).sum(), x, create_graph=True)[0]

    def _depends_on_x(self, x: Tensor) -> bool:
        with torch.enable_grad():
            if self.log_prob(x.detach().requires_grad_(True)).requires_grad:
                return True
        logger.info("the log density does not depend on x in autograd's graph: it stays eager")
        return False


class ValueWithGradient(torch.autograd.Function):
    """A log density whose value and gradient come from one pass, ``value_and_grad(x)`` (a traced graph; an
    all-reduce over data shards), the gradient saved as its derivative; under ``create_graph``, its
    derivative is ``differentiable_gradient(x, grad)``, the gradient as a function of ``x`` (for second
    derivatives). ``ValueWithGradient.apply(x, value_and_grad, differentiable_gradient)``."""

    @staticmethod
    def forward(ctx, x: Tensor, value_and_grad: Callable, differentiable_gradient: Callable) -> Tensor:
        """The value; the gradient kept."""
        value, grad = value_and_grad(x)
        ctx.save_for_backward(x, grad)
        ctx.differentiable_gradient = differentiable_gradient
        return value

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        """``grad_output`` times the gradient (as a function of ``x`` under ``create_graph``)."""
        x, grad = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the gradient as a function of x
            grad = ctx.differentiable_gradient(x, grad)
        return grad_output.unsqueeze(-1) * grad, None, None


def value_and_gradient(function: Callable, x: Tensor) -> tuple[Any, Tensor, bool]:
    """``function(x)`` and the gradient in ``x`` of its value (the output, or its first output for a
    tuple; shape ``x.shape[:-1]``) by autograd, the outputs detached; the gradient is zero where the
    value does not depend on ``x``, and the flag says whether it is in autograd's graph at all."""
    with torch.enable_grad():
        point = x.detach().requires_grad_(True)
        outputs = function(point)
        value = outputs[0] if isinstance(outputs, tuple) else outputs
        connected = value.requires_grad
        grad = torch.autograd.grad(value.sum(), point, allow_unused=True)[0] if connected else None
    detached = tuple(t.detach() for t in outputs) if isinstance(outputs, tuple) else outputs.detach()
    return detached, torch.zeros_like(point) if grad is None else grad.detach(), connected


def _eager_value_and_grad(log_prob: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    value, grad, _ = value_and_gradient(log_prob, x)
    return value, grad


#: ATen's error checks of linear algebra (a Cholesky factorization of a matrix that is not positive
#: definite): each becomes an output of the graph, checked after each run.
_ERROR_CHECKS = ("_linalg_check_errors",)


def _with_error_outputs(graph):
    """The recorded graph with its error checks as extra outputs (``info`` tensors, nonzero where the
    eager model would raise): TorchScript drops operations without outputs as dead code. A graph with
    another operation run only for its side effect (an assertion) keeps it and stays Python code, where
    it runs as in the model."""
    nodes = [node for node in graph.graph.nodes if node.op == "call_function"]
    side_effects = [
        node
        for node in nodes
        if isinstance(node.target, torch._ops.OpOverload) and not node.target._schema.returns
    ]
    if any(node.target._schema.name.split("::")[-1] not in _ERROR_CHECKS for node in side_effects):
        graph._nfmala_python_only = True
        return graph
    failures = []
    for node in side_effects:
        failures.append(node.args[0])
        graph.graph.erase_node(node)
    output = next(node for node in graph.graph.nodes if node.op == "output")
    output.args = ((*output.args[0], *failures),)
    graph.graph.lint()
    graph.recompile()
    return graph


def _folded(graph):
    """The graph with its operations that do not depend on the input (a model's work on its data alone: a
    design matrix, basis functions) run once, here, and kept as constants (torch.fx's constant folding);
    the graph as it is where folding fails."""
    if getattr(graph, "_nfmala_python_only", False):
        return graph
    try:
        from torch.fx.experimental.const_fold import split_const_subgraphs

        folded = split_const_subgraphs(graph)
        folded.run_folding()
        return folded
    except Exception as error:  # noqa: BLE001 - the unfolded graph is as right
        logger.debug("constant folding failed (%s): the graph runs unfolded", error)
        return graph


def _interpreted(graph: Callable, x: Tensor) -> Callable:
    """The recorded graph run by TorchScript's interpreter (no Python per operation) where this torch
    still has ``torch.jit.trace``, else as the graph module's Python code."""
    trace = getattr(torch.jit, "trace", None)
    if trace is None or getattr(graph, "_nfmala_python_only", False):
        return graph
    try:
        return trace(graph, (x,), check_trace=False)
    except Exception as error:  # noqa: BLE001 - the graph module runs as it is
        logger.debug("TorchScript could not take the traced graph (%s): running it as Python", error)
        return graph


def _agree(got: Tensor, expected: Tensor) -> bool:
    if got.shape != expected.shape or got.dtype != expected.dtype:
        return False
    scale = float(expected[torch.isfinite(expected)].abs().max()) if torch.isfinite(expected).any() else 1.0
    return bool(
        torch.allclose(got, expected, rtol=TOLERANCE, atol=TOLERANCE * max(scale, 1.0), equal_nan=True)
    )
