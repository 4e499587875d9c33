"""One job's parameters: a flat byte buffer, typed views into it, and the optimizer.

The payload layout on the wire and in memory is the same (:class:`Layout`), so
a pull streams slices of ``flat`` and needs no packing step.

Nothing non-finite gets in: a gradient with NaN or Inf is refused, and so is
an update that would leave a parameter or a piece of optimizer state
non-finite (an overflow), with nothing applied. Both cost no extra pass in
the common case: the check of a gradient also measures its largest magnitude,
the optimizer bounds its step from that (:meth:`Optimizer.predict`), and only
a step that might leave the dtype's range is checked exactly.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping

import torch

from psgrid.codec import Layout
from psgrid.errors import DtypeMismatch, NonFiniteGradient
from psgrid.device import threads_for
from psgrid.limits import quote
from psgrid.shm import SharedStore
from psgrid.server.optim import Bounds, magnitude, make_optimizer
from psgrid.spec import OptimizerSpec

TRAINABLE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_finite(tensors: Mapping[str, torch.Tensor], what: str = "gradient",
                 flat: torch.Tensor | None = None) -> float:
    """Raise NonFiniteGradient naming the first tensor that holds NaN or Inf; else
    return the largest magnitude in ``tensors`` (one pass, as fast as a sum).
    ``flat``: all of them as one tensor (codec.Layout.flat), checked in one call."""
    if flat is not None and flat.is_floating_point():
        peak = magnitude((flat,))
        if math.isfinite(peak):
            return peak  # else the loop below names the tensor
    peak = 0.0
    for name, t in tensors.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        largest = magnitude((t,))
        if not math.isfinite(largest):
            raise NonFiniteGradient(f"{what} {quote(name)} holds NaN or Inf")
        peak = max(peak, largest)
    return peak


def _overflow_limit(dtypes) -> float:
    """A quarter of the largest value of the narrowest of ``dtypes``: what a bound must
    stay under for the step to be surely finite (the slack covers rounding)."""
    return min((torch.finfo(d).max for d in dtypes), default=math.inf) / 4


class ParameterStore:
    """Parameters of one job, their version and their optimizer state."""

    def __init__(self, layout: Layout, initial: torch.Tensor, optimizer: OptimizerSpec):
        for m in layout.tensors:
            if m.dtype not in TRAINABLE_DTYPES:
                raise DtypeMismatch(f"parameter {m.name!r} has non-trainable dtype {m.dtype}")
        self.layout = layout
        #: Threads worth putting on this job's tensors (psgrid.device.threads_for).
        self.threads = threads_for(max((m.nbytes for m in layout.tensors), default=0))
        #: The parameters' buffer when it is in shared memory (:meth:`share`), else None.
        self.shared: SharedStore | None = None
        self._bind(initial)
        check_finite(self.params, what="initial parameter", flat=self.flat_params)
        self.optimizer = make_optimizer(optimizer, self.params, self.flat_params)
        self.version = 0
        self._limit = _overflow_limit(m.dtype for m in layout.tensors)
        #: Upper bounds on the magnitudes in the parameters and optimizer state (None:
        #: measure them first); ``_measured`` when they are exact, not predicted.
        self._bounds: Bounds | None = None
        self._measured = False

    def _bind(self, flat: torch.Tensor) -> None:
        self.flat = flat
        self.params = self.layout.views(flat)
        #: The parameters as one flat tensor (codec.Layout.flat); None when they are not one.
        self.flat_params = self.layout.flat(flat)

    @property
    def nbytes(self) -> int:
        return self.layout.total_bytes

    def share(self) -> SharedStore:
        """Move the parameters into shared memory (psgrid.shm.SharedStore), once; return it.
        Unavailable (nothing changed) when there is no room. The caller holds the job's lock."""
        if self.shared is None:
            shared = SharedStore.create(self.nbytes)
            shared.data.copy_(self.flat)
            self._move(shared.data)
            self.shared = shared
        return self.shared

    def unshare(self) -> None:
        """Back into private memory (the job is over: /dev/shm is often small); readers that
        mapped the shared buffer keep what it holds."""
        if self.shared is not None:
            self._move(self.flat.clone())
            self.shared = None

    def _move(self, flat: torch.Tensor) -> None:
        self._bind(flat)
        self.optimizer.params = dict(self.params)
        self.optimizer.flat = self.flat_params

    def apply(self, grads: Mapping[str, torch.Tensor], grad_max: float | None = None,
              flat: torch.Tensor | None = None) -> None:
        """One optimizer step with ``grads`` (cast to each parameter's dtype).

        Raises NonFiniteGradient, with nothing changed, when ``grads`` hold NaN or Inf
        or the step would leave a parameter or a piece of optimizer state non-finite.
        ``grad_max``: a bound on every |value| of ``grads`` when the caller knows one.
        ``flat``: ``grads`` as one flat tensor (codec.Layout.flat), when they are one.
        """
        if flat is not None and self.flat_params is not None and flat.dtype == self.flat_params.dtype:
            cast = grads  # their dtype already: a cast would give them back as they are
        else:
            cast, flat = {n: grads[n].to(p.dtype) for n, p in self.params.items()}, None
        if grad_max is None:
            grad_max = check_finite(cast, flat=flat)
        after = self.predict(grad_max)
        with self.shared.writing() if self.shared is not None else contextlib.nullcontext():
            if after is None:
                self._step_checked(cast)
            else:
                self.optimizer.step(cast, flat)
                self._bounds, self._measured = after, False
        self.version += 1

    def predict(self, grad_max: float) -> Bounds | None:
        """The bounds after a step with gradients of magnitude at most ``grad_max``, when
        such a step surely stays finite; None when it might not (check it exactly)."""
        if not math.isfinite(grad_max):
            return None
        if self._bounds is None:
            self._bounds, self._measured = self.optimizer.magnitudes(), True
        after, peak = self.optimizer.predict(self._bounds, grad_max)
        if peak >= self._limit and not self._measured:  # the bounds may only have drifted up: measure
            self._bounds, self._measured = self.optimizer.magnitudes(), True
            after, peak = self.optimizer.predict(self._bounds, grad_max)
        return after if peak < self._limit else None

    def _step_checked(self, cast: dict[str, torch.Tensor]) -> None:
        """Step, then check every parameter and piece of state; put them all back and
        raise NonFiniteGradient if any came out non-finite (the rare, costly path)."""
        check_finite(cast)  # NaN or Inf in the gradient itself, or a cast that overflowed
        touched = {**{f"parameter {n}": p for n, p in self.params.items()},
                   **{f"optimizer state {n}": t for n, t in self.optimizer.state_tensors().items()}}
        before, steps = {n: t.clone() for n, t in touched.items()}, self.optimizer.steps
        self.optimizer.step(cast)
        try:
            check_finite(touched, what="after this update,")
        except NonFiniteGradient as exc:
            for name, t in touched.items():
                t.copy_(before[name])
            self.optimizer.steps = steps
            raise NonFiniteGradient(f"{exc} (an overflow): the update is refused, nothing applied") from None
        self._bounds = None

    def snapshot_into(self, out: torch.Tensor | None) -> torch.Tensor:
        """Copy the payload into ``out`` (reused when large enough); return it."""
        if out is None or out.numel() < self.flat.numel():
            out = torch.empty_like(self.flat)
        out[: self.flat.numel()].copy_(self.flat)
        return out


class GradientAccumulator:
    """Sums BSP gradients in float32 (float64 for float64 parameters).

    The sums never overflow: an :meth:`add` that would make one non-finite is
    refused with nothing changed. ``bound`` bounds every |sum|, so that only an
    add that might overflow is checked exactly.
    """

    def __init__(self, layout: Layout):
        def sum_dtype(dtype: torch.dtype) -> torch.dtype:
            return torch.float64 if dtype == torch.float64 else torch.float32

        #: The sums as one flat tensor, when the gradients come as one (codec.Layout.flat).
        self.flat: torch.Tensor | None = None
        if layout.flat_dtype is not None and layout.flat_dtype.is_floating_point:
            self.flat = torch.zeros(sum(math.prod(m.shape) for m in layout.tensors),
                                    dtype=sum_dtype(layout.flat_dtype))
            self.sums, start = {}, 0
            for m in layout.tensors:
                self.sums[m.name] = self.flat[start: start + math.prod(m.shape)].view(m.shape)
                start += math.prod(m.shape)
        else:
            self.sums = {m.name: torch.zeros(m.shape, dtype=sum_dtype(m.dtype)) for m in layout.tensors}
        self.count = 0
        self.weight = 0
        self.bound = 0.0
        self._limit = _overflow_limit(t.dtype for t in self.sums.values())

    def fits(self, grad_max: float | None, weight: int) -> bool:
        """Whether adding a gradient with |values| <= ``grad_max`` (None: unknown)
        weighted by ``weight`` surely leaves every sum finite."""
        return grad_max is not None and self.bound + weight * grad_max < self._limit

    def add(self, grads: Mapping[str, torch.Tensor], weight: int = 1, grad_max: float | None = None,
            flat: torch.Tensor | None = None) -> None:
        """Add a gradient averaged over ``weight`` examples (|values| <= ``grad_max``);
        ``flat``: the same gradient as one flat tensor, when it is one.

        NonFiniteGradient, with nothing changed, when a sum would overflow.
        """
        if self.fits(grad_max, weight):
            if flat is not None and self.flat is not None:
                self.flat.add_(flat, alpha=weight)
            else:
                for name, acc in self.sums.items():
                    acc.add_(grads[name], alpha=weight)
            self.bound += weight * grad_max
        else:
            summed, bound = self._summed(grads, weight)
            for name, acc in self.sums.items():
                acc.copy_(summed[name])
            self.bound = bound
        self.count += 1
        self.weight += weight

    def mean_bound(self, grad_max: float = 0.0, weight: int = 0) -> float:
        """A bound on every |mean| once a gradient (``grad_max``, ``weight``) is added too."""
        return (self.bound + weight * grad_max) / max(1, self.weight + weight)

    def mean(self) -> dict[str, torch.Tensor]:
        """The example-weighted mean, computed in place; equal weights give the plain mean."""
        if self.flat is not None:
            self.flat.div_(self.weight)
            return self.sums
        for acc in self.sums.values():
            acc.div_(self.weight)
        return self.sums

    def mean_aside(self, grads: Mapping[str, torch.Tensor] | None = None, weight: int = 0) -> dict[str, torch.Tensor]:
        """The mean once ``grads`` (if any) is added too, computed aside: the sums stay as
        they are. Bit for bit what :meth:`add` then :meth:`mean` give; NonFiniteGradient
        when a sum overflows."""
        summed, _ = self._summed(grads, weight)
        for t in summed.values():
            t.div_(self.weight + weight)
        return summed

    def _summed(self, grads: Mapping[str, torch.Tensor] | None,
                weight: int) -> tuple[dict[str, torch.Tensor], float]:
        """The sums with ``grads`` added, aside, and their largest magnitude; NonFiniteGradient
        when one overflows."""
        summed = {name: acc.add(grads[name], alpha=weight) if grads is not None else acc.clone()
                  for name, acc in self.sums.items()}
        return summed, check_finite(summed, what="the sum of this round's gradients in")

    def reset(self) -> None:
        if self.flat is not None:
            self.flat.zero_()
        else:
            for acc in self.sums.values():
                acc.zero_()
        self.count = 0
        self.weight = 0
        self.bound = 0.0
