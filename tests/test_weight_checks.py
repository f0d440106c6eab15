"""Checking that edits are undone bit for bit, and keying caches on the weights, at a cost that
does not grow with the model (:class:`editing.edits.weights.WeightsGuard`,
``weights_key(reuse=True)``).

The host reads are counted by a spy on the one hash the digests use (every byte of a block
tensor read for a digest goes through it): an evaluation of N cases reads the block weights
twice (before and after the run), not once per case; a leak is still caught, whether the
undo is off by one ulp, another tensor is changed in place, or a write bypasses torch's
version counter (caught by the read after the run).
"""

from __future__ import annotations

import hashlib
import json
import types

import pytest
import torch

from editing.edits.edit import Edit, LayerDelta
from editing.edits.weights import WeightsGuard, block_tensors, weights_key
from editing.evaluation import evaluate
from editing.evaluation.datasets import load_counterfact
from editing.hparams import TargetHparams
from editing.targets.cache import TargetCache
from tracing.models import down_proj, fingerprint, model_name


class HashSpy:
    """Stands in for ``hashlib`` in :mod:`editing.edits.weights`, counting the bytes hashed."""

    def __init__(self) -> None:
        self.bytes = 0

    def _counting(self, real):
        spy = self

        class Counting:
            def update(self, data) -> None:
                spy.bytes += len(data)
                real.update(data)

            def hexdigest(self) -> str:
                return real.hexdigest()

        return Counting()

    def blake2b(self, *args, **kwargs):
        return self._counting(hashlib.blake2b(*args, **kwargs))

    def sha256(self, *args, **kwargs):
        return hashlib.sha256(*args, **kwargs)


@pytest.fixture
def spy(monkeypatch):
    import editing.edits.weights

    s = HashSpy()
    monkeypatch.setattr(
        editing.edits.weights,
        "hashlib",
        types.SimpleNamespace(**{"blake2b": s.blake2b, "sha256": s.sha256}),
    )
    return s


def _block_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for layer in block_tensors(model) for _, p in layer)


@pytest.fixture
def cf_path(tmp_path, reduced_record):
    recs = [reduced_record(r) for r in load_counterfact()[:6]]
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(recs))
    return path


class RankOneEdits:
    """Stand-in for ``make_edit``: a real rank-one :class:`Edit` of layer 1 per call;
    ``side`` (model -> None) runs inside each call (to change other weights in place)."""

    def __init__(self, side=None) -> None:
        self.calls = 0
        self.side = side

    def __call__(self, model, requests, method, hparams, *, layers=None, progress=True):
        self.calls += 1
        if self.side is not None:
            self.side(model)
        W = down_proj(model, 1)
        g = torch.Generator().manual_seed(self.calls)
        left = torch.randn(W.shape[0], generator=g)
        right = 0.1 * torch.randn(W.shape[1], generator=g)
        return Edit(
            deltas=[LayerDelta(1, left=left, right=right)],
            method="rome",
            requests=list(requests),
            hparams={"fake": True},
            model_fingerprint=fingerprint(model),
            model_name=model_name(model),
        )


def _evaluate(model, cf_path, tmp_path, edit_fn, n=5):
    return evaluate(
        model,
        dataset=cf_path,
        method="rome",
        n=n,
        out_dir=tmp_path,
        only_known=False,
        generation=None,
        edit_fn=edit_fn,
        progress=False,
    )


def _state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for layer in block_tensors(model) for n, p in layer}


def test_an_evaluation_reads_the_weights_twice_whatever_the_number_of_cases(
    toy_models, cf_path, tmp_path, spy
):
    model = toy_models["gpt2"]
    before = _state(model)
    fake = RankOneEdits()
    s = _evaluate(model, cf_path, tmp_path, fake, n=5)
    assert fake.calls == 5 and s.n == 5 and s.n_failed == 0
    full = _block_bytes(model)
    # before the run and after it; per case only device comparisons (each layer digest
    # hashes its tensors' 32-character digests: a few hundred bytes)
    assert 2 * full <= spy.bytes <= 2 * full + 4096, spy.bytes / full
    after = _state(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_an_undo_off_by_one_ulp_is_caught_after_its_case(
    toy_models, cf_path, tmp_path, monkeypatch
):
    model = toy_models["gpt2"]
    W = down_proj(model, 1)
    saved = W.detach().clone()
    real_undo = Edit.undo

    def sloppy_undo(self, m):
        real_undo(self, m)
        with torch.no_grad():
            W[2, 3] = torch.nextafter(W[2, 3], W[2, 3] + 1)

    monkeypatch.setattr(Edit, "undo", sloppy_undo)
    try:
        with pytest.raises(RuntimeError, match=r"after evaluating cases \[0\]: blocks\.1\."):
            _evaluate(model, cf_path, tmp_path, RankOneEdits(), n=3)
    finally:
        with torch.no_grad():
            W.copy_(saved)


def test_a_tensor_the_edit_does_not_name_is_checked_too(toy_models, cf_path, tmp_path):
    model = toy_models["gpt2"]
    name, norm = block_tensors(model)[0][0]
    saved = norm.detach().clone()

    def nudge(m) -> None:
        with torch.no_grad():
            norm.add_(1e-3)

    try:
        with pytest.raises(RuntimeError, match=rf"after evaluating cases \[0\]: {name}"):
            _evaluate(model, cf_path, tmp_path, RankOneEdits(side=nudge), n=3)
    finally:
        with torch.no_grad():
            norm.copy_(saved)


def test_a_write_that_bypasses_the_version_counter_is_caught_after_the_run(
    toy_models, cf_path, tmp_path
):
    model = toy_models["gpt2"]
    name, norm = block_tensors(model)[0][0]
    saved = norm.detach().clone()

    def sneak(m) -> None:
        norm.data.add_(1e-3)  # .data has its own version counter: invisible per case

    try:
        with pytest.raises(RuntimeError, match=rf"during the evaluation .*{name}"):
            _evaluate(model, cf_path, tmp_path, RankOneEdits(side=sneak), n=2)
    finally:
        with torch.no_grad():
            norm.copy_(saved)


def test_the_target_cache_follows_the_weights_and_reads_only_what_changed(
    toy_models, tmp_path, spy
):
    model = toy_models["llama"]
    hp = TargetHparams()
    weights_key(model)  # every digest taken once
    first = TargetCache(tmp_path, model, 2, "resid", hp).folder
    spy.bytes = 0
    assert TargetCache(tmp_path, model, 2, "resid", hp).folder == first
    assert spy.bytes < 4096  # nothing changed: no tensor read again
    W = down_proj(model, 2)
    old = W[3, 5].clone()
    with torch.no_grad():
        W[3, 5] = torch.nextafter(old, old + 1)
    try:
        spy.bytes = 0
        assert TargetCache(tmp_path, model, 2, "resid", hp).folder != first
        assert W.numel() * W.element_size() <= spy.bytes < 2 * W.numel() * W.element_size()
    finally:
        with torch.no_grad():
            W[3, 5] = old
    assert TargetCache(tmp_path, model, 2, "resid", hp).folder == first
    edit = RankOneEdits()(model, [], "rome", None)
    with edit.applied(model):  # an edit applied: other weights, another folder
        assert TargetCache(tmp_path, model, 2, "resid", hp).folder != first
    assert TargetCache(tmp_path, model, 2, "resid", hp).folder == first


def test_the_guard_compares_on_the_device_what_an_edit_touched(toy_models, spy):
    model = toy_models["gptj"]
    guard = WeightsGuard(model)
    edit = RankOneEdits()(model, [], "rome", None)
    spy.bytes = 0
    for _ in range(3):
        guard.protect([down_proj(model, 1)])
        with edit.applied(model):
            pass
        guard.check("an edit")
    assert spy.bytes == 0  # no host read at all per edit
    guard.finish()


def test_weights_key_sees_one_ulp_and_not_the_thread_count(toy_models):
    """The unedited cache and the leak check key on the exact weights: one ulp in one layer
    changes the key, restoring it gives the same key back, and so does another thread count
    (float sums would change with the reduction order)."""
    model = toy_models["llama"]
    key = weights_key(model)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert weights_key(model) == key
    finally:
        torch.set_num_threads(threads)
    W = down_proj(model, 2)
    old = W[3, 5].clone()
    with torch.no_grad():
        W[3, 5] = torch.nextafter(old, old + 1)
    try:
        assert weights_key(model) != key
    finally:
        with torch.no_grad():
            W[3, 5] = old
    assert weights_key(model) == key
    for name, p in model.blocks[1].named_parameters():  # every block tensor counts, not only
        flat = p.data.view(-1)  # the down-projection (fine-tuning edits attention and norms)
        old = flat[0].clone()
        with torch.no_grad():
            flat[0] = torch.nextafter(old, old + 1)
        try:
            assert weights_key(model) != key, name
        finally:
            with torch.no_grad():
                flat[0] = old
    assert weights_key(model) == key
