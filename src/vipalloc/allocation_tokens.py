"""The separable allocation program under a TOKEN budget: what users pay for is generated tokens, not rollouts.

Given per-prompt costs ``cost[i, k]`` of giving prompt ``i`` the count ``vals[k]`` (``+inf``: not allowed), the
expected tokens per rollout ``c_i > 0`` and a token budget ``T`` (optionally also a cap ``B`` on rollouts)::

    minimise   sum_i cost[i, k_i]
    subject to sum_i vals[k_i] * c_i <= T      (and  sum_i vals[k_i] <= B)

This is a multiple-choice knapsack: NP-hard in general, but its Lagrangian relaxation decouples per prompt and is
tight up to the prompts at the critical multiplier. :func:`solve_tokens`

1. maximises the dual ``L(lam, mu) = sum_i min_k [cost[i, k] + (lam c_i + mu) vals[k]] - lam T - mu B`` by bisection
   on ``lam`` (and ``mu`` when the rollout cap binds): every ``L`` is a lower bound on the optimum (weak duality);
2. takes the per-prompt minimisers at the smallest feasible multiplier (a feasible plan) and fills the tokens left
   greedily, best objective decrease per token first;
3. where the certified gap ``(primal - bound) / |primal|`` is not 0 and the instance is small enough, finishes with an
   exact dynamic program over Pareto-optimal (tokens, objective) states, pruned by the Lagrangian bound of the
   prompts still to place, so the answer is exact whenever that program completes (``exact=True``).

Maths only: numpy.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

__all__ = ["TokenSolution", "min_tokens", "solve_tokens"]

_REL_TOL = 1e-12  # token sums are real numbers (expected lengths): compare with a relative tolerance
_EXACT_STATES = 20_000  # Pareto states per prompt beyond which the exact program gives up (the gap stays)
_EXACT_CELLS = 2_048  # the exact program is tried on instances of at most this many (prompt, count) cells
_EXACT_WORK = 5_000_000  # ... and gives up beyond this many (state, count, prompt) cells of work


@dataclass(frozen=True)
class TokenSolution:
    """A plan of :func:`solve_tokens`: ``idx`` int64 ``(M,)`` indexes ``vals`` per prompt."""

    idx: np.ndarray
    objective: float  # sum_i cost[i, idx_i]
    bound: float  # certified lower bound on the optimum (equal to objective when exact)
    exact: bool

    @property
    def gap(self) -> float:
        """Certified relative optimality gap ``(objective - bound) / max(|objective|, 1e-12)`` (0.0 when exact)."""
        if self.exact:
            return 0.0
        return max(0.0, (self.objective - self.bound) / max(abs(self.objective), 1e-12))


def _fits(used: float, cap: float) -> bool:
    return used <= cap * (1.0 + _REL_TOL) + 1e-9


def _check(cost: np.ndarray, vals: np.ndarray, lengths: np.ndarray, token_budget: float) -> None:
    if cost.ndim != 2 or cost.shape[1] != vals.size or cost.shape[0] != lengths.size:
        raise ValueError(f"cost must have shape (M, K) = ({lengths.size}, {vals.size}), got {cost.shape}")
    if np.any(np.diff(vals) <= 0) or vals.size == 0 or vals[0] < 0:
        raise ValueError("vals must be non-negative and strictly increasing")
    if np.any(np.isnan(cost)) or np.any(cost == -np.inf):
        raise ValueError("cost must be finite or +inf (not allowed)")
    if not np.all(np.isfinite(lengths)) or np.any(lengths <= 0):
        raise ValueError("expected tokens per rollout must be finite and > 0 for every prompt")
    if not np.isfinite(token_budget) or token_budget < 0:
        raise ValueError(f"token_budget must be a finite number >= 0, got {token_budget!r}")
    if not np.all(np.isfinite(cost).any(axis=1)):
        raise ValueError("every prompt needs at least one allowed count")


def min_tokens(cost: np.ndarray, vals: np.ndarray, lengths: np.ndarray) -> tuple[float, int]:
    """The fewest tokens and rollouts any plan uses: every prompt at its smallest allowed count."""
    first = np.argmax(np.isfinite(cost), axis=1)
    n = vals[first]
    return float(n @ lengths), int(n.sum())


def solve_tokens(
    cost: np.ndarray,
    vals: np.ndarray,
    lengths: np.ndarray,
    token_budget: float,
    *,
    max_rollouts: int | None = None,
    exact_states: int = _EXACT_STATES,
    exact_cells: int = _EXACT_CELLS,
) -> TokenSolution:
    """Minimise ``sum_i cost[i, k_i]`` s.t. ``sum_i vals[k_i] lengths_i <= token_budget`` (and
    ``sum_i vals[k_i] <= max_rollouts``). ``cost``: float ``(M, K)`` (``inf`` = not allowed), ``vals``: int
    ``(K,)`` increasing, ``lengths``: float ``(M,)`` expected tokens per rollout (> 0).

    The exact program (step 3) is tried when ``M * K <= exact_cells`` and stops beyond ``exact_states`` Pareto
    states per prompt; otherwise the plan carries its certified gap. Raises ``ValueError`` when even the smallest
    allowed counts exceed a cap (the message names the minimum).
    Among equal optima the plan uses fewer rollouts on ties (minimisers are taken at the smallest count).
    """
    cost = np.asarray(cost, np.float64)
    vals = np.asarray(vals, np.int64)
    c = np.asarray(lengths, np.float64)
    _check(cost, vals, c, float(token_budget))
    T = float(token_budget)
    B = float("inf") if max_rollouts is None else float(max_rollouts)
    need_t, need_n = min_tokens(cost, vals, c)
    if not _fits(need_t, T):
        raise ValueError(
            f"token budget {T:,.0f} is below the {need_t:,.0f} tokens the smallest allowed counts need (each prompt "
            "at its minimum, at the predicted lengths); raise the token budget or lower n_min"
        )
    if need_n > B:
        raise ValueError(f"max_rollouts {max_rollouts} is below the {need_n} rollouts the smallest counts need")
    vf = vals.astype(np.float64)

    def inner(lam: float, mu: float) -> tuple[np.ndarray, float]:
        # per-prompt minimiser of the Lagrangian (argmin takes the first = smallest count on ties)
        scores = cost + (lam * c[:, None] + mu) * vf[None, :]
        k = np.argmin(scores, axis=1)
        dual = float(scores[np.arange(len(k)), k].sum()) - lam * T - (mu * B if mu else 0.0)
        return k, dual

    def usage(k: np.ndarray) -> tuple[float, float]:
        n = vf[k]
        return float(n @ c), float(n.sum())

    def feasible(k: np.ndarray) -> bool:
        t, n = usage(k)
        return _fits(t, T) and n <= B

    def solve_lam(mu: float) -> tuple[np.ndarray, float, float]:
        """Smallest lam (to bisection precision) whose minimiser fits the token budget; best dual seen."""
        k, best = inner(0.0, mu)
        if _fits(usage(k)[0], T):
            return k, 0.0, best
        lo, hi = 0.0, 1.0
        k_hi, d = inner(hi, mu)
        best = max(best, d)
        while not _fits(usage(k_hi)[0], T):
            lo, hi = hi, hi * 4.0
            k_hi, d = inner(hi, mu)
            best = max(best, d)
            if hi > 1e300:  # pragma: no cover - the minimum-count plan fits, so a finite lam exists
                raise RuntimeError("token multiplier diverged")
        k_lo = k
        for _ in range(100):
            # stop once the infeasible and the feasible minimisers differ in at most one prompt: the greedy fill
            # places the rest, and the dual at hi is already within that prompt's step of the optimum
            if np.count_nonzero(k_lo != k_hi) <= 1:
                break
            mid = 0.5 * (lo + hi)
            if mid in (lo, hi):
                break
            k_mid, d = inner(mid, mu)
            best = max(best, d)
            if _fits(usage(k_mid)[0], T):
                hi, k_hi = mid, k_mid
            else:
                lo, k_lo = mid, k_mid
        return k_hi, hi, best

    k, lam, bound = solve_lam(0.0)
    mu = 0.0
    if usage(k)[1] > B:  # the rollout cap binds too: search its multiplier, the token one inside
        lo, hi = 0.0, 1.0
        k_hi, lam_hi, d = solve_lam(hi)
        bound = max(bound, d)
        while usage(k_hi)[1] > B:
            lo, hi = hi, hi * 4.0
            k_hi, lam_hi, d = solve_lam(hi)
            bound = max(bound, d)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if mid in (lo, hi):
                break
            k_mid, lam_mid, d = solve_lam(mid)
            bound = max(bound, d)
            if usage(k_mid)[1] <= B:
                hi, k_hi, lam_hi = mid, k_mid, lam_mid
            else:
                lo = mid
        k, lam, mu = k_hi, lam_hi, hi
    assert feasible(k)
    k = _greedy_fill(cost, vf, c, k, T, B)
    if cost.shape[0] <= 512:
        k = _exchange(cost, vf, c, k, T, B)
    obj = float(cost[np.arange(len(k)), k].sum())
    if obj - bound <= 1e-12 * max(abs(obj), 1.0):
        return TokenSolution(k, obj, obj, True)
    better = None
    if cost.size <= exact_cells:
        # bound the program's work (states x counts x prompts) to ~5e6 cells, about 0.1 s: past that the plan keeps
        # its certified gap, which at these sizes is already ~1e-4 or less
        states = min(exact_states, max(1_000, _EXACT_WORK // cost.size))
        better = _exact_pareto(cost, vf, c, T, B, lam, mu, incumbent=obj, max_states=states)
    if better is not None:
        k_ex, obj_ex = better
        if obj_ex < obj:
            k, obj = k_ex, obj_ex
        return TokenSolution(k, obj, obj, True)
    if mu > 0 and cost.size <= 50 * exact_cells:
        # both caps bind: the multipliers above made a feasible plan, not the best bound; max L(lam, mu) (concave)
        # by nested ternary search where the batch is small enough for its ~1,600 evaluations
        bound = max(bound, _refine_dual(inner, 2.0 * lam + 1.0, 2.0 * mu + 1.0)[0])
    return TokenSolution(k, obj, min(bound, obj), False)


def _refine_dual(inner, lam_hi: float, mu_hi: float, iters: int = 40) -> tuple[float, float, float]:
    """``max L(lam, mu)`` over ``[0, lam_hi] x [0, mu_hi]`` by nested ternary search (``L`` is concave); returns
    ``(L, lam, mu)`` at the best point evaluated. Every value is a valid lower bound (weak duality)."""
    best = (-np.inf, 0.0, 0.0)

    def over_lam(mu: float) -> float:
        nonlocal best
        lo, hi = 0.0, lam_hi
        val = -np.inf
        for _ in range(iters):
            a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
            fa, fb = inner(a, mu)[1], inner(b, mu)[1]
            for x, f in ((a, fa), (b, fb)):
                if f > best[0]:
                    best = (f, x, mu)
            val = max(val, fa, fb)
            if fa < fb:
                lo = a
            else:
                hi = b
        return val

    lo, hi = 0.0, mu_hi
    for _ in range(iters):
        a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        if over_lam(a) < over_lam(b):
            lo = a
        else:
            hi = b
    return best


def _exchange(
    cost: np.ndarray, vf: np.ndarray, c: np.ndarray, k: np.ndarray, T: float, B: float, rounds: int = 200
) -> np.ndarray:
    """Local search after the greedy fill: move one prompt up to its next allowed count and another down to its
    previous one when that lowers the objective and both caps still hold (best pair first; O(M^2) a round)."""
    k = k.copy()
    m, kk = cost.shape
    rows = np.arange(m)
    finite = np.isfinite(cost)
    for _ in range(rounds):
        up = np.full(m, -1)
        down = np.full(m, -1)
        for i in range(m):  # next / previous allowed column per prompt
            nxt = np.flatnonzero(finite[i, k[i] + 1 :])
            prv = np.flatnonzero(finite[i, : k[i]])
            up[i] = k[i] + 1 + nxt[0] if nxt.size else -1
            down[i] = prv[-1] if prv.size else -1
        has_up, has_dn = up >= 0, down >= 0
        if not (has_up.any() and has_dn.any()):
            break
        d_up = np.where(has_up, cost[rows, np.maximum(up, 0)] - cost[rows, k], np.inf)
        d_dn = np.where(has_dn, cost[rows, np.maximum(down, 0)] - cost[rows, k], np.inf)
        t_up = np.where(has_up, (vf[np.maximum(up, 0)] - vf[k]) * c, 0.0)
        t_dn = np.where(has_dn, (vf[np.maximum(down, 0)] - vf[k]) * c, 0.0)  # <= 0
        n_up = np.where(has_up, vf[np.maximum(up, 0)] - vf[k], 0.0)
        n_dn = np.where(has_dn, vf[np.maximum(down, 0)] - vf[k], 0.0)
        used_t, used_n = float(vf[k] @ c), float(vf[k].sum())
        gain = d_up[:, None] + d_dn[None, :]  # i goes up, j goes down
        ok = (used_t + t_up[:, None] + t_dn[None, :] <= T * (1 + 1e-12) + 1e-9) & (
            used_n + n_up[:, None] + n_dn[None, :] <= B
        )
        np.fill_diagonal(ok, False)
        gain = np.where(ok, gain, np.inf)
        i, j = (int(x) for x in np.unravel_index(int(np.argmin(gain)), gain.shape))
        if not gain[i, j] < -1e-15 * max(1.0, float(np.abs(cost[rows, k]).sum())):
            break
        k[i], k[j] = up[i], down[j]
        k = _greedy_fill(cost, vf, c, k, T, B)
    return k


def _greedy_fill(cost: np.ndarray, vf: np.ndarray, c: np.ndarray, k: np.ndarray, T: float, B: float) -> np.ndarray:
    """Raise counts while tokens (and rollouts) are left: each move goes to the prompt's next allowed count and the
    best objective decrease per token goes first; a move that does not fit now never will (caps only shrink)."""
    k = k.copy()
    m, kk = cost.shape
    used_t = float(vf[k] @ c)
    used_n = float(vf[k].sum())
    heap: list[tuple[float, int, int]] = []

    def push(i: int) -> None:
        cur = k[i]
        for nxt in range(cur + 1, kk):
            if np.isfinite(cost[i, nxt]):
                gain = cost[i, cur] - cost[i, nxt]
                if gain > 0:
                    heapq.heappush(heap, (-gain / ((vf[nxt] - vf[cur]) * c[i]), i, nxt))
                return

    for i in range(m):
        push(i)
    while heap:
        _, i, nxt = heapq.heappop(heap)
        if k[i] >= nxt:
            continue
        dt = (vf[nxt] - vf[k[i]]) * c[i]
        dn = vf[nxt] - vf[k[i]]
        if not _fits(used_t + dt, T) or used_n + dn > B:
            continue
        used_t += dt
        used_n += dn
        k[i] = nxt
        push(i)
    return k


def _exact_pareto(
    cost: np.ndarray,
    vf: np.ndarray,
    c: np.ndarray,
    T: float,
    B: float,
    lam: float,
    mu: float,
    *,
    incumbent: float,
    max_states: int,
) -> tuple[np.ndarray, float] | None:
    """Exact optimum by a dynamic program over prompts whose states are the Pareto-optimal (tokens, rollouts,
    objective) partial plans; a state is pruned when its objective plus the Lagrangian bound of the prompts left
    (at the given multipliers, on the caps left) cannot beat ``incumbent``. Returns ``(idx, objective)`` of a plan
    better than the incumbent, ``(incumbent-free) None`` is returned only when the state count exceeds
    ``max_states``; when every state is pruned the incumbent is optimal and ``(empty, inf)`` is returned."""
    m, kk = cost.shape
    rollout_cap = np.isfinite(B)
    # Lagrangian value of each suffix of prompts: min_k cost + (lam c + mu) v, summed from prompt i on
    per = np.min(cost + (lam * c[:, None] + mu) * vf[None, :], axis=1)
    suffix = np.concatenate([np.cumsum(per[::-1])[::-1], [0.0]])
    tol = 1e-12 * max(abs(incumbent), 1.0)
    tokens = np.zeros(1)
    rolls = np.zeros(1)
    obj = np.zeros(1)
    parents: list[np.ndarray] = []
    choices: list[np.ndarray] = []
    for i in range(m):
        ok = np.flatnonzero(np.isfinite(cost[i]))
        t2 = (tokens[:, None] + vf[ok][None, :] * c[i]).ravel()
        n2 = (rolls[:, None] + vf[ok][None, :]).ravel()
        o2 = (obj[:, None] + cost[i, ok][None, :]).ravel()
        par = np.repeat(np.arange(tokens.size), ok.size)
        ch = np.tile(ok, tokens.size)
        keep = (t2 <= T * (1.0 + _REL_TOL) + 1e-9) & (n2 <= B)
        # bound of the best completion: objective so far + the suffix's Lagrangian on the caps left
        lb = o2 + suffix[i + 1] - lam * (T - t2) - (mu * (B - n2) if rollout_cap else 0.0)
        keep &= lb < incumbent - tol
        t2, n2, o2, par, ch = t2[keep], n2[keep], o2[keep], par[keep], ch[keep]
        if t2.size == 0:
            return np.empty(0, np.int64), float("inf")
        # Pareto pruning: within equal rollouts (or all, without a rollout cap), keep states whose objective is
        # strictly below that of every state using no more tokens
        group = n2 if rollout_cap else np.zeros_like(n2)
        order = np.lexsort((o2, t2, group))
        t2, n2, o2, par, ch, group = t2[order], n2[order], o2[order], par[order], ch[order], group[order]
        starts = np.r_[True, group[1:] != group[:-1]]
        seg = np.cumsum(starts) - 1
        run_min = np.empty_like(o2)
        # running minimum of the objective within each group (segments are contiguous after the sort)
        for s_idx in np.flatnonzero(starts):
            e_idx = s_idx + int(np.count_nonzero(seg == seg[s_idx]))
            run_min[s_idx:e_idx] = np.minimum.accumulate(o2[s_idx:e_idx])
        prev = np.r_[np.inf, run_min[:-1]]
        prev[starts] = np.inf
        keep = o2 < prev - 1e-15
        tokens, rolls, obj = t2[keep], n2[keep], o2[keep]
        parents.append(par[keep])
        choices.append(ch[keep])
        if tokens.size > max_states:
            return None
    best = int(np.argmin(obj))
    idx = np.empty(m, np.int64)
    s = best
    for i in range(m - 1, -1, -1):
        idx[i] = choices[i][s]
        s = parents[i][s]
    return idx, float(obj[best])
