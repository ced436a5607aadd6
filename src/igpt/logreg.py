"""L2-regularised multinomial logistic regression fitted with full-batch L-BFGS in torch (GPU when present).

The objective is scikit-learn's ``LogisticRegression(C=C, solver="lbfgs")`` exactly, divided by C * n so its
scale does not depend on the data size (the same minimiser):

    sum_i CE(W x_i + b, y_i) / n  +  ||W||^2 / (2 C n)        (nats per example; the bias is not penalised)

With two classes scikit-learn fits one weight vector w (the logistic model), where the softmax here keeps two
rows; at the minimum W[1] = -W[0] = w / 2, so ||W||^2 = ||w||^2 / 2 and the penalty is doubled to stay the same
problem (W[1] - W[0] then equals sklearn's ``coef_`` at the same C).

``fit_batch`` fits many such problems at once, as one batched L-BFGS: G data sets of the same shape (the
layers of a probe, the draws of the low-data protocol), each at P values of C. An iteration costs two matrix
products per data set for all of its problems and one host sync (plus one per extra line-search trial), so a
probe's ~50-150 fits take about as many iterations as the slowest of them, not their sum: on a GPU, where a
single fit's iteration is bound by kernel launches and syncs, that is what makes the probe fast. Each problem
keeps its own curvature history, step length and stopping test, so each converges to its own minimiser;
problems that have stopped leave the batch. Line search: backtracking (Armijo) from the unit step; the logits
are linear in the step, so a trial step costs elementwise work only.

Features are standardised with the statistics of the fitting set (``Standardizer``) before any fit.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from igpt.errors import IgptError

ARMIJO = 1e-4  # sufficient-decrease constant of the line search
HALVINGS = 30  # a step halved this often without decrease: the problem stops (float32 resolution reached)
REFRESH = 25  # recompute the logits from the weights every this many iterations (they are updated in place)


class ConvergenceWarning(UserWarning):
    """Some problems of a ``fit_batch`` stopped at ``max_iter`` with a gradient entry still above ``tol`` (as
    scikit-learn's warning of the same name): ``stopped`` of ``fits``, at the C values ``Cs``."""

    def __init__(self, stopped: int, fits: int, max_iter: int, tol: float, Cs: list[float]):
        self.stopped, self.fits, self.max_iter, self.Cs = stopped, fits, max_iter, Cs
        super().__init__(f"logistic regression: {stopped} of {fits} fits stopped at max_iter={max_iter} with a "
                         f"gradient entry above tol={tol:g} (C = {', '.join(f'{c:g}' for c in sorted(set(Cs)))}); "
                         "raise max_iter for converged fits")


def objective(W: torch.Tensor, b: torch.Tensor, X: torch.Tensor, y: torch.Tensor, C: float) -> torch.Tensor:
    """Mean cross-entropy in nats per example + ||W||^2 / (2 C n): sklearn's C * sum CE + ||W||^2 / 2, over C n
    (with two classes the penalty is doubled: sklearn's binary model, see the module docstring)."""
    n = X.shape[0]
    penalty = W.pow(2).sum() * penalty_scale(W.shape[0]) / (2.0 * C * n)
    return F.cross_entropy(X @ W.T + b, y, reduction="mean") + penalty


def penalty_scale(n_classes: int) -> float:
    """2 for two classes (sklearn fits one weight vector w = W[1] - W[0], so ||w||^2 = 2 ||W||^2 at the
    minimum), else 1."""
    return 2.0 if n_classes == 2 else 1.0


@dataclass
class Standardizer:
    """x -> (x - mean) / std with the statistics of the rows it was fitted on (std 0 -> 1: constant features)."""

    mean: np.ndarray  # (d,)
    std: np.ndarray  # (d,)

    @classmethod
    def fit(cls, X: np.ndarray) -> Standardizer:
        X = np.asarray(X, dtype=np.float64)
        std = X.std(axis=0)
        return cls(X.mean(axis=0), np.where(std > 1e-12, std, 1.0))

    def __call__(self, X: np.ndarray) -> np.ndarray:
        return ((np.asarray(X, dtype=np.float64) - self.mean) / self.std).astype(np.float32)


@dataclass
class Fits:
    """G x P fitted models: [g, p] was fitted on data set g at C[g, p]."""

    W: torch.Tensor  # (G, P, K, d) on the fit device
    b: torch.Tensor  # (G, P, K)
    loss: np.ndarray  # (G, P) final objective (nats per example, penalty included)
    iterations: np.ndarray  # (G, P) L-BFGS iterations each problem took
    converged: np.ndarray | None = None  # (G, P) bool: False where max_iter stopped a problem before ``tol``

    def predict(self, X) -> np.ndarray:
        """X (G or 1, m, d) -> predicted classes (G, P, m)."""
        X = torch.as_tensor(np.asarray(X), device=self.W.device, dtype=self.W.dtype)
        if X.ndim != 3 or X.shape[-1] != self.W.shape[-1] or X.shape[0] not in (1, self.W.shape[0]):
            raise IgptError(f"logistic regression: need X ({self.W.shape[0]} or 1, m, {self.W.shape[-1]}), "
                            f"got {tuple(X.shape)}")
        G, P, K, d = self.W.shape  # every C of a data set in one product, without a copy of X per C
        logits = (X @ self.W.permute(0, 3, 1, 2).reshape(G, d, P * K)).view(-1, X.shape[1], P, K) + self.b[:, None]
        return logits.argmax(-1).transpose(1, 2).cpu().numpy()

    def accuracy(self, X, y) -> np.ndarray:
        """Fraction right per model, (G, P); y (G or 1, m)."""
        return (self.predict(X) == np.asarray(y)[:, None]).mean(-1)


@dataclass
class LogReg:
    """One fitted model (``fit_logreg``)."""

    W: torch.Tensor  # (K, d) on the fit device
    b: torch.Tensor  # (K,)
    loss: float  # final objective value (nats per example, penalty included)
    iterations: int
    converged: bool = True  # False: max_iter stopped the fit before ``tol``

    def predict(self, X) -> np.ndarray:
        X = torch.as_tensor(np.asarray(X), device=self.W.device, dtype=self.W.dtype)
        return (X @ self.W.T + self.b).argmax(1).cpu().numpy()

    def accuracy(self, X, y) -> float:
        """Fraction of rows predicted right, in [0, 1]."""
        return float((self.predict(X) == np.asarray(y)).mean())


class _Problems:
    """The batched objective over a working set of Q problems, ordered by data set: weights T (Q, K, d + 1)
    with the bias last, logits Z (Q, K, n), linear in T. Data set g is X[g] (n, d); problem q uses X[gid[q]].
    ``keep`` drops the problems that have stopped, so the matrix products shrink with the working set."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, C: torch.Tensor, K: int):
        G, self.n, self.d = X.shape
        P = C.shape[1]
        self.K, self.X = K, X
        self.gid = np.repeat(np.arange(G), P)  # host copy: which data set each problem fits
        self.y = y.repeat_interleave(P, 0)[:, None, :]  # (Q, 1, n)
        self.inv_cn = (penalty_scale(K) / (C.reshape(-1) * self.n)).to(X.dtype)  # (Q,)
        self._ranges()

    def _ranges(self) -> None:
        cut = np.flatnonzero(np.diff(self.gid)) + 1
        self.ranges = [(int(self.gid[a]), int(a), int(b)) for a, b in zip(np.r_[0, cut], np.r_[cut, len(self.gid)])]

    def keep(self, idx: np.ndarray) -> None:
        self.gid = self.gid[idx]
        i = torch.as_tensor(idx, device=self.X.device)
        self.y, self.inv_cn = self.y[i], self.inv_cn[i]
        self._ranges()

    def logits(self, T: torch.Tensor) -> torch.Tensor:
        Z = torch.empty(T.shape[0], self.K, self.n, device=T.device, dtype=T.dtype)
        for g, a, b in self.ranges:
            torch.mm(T[a:b, :, :-1].reshape(-1, self.d), self.X[g].T, out=Z[a:b].view(-1, self.n))
        return Z.add_(T[..., -1:])

    def trial(self, Z: torch.Tensor, T: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """(Q,) objective at logits Z of weights T, and what ``grad`` needs. Each example's loss is formed
        before the mean (as cross_entropy does): a difference of two sums over n loses the precision the line
        search needs in float32."""
        m = Z.amax(1, keepdim=True)
        E = (Z - m).exp_()
        s = E.sum(1, keepdim=True)
        ce = (s.log() + m - Z.gather(1, self.y)).double().mean((1, 2))  # float64 sums: see SMALL_CN
        return ce + T[..., :-1].double().pow(2).sum((1, 2)) * (0.5 * self.inv_cn.double()), (E, s)

    def grad(self, T: torch.Tensor, cache: tuple) -> torch.Tensor:
        """The gradient (Q, K, d + 1) at the point of ``trial``'s cache, in closed form."""
        E, s = cache
        R = E.div_(s).scatter_add_(1, self.y, torch.full_like(self.y, -1, dtype=E.dtype)).div_(self.n)
        g = torch.empty_like(T)  # (softmax - onehot) / n against X, plus the penalty's gradient
        for gi, a, b in self.ranges:
            g[a:b, :, :-1] = torch.mm(R[a:b].view(-1, self.n), self.X[gi]).view(b - a, self.K, self.d)
        g[..., :-1] += T[..., :-1] * self.inv_cn[:, None, None]
        g[..., -1] = R.sum(-1)
        return g


# C * n below this: the optimum's objective lies within float32 resolution of the start's (the penalty
# dominates; at C * n = 3e-6 the line search saw no decrease and stopped at W = 0, every prediction class 0, 33%
# against sklearn's 60%; at 5e-4 the coefficients were 8% off), so such problems are fitted in float64. The
# default grid's smallest C times the smallest low-data set (1e-3 x 40) is 4x above it.
SMALL_CN = 1e-2


def _as_dtype(fits: Fits, dtype: torch.dtype) -> Fits:
    return Fits(fits.W.to(dtype), fits.b.to(dtype), fits.loss, fits.iterations, fits.converged)


def fit_batch(X, y, C, n_classes: int | None = None, *, max_iter: int = 1000, tol: float = 1e-6,
              device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
              history: int = 20) -> Fits:
    """Fit G x P problems: X (G, n, d) standardised features, y (G, n) ints in [0, n_classes), C (G, P).

    Batched L-BFGS (history ``history``, backtracking Armijo line search from the unit step; the first step
    of a problem without curvature pairs is min(1, 1 / |g|_1), as torch.optim.LBFGS does). A problem stops when
    its largest gradient entry is below ``tol``, when its objective no longer changes at float resolution or
    its line search finds no decrease, or after ``max_iter`` iterations; stopped problems leave the batch.
    Problems that ``max_iter`` stopped are marked in ``Fits.converged`` and named in a ``ConvergenceWarning``.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    Xb = torch.as_tensor(np.asarray(X), device=dev, dtype=dtype)
    yb = torch.as_tensor(np.asarray(y), device=dev, dtype=torch.long)
    Cb = np.asarray(C, dtype=np.float64)
    if Xb.ndim != 3 or yb.shape != Xb.shape[:2] or Xb.shape[1] == 0:
        raise IgptError(f"logistic regression: need X (G, n, d) and y (G, n) with n > 0, got "
                        f"{tuple(Xb.shape)} and {tuple(yb.shape)}")
    if Cb.ndim != 2 or Cb.shape[0] != Xb.shape[0] or not (Cb > 0).all():
        raise IgptError(f"logistic regression: C must be > 0, one row per data set ({Xb.shape[0]}), got {C}")
    if not torch.isfinite(Xb).all():
        raise IgptError("logistic regression: the features hold NaN or inf")
    if dtype == torch.float32 and Cb.min() * Xb.shape[1] < SMALL_CN:  # see SMALL_CN: fit in float64, return
        return _as_dtype(fit_batch(X, y, C, n_classes, max_iter=max_iter, tol=tol, device=device,  # float32
                                   dtype=torch.float64, history=history), dtype)
    K = int(n_classes or int(yb.max()) + 1)
    if int(yb.min()) < 0 or int(yb.max()) >= K:
        raise IgptError(f"logistic regression: labels must lie in [0, {K}), got {int(yb.min())}..{int(yb.max())}")
    G, P = Cb.shape
    pr = _Problems(Xb, yb, torch.as_tensor(Cb, device=dev), K)
    Q, N = G * P, K * (pr.d + 1)
    out_T = torch.zeros(Q, K, pr.d + 1, device=dev, dtype=dtype)
    out_it = np.zeros(Q, dtype=np.int64)
    converged = np.ones(Q, dtype=bool)
    ids = np.arange(Q)  # the working set's problem numbers
    T = out_T.clone()
    Z = pr.logits(T)
    f, cache = pr.trial(Z, T)
    g = pr.grad(T, cache)
    S = torch.zeros(history, Q, N, device=dev, dtype=dtype)  # curvature pairs (s, y), ring buffer
    Yh, rho = torch.zeros_like(S), torch.zeros(history, Q, device=dev, dtype=dtype)
    gamma = torch.ones(Q, device=dev, dtype=dtype)  # initial inverse-Hessian scale s.y / y.y
    paired = torch.zeros(Q, device=dev, dtype=torch.bool)
    iters = torch.zeros(Q, device=dev, dtype=torch.long)
    active = g.abs().amax((1, 2)) > tol
    for it in range(max_iter + 1):
        act = active.cpu().numpy()
        if not act.all() or it == max_iter:  # retire the stopped problems (all of them at the end)
            done = np.flatnonzero(~act) if it < max_iter else np.arange(len(ids))
            di = torch.as_tensor(done, device=dev)
            out_T[torch.as_tensor(ids[done], device=dev)] = T[di]
            out_it[ids[done]] = iters[di].cpu().numpy()
            if it == max_iter:  # the problems still moving: stopped by max_iter, not by their own test
                converged[ids[act]] = False
            keep = np.flatnonzero(act) if it < max_iter else done[:0]
            if not len(keep):
                break
            ids, ki = ids[keep], torch.as_tensor(keep, device=dev)
            pr.keep(keep)
            T, Z, f, g, gamma, paired, iters = (v[ki] for v in (T, Z, f, g, gamma, paired, iters))
            S, Yh, rho = S[:, ki], Yh[:, ki], rho[:, ki]
        q_n = len(ids)
        if it and it % REFRESH == 0:  # the logits are updated along the steps: recompute them now and then
            Z = pr.logits(T)
            f = pr.trial(Z, T)[0]
        # two-loop recursion, per problem (pairs a problem rejected are zeros with rho 0: no effect)
        q = g.reshape(q_n, N).clone()
        order = [(it - 1 - j) % history for j in range(min(it, history))]
        alphas = []
        for i in order:
            a = rho[i] * (S[i] * q).sum(-1)
            q -= a[:, None] * Yh[i]
            alphas.append(a)
        q *= gamma[:, None]
        for i, a in zip(reversed(order), reversed(alphas)):
            q += S[i] * (a - rho[i] * (Yh[i] * q).sum(-1))[:, None]
        D = q.view_as(T).neg_()
        D = torch.where(((g * D).sum((1, 2)) < 0)[:, None, None], D, -g)  # safeguard: a descent direction
        gtd = (g * D).sum((1, 2))
        t = torch.where(paired, 1.0, (1.0 / g.abs().sum((1, 2))).clamp(max=1.0))
        dZ = pr.logits(D)
        for _ in range(HALVINGS):  # backtracking: one trial for all problems, halve where not yet decreasing
            f_t, cache = pr.trial(torch.addcmul(Z, t[:, None, None], dZ), T + t[:, None, None] * D)
            flat = f_t == f  # no change at float resolution: this problem is done
            ok = (f_t <= f + ARMIJO * t * gtd) & ~flat
            if bool((ok | flat).all()):
                break
            t = torch.where(ok | flat, t, t * 0.5)
        t = t * ok  # the last trial was at every moving problem's accepted step
        step = t[:, None, None] * D
        T = T + step
        Z = torch.addcmul(Z, t[:, None, None], dZ)
        g_new = pr.grad(T, cache)
        s, yv = step.reshape(q_n, N), (g_new - g).reshape(q_n, N)
        sy = (s * yv).sum(-1)
        # a pair is kept unless its curvature is negligible against the step's decrease (L-BFGS-B's test): the
        # absolute sy > 1e-10 rejected every pair once the steps became small (tiny C: W pinned by the penalty,
        # the bias still far off), and a rejected pair overwrote a kept one, leaving gradient descent at the
        # penalty's step size (thousands of iterations for a 26-parameter problem)
        good = ok & (sy > torch.finfo(dtype).eps * -(g.reshape(q_n, N) * s).sum(-1))
        j = it % history
        S[j], Yh[j] = torch.where(good[:, None], s, S[j]), torch.where(good[:, None], yv, Yh[j])  # a rejected
        rho[j] = torch.where(good, 1.0 / sy, rho[j])  # pair keeps the slot's older pair (it had erased it)
        gamma = torch.where(good, sy / (yv * yv).sum(-1), gamma)
        paired |= good
        iters += 1
        f = torch.where(ok, f_t, f)
        g = torch.where(ok[:, None, None], g_new, g)
        active = ok & (g.abs().amax((1, 2)) > tol)
    final = _Problems(Xb, yb, torch.as_tensor(Cb, device=dev), K)
    out_T = out_T.view(G, P, K, -1)
    loss = final.trial(final.logits(out_T.view(Q, K, -1)), out_T.view(Q, K, -1))[0]
    if not converged.all():
        warnings.warn(ConvergenceWarning(int((~converged).sum()), Q, max_iter, tol,
                                         Cb.reshape(-1)[~converged].tolist()), stacklevel=2)
    return Fits(out_T[..., :-1].contiguous(), out_T[..., -1].contiguous(), loss.view(G, P).cpu().numpy(),
                out_it.reshape(G, P), converged.reshape(G, P))


def fit_logreg(X, y, C: float, n_classes: int | None = None, **kw) -> LogReg:
    """One problem: X (n, d) standardised features, y (n,), at C (``fit_batch``'s keywords)."""
    X, y = np.asarray(X), np.asarray(y)
    if X.ndim != 2 or y.shape != X.shape[:1] or len(y) == 0:
        raise IgptError(f"logistic regression: need X (n, d) and y (n,), got {X.shape} and {y.shape}")
    if not C > 0:
        raise IgptError(f"logistic regression: C must be > 0, got {C}")
    fit = fit_batch(X[None], y[None], [[C]], n_classes, **kw)
    return LogReg(fit.W[0, 0], fit.b[0, 0], float(fit.loss[0, 0]), int(fit.iterations[0, 0]),
                  bool(fit.converged[0, 0]))


def best_index(accs, Cs) -> int:
    """The index of the best C of a sweep: highest accuracy, ties to the smaller C (more regularisation)."""
    return min(range(len(Cs)), key=lambda i: (-accs[i], Cs[i]))
