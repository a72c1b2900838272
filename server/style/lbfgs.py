"""A small box-projected L-BFGS for images, in NumPy.

SciPy's L-BFGS-B spends ~0.2 s per iteration on its bound handling for a 256x256 image, four times
the network's forward+backward pass, so this loop does the two-loop recursion itself (O(m n)) and
keeps pixels valid by projecting every trial point onto the box. A step is accepted only when J at
the projected point satisfies the Armijo condition, so J never rises from one iteration to the next.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

Array = npt.NDArray[np.float32]
Aux = TypeVar("Aux")

# Curvature pairs kept: 10 is the usual L-BFGS default; memory is 2*m copies of the image.
HISTORY = 10
# Sufficient-decrease constant of the Armijo test (Nocedal & Wright's usual 1e-4).
ARMIJO_C1 = 1e-4
# Backtracking: shrink the step by this factor, at most this many times per iteration.
BACKTRACK_FACTOR = 0.5
MAX_BACKTRACKS = 12
# First iteration (no curvature yet): the largest pixel change, in 0-255 units.
FIRST_STEP_MAX_CHANGE = 8.0
# A pair is kept only if s.y > this * y.y (keeps the implicit Hessian positive definite).
CURVATURE_EPS = 1e-10


@dataclass(frozen=True, slots=True)
class LbfgsOutcome(Generic[Aux]):
    """The last accepted iterate, its aux value, iterations done and why the loop ended."""

    x: Array
    aux: Aux
    iterations: int
    reason: str


def minimize(
    fun: Callable[[Array], tuple[float, Array, Aux]],
    x0: Array,
    low: Array,
    high: Array,
    max_iter: int,
    on_iteration: Callable[[int, Array, Aux], bool] | None = None,
) -> LbfgsOutcome[Aux]:
    """Minimise ``fun`` (value, gradient, aux) from ``x0`` within [low, high] (broadcast).

    ``on_iteration(i, x, aux)`` runs after each accepted step with the new iterate; returning True
    stops the loop (cancellation).
    """
    x = np.clip(x0, low, high).astype(np.float32)
    f, g, aux = fun(x)
    s_hist: deque[Array] = deque(maxlen=HISTORY)
    y_hist: deque[Array] = deque(maxlen=HISTORY)
    rho_hist: deque[float] = deque(maxlen=HISTORY)
    for it in range(1, max_iter + 1):
        # Pixels pinned at a bound with the gradient pushing outwards cannot move: leave them out of the
        # quasi-Newton step, or the projection undoes it and the search stalls.
        free = ~(((x <= low) & (g > 0)) | ((x >= high) & (g < 0)))
        d = _direction(np.where(free, g, 0).astype(np.float32), s_hist, y_hist, rho_hist)
        d = np.where(free, d, 0).astype(np.float32)
        if float(np.dot(g.ravel(), d.ravel())) >= 0:
            # Not a descent direction: forget the curvature and use steepest descent.
            s_hist.clear()
            y_hist.clear()
            rho_hist.clear()
            d = _steepest(g)
        step = 1.0
        accepted = None
        for _ in range(MAX_BACKTRACKS + 1):
            x_new = np.clip(x + step * d, low, high).astype(np.float32)
            f_new, g_new, aux_new = fun(x_new)
            # Armijo on the projected point: the realised move, not the nominal one, must pay off.
            moved = float(np.dot(g.ravel(), (x_new - x).ravel()))
            if f_new < f and f_new <= f + ARMIJO_C1 * moved:
                accepted = (x_new, f_new, g_new, aux_new)
                break
            step *= BACKTRACK_FACTOR
        if accepted is None:
            return LbfgsOutcome(x, aux, it - 1, "line search found no decrease (converged)")
        x_new, f_new, g_new, aux_new = accepted
        s = x_new - x
        y = g_new - g
        sy = float(np.dot(s.ravel(), y.ravel()))
        if sy > CURVATURE_EPS * float(np.dot(y.ravel(), y.ravel())):
            s_hist.append(s)
            y_hist.append(y)
            rho_hist.append(1.0 / sy)
        x, f, g, aux = x_new, f_new, g_new, aux_new
        if on_iteration is not None and on_iteration(it, x, aux):
            return LbfgsOutcome(x, aux, it, "stopped by caller")
    return LbfgsOutcome(x, aux, max_iter, "iteration limit")


def _steepest(g: Array) -> Array:
    """-g scaled so the largest component moves FIRST_STEP_MAX_CHANGE."""
    peak = float(np.max(np.abs(g)))
    return (-g * (FIRST_STEP_MAX_CHANGE / peak)).astype(np.float32) if peak > 0 else np.zeros_like(g)


def _direction(g: Array, s_hist: deque[Array], y_hist: deque[Array], rho_hist: deque[float]) -> Array:
    """The L-BFGS two-loop recursion: d = -H g with H0 = (s.y / y.y) I from the newest pair."""
    if not s_hist:
        return _steepest(g)
    q = g.astype(np.float32, copy=True)
    alphas: list[float] = []
    for s, y, rho in zip(reversed(s_hist), reversed(y_hist), reversed(rho_hist), strict=True):
        a = rho * float(np.dot(s.ravel(), q.ravel()))
        alphas.append(a)
        q -= np.float32(a) * y
    s_new, y_new = s_hist[-1], y_hist[-1]
    gamma = float(np.dot(s_new.ravel(), y_new.ravel())) / float(np.dot(y_new.ravel(), y_new.ravel()))
    r = q * np.float32(gamma)
    for s, y, rho, a in zip(s_hist, y_hist, rho_hist, reversed(alphas), strict=True):
        b = rho * float(np.dot(y.ravel(), r.ravel()))
        r += np.float32(a - b) * s
    return (-r).astype(np.float32)
