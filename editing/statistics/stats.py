"""Second-moment statistics of MLP keys, E[k k^T], over a text corpus, cached on disk.

ROME's and MEMIT's updates weight keys by the inverse of the uncentred second moment
``C = E[k k^T]`` of the down-projection input ``k`` (hook kind ``mlp_key``) at the edited layer.
:func:`layer_second_moments` collects every requested layer in ONE forward pass per batch that
stops right after the deepest requested layer's key is read (no later computation runs), sums
``k^T k`` per batch in float32 or float64, checkpoints the partial sums so an interrupted run
resumes, and caches each layer's result under
``<cache_dir>/stats/<fingerprint>/<corpus>-n<n_tokens>-s<seq_len>-<dtype>/layer_<L>.*``.

What "tokens" counts: every position fed to the model whose key enters the sum. The corpus is
tokenised paragraph by paragraph (each followed by a newline) into one stream, cut into
sequences of ``seq_len`` positions; for a model that starts prompts with BOS (Gemma, Llama)
each sequence is ``[BOS] + (seq_len - 1)`` corpus tokens and the BOS position is counted (its
key is part of every prompt the model sees, and an edit should keep it). The last sequence is
shorter when ``n_tokens`` is not a multiple of ``seq_len``, so exactly ``n_tokens`` keys are
summed.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors.torch import load_file
from tqdm.auto import tqdm

from editing.statistics.corpus import wikitext_paragraphs
from editing.statistics.tensor_file import write_safetensors
from tracing.distributed import Ranks, all_reduce_sum, barrier, ranks, together
from tracing.errors import InvalidInput
from tracing.forward import run_until
from tracing.io import atomic_path, write_json_atomic
from tracing.loading import cache_dir as user_cache_dir
from tracing.memory import batch_tokens, halving
from tracing.models import (
    HookedModel,
    check_layer,
    fingerprint,
    hook_name,
    layer_device,
    mlp_width,
    model_device,
    model_name,
    prepends_bos,
)

log = logging.getLogger(__name__)

CORPORA = ("wikitext", "wikitext-test", "wikitext-valid")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class SecondMoment:
    """E[k k^T] of the down-projection input at ``layer`` over ``count`` corpus tokens."""

    layer: int
    mom2: Float[torch.Tensor, "d_mlp d_mlp"]  # uncentred, float32 or float64
    count: int
    path: Path | None = None  # cache file it lives in, if cached

    def summary(self) -> dict[str, float]:
        """Trace, largest and smallest eigenvalue, and the condition number of ``mom2``."""
        eig = torch.linalg.eigvalsh(self.mom2.double())
        top, low = float(eig[-1]), float(eig[0])
        return {
            "trace": float(self.mom2.double().trace()),
            "top_eigenvalue": top,
            "min_eigenvalue": low,
            "condition": top / low if low > 0 else float("inf"),
        }


# --------------------------------------------------------------------------- corpus


def _corpus_paragraphs(corpus: str) -> Iterator[str]:
    if corpus == "wikitext":
        yield from wikitext_paragraphs("test")
        yield from wikitext_paragraphs("valid")
    elif corpus in ("wikitext-test", "wikitext-valid"):
        yield from wikitext_paragraphs(corpus.split("-")[1])
    else:
        path = Path(corpus)
        if not path.is_file():
            raise InvalidInput(
                f"unknown corpus {corpus!r}: expected one of {CORPORA} or a text file path"
            )
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield line.strip()


def corpus_key(corpus: str) -> str:
    """Cache-key form of a corpus: its name, or ``file-<hash>`` of a text file's content."""
    if corpus in CORPORA:
        return corpus
    path = Path(corpus)
    if not path.is_file():
        raise InvalidInput(f"unknown corpus {corpus!r}: expected one of {CORPORA} or a text file")
    return f"file-{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"


def corpus_sequences(
    model: HookedModel, corpus: str, n_tokens: int, seq_len: int
) -> list[list[int]]:
    """The token sequences whose keys :func:`layer_second_moments` sums: exactly ``n_tokens``
    positions in sequences of ``seq_len`` (the last may be shorter), each starting with BOS
    for models that use one (see the module docstring)."""
    if n_tokens < 1 or seq_len < 2:
        raise InvalidInput(f"need n_tokens >= 1 and seq_len >= 2, got {n_tokens}, {seq_len}")
    bos = prepends_bos(model)
    lengths = [seq_len] * (n_tokens // seq_len) + (
        [n_tokens % seq_len] if n_tokens % seq_len else []
    )
    need = n_tokens - (len(lengths) if bos else 0)
    stream: list[int] = []
    for text in _corpus_paragraphs(corpus):
        stream.extend(model.tokenizer(text + "\n", add_special_tokens=False)["input_ids"])
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise InvalidInput(
            f"corpus {corpus!r} has only {len(stream)} tokens for this model; {n_tokens} requested"
        )
    out, pos = [], 0
    for n in lengths:
        take = n - 1 if bos else n
        out.append(([model.tokenizer.bos_token_id] if bos else []) + stream[pos : pos + take])
        pos += take
    return out


def _batches(seqs: list[list[int]], batch_size: int) -> list[torch.Tensor]:
    """Equal-length sequences in batches of ``batch_size`` (the short last sequence alone)."""
    full = [s for s in seqs if len(s) == len(seqs[0])]
    rest = seqs[len(full) :]
    out = [torch.tensor(full[i : i + batch_size]) for i in range(0, len(full), batch_size)]
    return out + [torch.tensor([s]) for s in rest]


# --------------------------------------------------------------------------- cache


def stats_dir(
    model: HookedModel,
    *,
    n_tokens: int,
    corpus: str = "wikitext",
    dtype: torch.dtype | str = torch.float32,
    seq_len: int = 128,
    cache_dir: Path | None = None,
) -> Path:
    """The cache folder for these settings (one ``layer_<L>`` pair of files per layer)."""
    root = Path(cache_dir) if cache_dir is not None else user_cache_dir() / "stats"
    name = f"{corpus_key(corpus)}-n{n_tokens}-s{seq_len}-{_dtype_name(dtype)}"
    return root / fingerprint(model) / name


def _dtype_name(dtype: torch.dtype | str) -> str:
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise InvalidInput(f"statistics dtype must be float32 or float64, got {dtype!r}")
    return name


def _atomic_save(tensors: dict[str, torch.Tensor], meta: dict, stem: Path) -> None:
    """Write ``stem.safetensors`` then ``stem.json`` (the json marks completion)."""
    with atomic_path(stem.with_suffix(".safetensors")) as tmp:
        write_safetensors(tmp, tensors)  # streamed: no in-memory copy of the file
    write_json_atomic(stem.with_suffix(".json"), meta)


def _check_finite(t: torch.Tensor, layer: int, where: str) -> None:
    if not torch.isfinite(t).all():
        raise InvalidInput(f"layer {layer}: NaN or inf in the second-moment statistics ({where})")


def _load_cached(folder: Path, layer: int) -> SecondMoment | None:
    stem = folder / f"layer_{layer}"
    meta_path, data_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if not (meta_path.exists() and data_path.exists()):
        return None
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    mom2 = load_file(str(data_path))["mom2"]
    _check_finite(mom2, layer, f"cache file {data_path}")
    return SecondMoment(layer=layer, mom2=mom2, count=int(meta["count"]), path=data_path)


# --------------------------------------------------------------------------- collection


def _partial_stem(folder: Path, here: Ranks) -> Path:
    """Where this rank checkpoints its partial sums (one file per rank under torchrun)."""
    return folder / ("partial" if here.world == 1 else f"partial.rank{here.rank}of{here.world}")


def _load_partial(stem: Path, meta: dict) -> tuple[dict[int, torch.Tensor], int, int] | None:
    folder = stem.parent
    if not (stem.with_suffix(".json").exists() and stem.with_suffix(".safetensors").exists()):
        return None
    saved = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
    if {k: saved.get(k) for k in meta} != meta:
        log.info("ignoring a checkpoint in %s made with other settings", folder)
        return None
    sums = {int(k): v for k, v in load_file(str(stem.with_suffix(".safetensors"))).items()}
    log.info("resuming second moments from batch %d (%d tokens)", saved["batches"], saved["count"])
    return sums, int(saved["batches"]), int(saved["count"])


def layer_second_moments(
    model: HookedModel,
    layers: Sequence[int],
    *,
    n_tokens: int = 100_000,
    corpus: str = "wikitext",
    dtype: torch.dtype | str = torch.float32,
    seq_len: int = 128,
    batch_size: int | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
    checkpoint_every: int = 25,
) -> dict[int, SecondMoment]:
    """E[k k^T] of the MLP down-projection input at each of ``layers``, by layer.

    Layers already in the cache are read from it without running the model; the others are
    collected together in one forward pass per batch of ``batch_size`` sequences that stops
    after the deepest of them (``batch_size`` default: 8 on the CPU, the model's token budget
    over ``seq_len`` on CUDA, :mod:`tracing.memory`; a batch that runs out of memory is split
    in halves). ``dtype`` (float32 or float64) is the accumulation and result type, whatever
    the model's dtype. Partial sums are checkpointed every ``checkpoint_every`` batches, so a
    killed run resumes where it stopped. ``cache_dir`` defaults to
    ``tracing.loading.cache_dir()/stats``. Raises InvalidInput naming the layer if a key or the
    result holds NaN/inf.
    """
    layers = sorted({check_layer(model, int(L)) for L in layers})
    if not layers:
        raise InvalidInput("no layers given for the second-moment statistics")
    if batch_size is None:
        batch_size = max(8, batch_tokens(model, cpu_default=8 * seq_len) // seq_len)
    if batch_size < 1 or checkpoint_every < 1:
        raise InvalidInput("batch_size and checkpoint_every must be at least 1")
    acc_dtype = _DTYPES[_dtype_name(dtype)]
    folder = stats_dir(
        model,
        n_tokens=n_tokens,
        corpus=corpus,
        dtype=acc_dtype,
        seq_len=seq_len,
        cache_dir=cache_dir,
    )
    result = {L: m for L in layers if (m := _load_cached(folder, L)) is not None}
    todo = [L for L in layers if L not in result]
    if not todo:
        return result

    folder.mkdir(parents=True, exist_ok=True)
    batches = _batches(corpus_sequences(model, corpus, n_tokens, seq_len), batch_size)
    d_mlp = mlp_width(model)
    meta = {
        "layers": todo,
        "batch_size": batch_size,
        "n_tokens": n_tokens,
        "seq_len": seq_len,
        "dtype": _dtype_name(acc_dtype),
        "corpus": corpus_key(corpus),
    }
    here = ranks()
    partial = _partial_stem(folder, here)
    resumed = _load_partial(partial, meta)
    if resumed is None:
        # Accumulated in float32 or float64 (``dtype``) on each layer's own device, whatever
        # the model's dtype.
        sums = {
            L: torch.zeros(d_mlp, d_mlp, dtype=acc_dtype, device=layer_device(model, L))
            for L in todo
        }
        start, count = 0, 0
    else:
        sums, start, count = resumed
        sums = {L: s.to(layer_device(model, L)) for L, s in sums.items()}
    current = {"batch": start}
    device = model_device(model)
    pending: dict[int, torch.Tensor] = {}  # keys of the rows in flight, added once they all ran

    def collect(layer: int):
        def hook(act: torch.Tensor, hook) -> None:
            k = act.detach().reshape(-1, act.shape[-1])
            if not torch.isfinite(k).all():
                raise InvalidInput(
                    f"layer {layer}: NaN or inf in the MLP keys (down-projection input) "
                    f"on corpus batch {current['batch']}"
                )
            pending[layer] = k

        return hook

    def run_rows(rows: Sequence[torch.Tensor]) -> None:
        pending.clear()
        run_until(model, torch.stack(list(rows)).to(device), hooks, stop_after=hooks[-1][0])
        for layer, k in pending.items():
            k = k.to(sums[layer].device, acc_dtype)
            sums[layer].addmm_(k.T, k)
        pending.clear()

    hooks = [(hook_name(model, "mlp_key", L), collect(L)) for L in todo]
    t0 = time.perf_counter()
    bar = tqdm(
        total=n_tokens,
        initial=count,
        unit="tok",
        disable=not progress or not here.is_main,
        desc=f"E[kk^T] layers {todo}",
    )

    def collect_share() -> int:
        """This rank's batches (all of them in one process); returns its token count."""
        n = count
        with torch.no_grad():
            for b in range(start, len(batches)):
                if b % here.world != here.rank:
                    continue
                current["batch"] = b
                halving(list(batches[b]), len(batches[b]), run_rows, "statistics")
                n += batches[b].numel()
                bar.update(batches[b].numel() * here.world)
                if (b + 1) % checkpoint_every == 0 and b + 1 < len(batches):
                    _atomic_save(
                        {str(L): s for L, s in sums.items()},
                        {**meta, "batches": b + 1, "count": n},
                        partial,
                    )
        return n

    try:
        count = together(collect_share)
    finally:
        bar.close()
    # torchrun: every rank took disjoint batches; sums and counts add up over ranks.
    count = int(all_reduce_sum(torch.tensor([count], dtype=torch.float64))[0])
    for L in todo:
        all_reduce_sum(sums[L])
    seconds = time.perf_counter() - t0
    for L in todo:
        mom2 = sums.pop(L).div_(count)  # in place: one d_mlp^2 matrix per layer, not two
        _check_finite(mom2, L, f"after {count} tokens")
        info = {
            "layer": L,
            "count": count,
            "fingerprint": fingerprint(model),
            "model": model_name(model),
            "seconds": round(seconds, 2),
            **{k: v for k, v in meta.items() if k != "layers"},
        }
        if here.is_main:
            _atomic_save({"mom2": mom2}, info, folder / f"layer_{L}")
        result[L] = SecondMoment(L, mom2, count, folder / f"layer_{L}.safetensors")
    barrier()
    for suffix in (".json", ".safetensors"):
        partial.with_suffix(suffix).unlink(missing_ok=True)
    log.info("second moments of layers %s: %d tokens in %.1f s", todo, count, seconds)
    return dict(sorted(result.items()))
