"""The AlphaEdit and MEMIT solves at the sizes of real models: what they make of size
``d_mlp^2``, and that the algebra that avoids the rest gives the paper's formula.

Every float64 tensor of at least ``d^2`` elements that an operation of the solve returns is
recorded (a :class:`TorchDispatchMode`), and at each operation those still alive (weak
references, one per storage) are counted: AlphaEdit makes none without earlier edits and
one (``P K_p^T K_p + alpha I``, factored in place) with them, beside the cached projector.
Results are compared with a plain float64 transcription of the formula
``(P (K^T K + K_p^T K_p) + alpha I)^-1 P K^T``.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import editing.methods.alphaedit as alphaedit
from editing.methods.alphaedit import AlphaEditHparams, alphaedit_solver
from editing.methods.memit import MemitHparams, memit_solver


class LiveSquares(TorchDispatchMode):
    """Records every ``dtype`` (default float64) op output of at least ``d * d`` elements;
    ``peak``: the most alive at once (by storage), ``inputs`` excluded."""

    def __init__(
        self, d: int, inputs: list[torch.Tensor], dtype: torch.dtype = torch.float64
    ) -> None:
        super().__init__()
        self.d, self.refs, self.peak, self.dtype = d, [], 0, dtype
        self.skip = {t.untyped_storage().data_ptr() for t in inputs}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if (
                isinstance(t, torch.Tensor)
                and t.dtype == self.dtype
                and t.numel() >= self.d * self.d
            ):
                self.refs.append(weakref.ref(t))
        alive = {r().untyped_storage().data_ptr() for r in self.refs if r() is not None}
        self.peak = max(self.peak, len(alive - self.skip))
        return out


def _problem(d: int, n: int, null: int, seed: int = 0):
    """A projector onto ``null`` random directions (float32, as cached), keys, earlier
    edits' ``K_p^T K_p`` (float64)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, null, generator=g, dtype=torch.float64))
    P = (Q @ Q.T).float()
    keys = torch.randn(n, d, generator=g, dtype=torch.float64)
    kp = torch.randn(3 * n, d, generator=g, dtype=torch.float64)
    return P, keys, kp.T @ kp


def _formula(P, keys, M, alpha):
    """The update's left factor as the formula reads (float64 throughout)."""
    P64 = P.double()
    gram = keys.T @ keys + (0 if M is None else M)
    eye = torch.eye(P.shape[0], dtype=torch.float64)
    return torch.linalg.solve(P64 @ gram + alpha * eye, P64 @ keys.T)


@pytest.mark.parametrize("earlier", [False, True])
@pytest.mark.parametrize("alpha", [10.0, 0.1])
def test_alphaedit_solve_is_the_formula(earlier, alpha):
    P, keys, M = _problem(d=80, n=6, null=50)
    hp = AlphaEditHparams(layers=[0], l2_weight=alpha)
    got = alphaedit_solver(hp, {0: P}, {0: M} if earlier else None)(0, keys)
    want = _formula(P, keys, M if earlier else None, alpha)
    err = float((got - want).norm() / want.norm())
    assert err < 1e-10, err
    # the update lies in the null space: the preserved directions are untouched
    leak = (torch.eye(80, dtype=torch.float64) - P.double()) @ got
    assert float(leak.norm() / got.norm()) < 1e-6


@pytest.mark.parametrize("earlier", [False, True])
def test_alphaedit_solve_makes_at_most_one_square_float64_matrix(earlier, monkeypatch):
    d = 96
    monkeypatch.setattr(alphaedit, "CAST_BLOCK", 16 * d)  # blocks of 16 rows, as at 16,384
    P, keys, M = _problem(d=d, n=5, null=60)
    hp = AlphaEditHparams(layers=[0], l2_weight=10.0)
    solve = alphaedit_solver(hp, {0: P}, {0: M} if earlier else None)
    with LiveSquares(d, [P, M, keys]) as live:
        left = solve(0, keys)
    assert live.peak <= (1 if earlier else 0), live.peak
    assert torch.isfinite(left).all() and left.shape == (d, 5)


def test_memit_solve_keeps_one_square_matrix():
    d = 96
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4 * d, d, generator=g)
    mom = (x.T @ x / x.shape[0]).float()
    keys = torch.randn(7, d, generator=g, dtype=torch.float64)
    hp = MemitHparams(layers=[0], mom2_update_weight=15.0)
    with LiveSquares(d, [mom, keys]) as live:
        left = memit_solver(hp, {0: mom})(0, keys)
    want = torch.linalg.solve(15.0 * mom.double() + keys.T @ keys, keys.T)
    torch.testing.assert_close(left, want, rtol=1e-10, atol=1e-12)
    assert live.peak <= 1, live.peak  # K^T K accumulated into the system, never a matrix


def _rome_problem(d_mlp: int, d_model: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * d_mlp, d_mlp, generator=g)
    C = (x.T @ x / x.shape[0]).float()
    W = torch.randn(d_mlp, d_model, generator=g)
    k = torch.randn(d_mlp, generator=g)
    v = torch.randn(d_model, generator=g)
    return C, W, k, v


@pytest.mark.parametrize("adjust", [True, False])
def test_rome_closed_form_is_the_formula(adjust, monkeypatch):
    """ROME's ``left = C^-1 k / (k . C^-1 k)``, ``right = v - k W`` (``C = I`` with
    mom2_adjustment off), with ``k W`` read a few rows at a time, against float64 solves."""
    import editing.methods.rome as rome

    monkeypatch.setattr(rome, "ROW_BLOCK", 7)  # several blocks, the last one short
    C, W, k, v = _rome_problem(d_mlp=40, d_model=12)
    left, right = rome.rank_one_update(W, rome.MomentSolver(C if adjust else None, W.device), k, v)
    C64 = C.double() if adjust else torch.eye(40, dtype=torch.float64)
    u = torch.linalg.solve(C64, k.double())
    assert torch.allclose(left, u / (u @ k.double()), rtol=1e-10, atol=0)
    assert torch.allclose(right, v.double() - k.double() @ W.double(), rtol=1e-12, atol=1e-12)
    # the edited weight maps k to v
    edited = W.double() + torch.outer(left, right)
    assert torch.allclose(k.double() @ edited, v.double(), rtol=0, atol=1e-9)


@pytest.mark.parametrize("adjust", [True, False])
def test_rome_holds_at_most_one_float64_square(adjust, monkeypatch):
    """The factored ``C`` is the one ``d_mlp^2`` float64 matrix of a ROME solve (cast and
    factored in its own memory); with mom2_adjustment off (``C = I``) there is none, and the
    weight is never copied whole to float64 (which at d_model >= d_mlp would be one)."""
    import editing.methods.rome as rome

    d = 256
    monkeypatch.setattr(rome, "ROW_BLOCK", 32)  # blocks of the weight well below d^2
    C, W, k, v = _rome_problem(d_mlp=d, d_model=d)
    with LiveSquares(d, [C, W]) as mode:
        solver = rome.MomentSolver(C if adjust else None, W.device)
        rome.rank_one_update(W, solver, k, v)
    assert mode.peak == (1 if adjust else 0), mode.peak


def _spectrum_problem(d: int, seed: int = 0):
    """``C = Q diag(lam) Q^T`` (float32, as the statistics are cached) with eigenvalues
    spread over four decades and none within 30 % of the threshold 2e-2, and the projector
    onto the eigenvectors below the threshold read off ``Q`` itself (float64)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = torch.logspace(-4, 1, d, dtype=torch.float64)
    lam = lam[(lam < 0.014) | (lam > 0.026)]
    lam = torch.cat([lam, torch.full((d - len(lam),), 5.0, dtype=torch.float64)])
    C = (Q * lam) @ Q.T
    low = Q[:, lam < 2e-2]
    return C.float(), low @ low.T


@pytest.mark.parametrize(("dtype", "tol"), [("float64", 1e-6), ("float32", 1e-4)])
def test_null_space_projector_is_the_projector_of_the_small_eigenvalues(dtype, tol):
    from editing.statistics.nullspace import null_space_projector

    C, want = _spectrum_problem(96)
    got = null_space_projector(C, 2e-2, dtype=dtype)
    assert got.dtype == getattr(torch, dtype)
    err = float((got.double() - want).norm() / want.norm())
    # float64: the float32 rounding of C itself moves the eigenvectors by ~1e-7
    assert err < tol, err
    assert round(float(got.double().trace())) == round(float(want.trace()))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_null_space_holds_at_most_two_squares(dtype):
    """Beside the statistics in hand: the eigenvectors and the projector (float32: no
    float64 square at all; float64: the statistics' float64 copy and the eigenvectors
    during the decomposition, the eigenvectors and the projector after it). LAPACK's own
    workspace is not a torch tensor and is measured by benchmarks/scale.py instead."""
    from editing.statistics.nullspace import null_space_projector

    C, _ = _spectrum_problem(64)
    wide = LiveSquares(64, [C])
    with wide:
        null_space_projector(C, 2e-2, dtype=dtype)
    narrow = LiveSquares(64, [C], dtype=torch.float32)
    with narrow:
        null_space_projector(C, 2e-2, dtype=dtype)
    if dtype == "float32":
        assert (wide.peak, narrow.peak) == (0, 2)
    else:
        assert wide.peak == 2 and narrow.peak == 0
