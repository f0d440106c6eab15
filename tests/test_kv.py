"""The block keyword arguments of :mod:`tracing.kv` against index arithmetic written out."""

import torch

from tracing.kv import ragged_kwargs, suffix_kwargs, truncated_kwargs

WIDTH, DIM = 7, 4


def captured() -> dict:
    """Keyword arguments as a block receives them for one sequence of WIDTH positions."""
    pos = torch.arange(WIDTH)
    mask = torch.triu(torch.full((WIDTH, WIDTH), -1e9), diagonal=1)[None, None]
    emb = torch.randn(1, WIDTH, DIM, generator=torch.Generator().manual_seed(0))
    return {
        "position_embeddings": (emb, emb * 2),
        "position_ids": pos[None],
        "cache_position": pos.clone(),
        "attention_mask": mask,
        "use_cache": False,
    }


def test_suffix_and_truncated_windows_slice_every_positional_argument():
    kw = captured()
    s = suffix_kwargs(kw, 3)
    assert torch.equal(s["position_ids"], kw["position_ids"][:, 3:])
    assert torch.equal(s["cache_position"], kw["cache_position"][3:])
    assert torch.equal(s["position_embeddings"][1], kw["position_embeddings"][1][:, 3:, :])
    assert torch.equal(s["attention_mask"], kw["attention_mask"][:, :, 3:, :])
    assert s["use_cache"] is False
    assert suffix_kwargs(kw, 0) is kw
    t = truncated_kwargs(kw, 5)
    assert torch.equal(t["position_ids"], kw["position_ids"][:, :5])
    assert torch.equal(t["cache_position"], kw["cache_position"][:5])
    assert torch.equal(t["position_embeddings"][0], kw["position_embeddings"][0][:, :5, :])
    assert torch.equal(t["attention_mask"], kw["attention_mask"][:, :, :5, :5])


def test_ragged_rows_see_their_own_positions_and_prefix():
    kw = captured()
    cuts, length, prefix = torch.tensor([2, 5]), 3, 5
    r = ragged_kwargs(kw, cuts, length, prefix, torch.float32)
    for row, cut in enumerate(cuts.tolist()):
        at = [min(cut + i, WIDTH - 1) for i in range(length)]  # padding borrows the last
        assert r["position_ids"][row].tolist() == at
        assert torch.equal(r["position_embeddings"][0][row], kw["position_embeddings"][0][0, at])
        mask = r["attention_mask"][row, 0]
        for q in range(length):
            for k in range(prefix + length):
                own = k < cut if k < prefix else k - prefix <= q
                key_pos = k if k < prefix else at[k - prefix]
                want = kw["attention_mask"][0, 0, at[q], key_pos] if own else -torch.inf
                assert (mask[q, k] <= -1e9) == (want <= -1e9), (row, q, k)
    assert r["cache_position"].tolist() == [2, 3, 4]  # the first row's positions
    assert r["use_cache"] is False
