"""Loading hooked models offline: embedded GGUF models (cached as safetensors,
:mod:`tracing.model_cache`), local Hugging Face folders, and hub ids already in the local
Hugging Face cache, placed where :mod:`tracing.devices` says.

A load that fails says why in one line (:class:`~tracing.errors.ModelLoadError`): out of
memory on its device, a device map accelerate cannot follow, files that cannot be read. Only
an embedded model's cache that is itself damaged (:func:`~tracing.model_cache.cache_is_sound`)
is rebuilt, once; a failure of any other kind rebuilds nothing and is reported at once.
Nothing here touches the network: the Hugging Face hub is put offline around every load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
from transformer_lens.model_bridge import TransformerBridge
from transformers import PreTrainedModel

from tracing.devices import DeviceMap, check_placement, resolve_dtype
from tracing.errors import ModelLoadError
from tracing.model_cache import (  # noqa: F401  (re-exported: tracing.loading's names)
    _COMPLETE_MARKER,
    CACHE_FORMAT,
    EMBEDDED_MODELS,
    EmbeddedModel,
    _build_embedded_cache,
    _cache_is_complete,
    _embedded_gguf,
    available_models,
    build_embedded_cache,
    cache_dir,
    cache_is_sound,
    embedded_cache_path,
    hub_offline,
    resolve_source,
)

#: The old name of :class:`tracing.model_cache.hub_offline`.
_hub_offline = hub_offline

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma-3-270m"

# --------------------------------------------------------------------------- loading


def _official_name(config: object, fallback: str) -> str:
    return str(getattr(config, "_name_or_path", "") or fallback)


def _n_params(source: str) -> int:
    """Parameter count of the model a local folder holds, from its config alone (built on the
    meta device: no weights are read)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with hub_offline():
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def _from_pretrained(source: str, placement: Placement, **kwargs: object) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    extra: dict[str, object] = {}
    if placement.device_map is not None:
        extra["device_map"] = placement.device_map
        if placement.offload_folder is not None:
            extra["offload_folder"] = str(placement.offload_folder)
    elif placement.device.type != "cpu":
        extra["device_map"] = {"": str(placement.device)}  # straight onto the device
    with hub_offline():
        return AutoModelForCausalLM.from_pretrained(
            source, dtype=placement.dtype, **extra, **kwargs
        )


@dataclass(frozen=True)
class Placement:
    """Where and in which precision a model is loaded: one device, or a device map for a
    model split over several devices (accelerate places the blocks; ``offload_folder`` holds
    any blocks mapped to ``disk``)."""

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    device_map: DeviceMap | None = None
    offload_folder: Path | None = None

    @classmethod
    def resolve(
        cls,
        source: str | None,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype = "auto",
        device_map: str | dict[str, str | int] | None = None,
        offload_folder: str | Path | None = None,
    ) -> Placement:
        """Check every choice before any weights are read and settle ``auto``
        (:mod:`tracing.devices`); ``source`` is the local model folder, whose config gives the
        parameter count that ``dtype="auto"`` needs on CUDA."""
        dev, _, dmap = check_placement(device, dtype, device_map)
        n = _n_params(source) if dtype == "auto" and dev.type == "cuda" and source else None
        folder = Path(offload_folder) if offload_folder else None
        return cls(dev, resolve_dtype(dtype, dev, n), dmap, folder)


def load_hf(
    name_or_path: str, placement: Placement | None = None
) -> tuple[PreTrainedModel, object, str]:
    """Load a Hugging Face causal LM and tokenizer from local files only, placed and cast as
    ``placement`` says (default: float32 on the CPU).

    Returns ``(model, tokenizer, official_name)``; ``official_name`` is what TransformerLens
    uses to pick its architecture adapter. A failure is one :class:`ModelLoadError` line
    naming its cause (:func:`raise_load_failure`); only a damaged cache of an embedded model is
    rebuilt, once.
    """
    if name_or_path in EMBEDDED_MODELS:
        spec = EMBEDDED_MODELS[name_or_path]
        folder = embedded_cache_path(name_or_path)
        if not _cache_is_complete(folder):  # never built, or left half-written
            folder = build_embedded_cache(name_or_path)
        place = placement or Placement.resolve(str(folder))
        try:
            model, tok = _read(str(folder), place)
        except Exception as exc:  # noqa: BLE001  (sorted below: the cache's fault or not)
            if cache_is_sound(folder):
                raise_load_failure(name_or_path, place, exc)
            log.warning("cached copy of %s is damaged (%s); rebuilding", name_or_path, exc)
            folder = build_embedded_cache(name_or_path, force=True)
            try:
                model, tok = _read(str(folder), place)
            except Exception as again:  # noqa: BLE001
                raise_load_failure(name_or_path, place, again)
        return model, tok, spec.official_name

    source = resolve_source(name_or_path)
    place = placement or Placement()
    try:
        model, tok = _read(source, place, local_files_only=True)
    except Exception as exc:  # noqa: BLE001  (a bug keeps its traceback: see raise_load_failure)
        raise_load_failure(name_or_path, place, exc)
    return model, tok, _official_name(model.config, name_or_path)


def _read(source: str, place: Placement, **kwargs: object) -> tuple[PreTrainedModel, object]:
    """The tokenizer and the placed model from a local folder (or a cached hub id)."""
    from transformers import AutoTokenizer

    with hub_offline():
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
    return _from_pretrained(source, place, **kwargs), tok


#: Exceptions a load raises for reasons of the files or the placement (not factscope bugs).
_LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, AssertionError, ImportError)


def raise_load_failure(name: str, place: Placement, exc: Exception) -> NoReturn:
    """Raise the one-line :class:`ModelLoadError` for a load of ``name`` placed at ``place``
    that raised ``exc``, naming the cause: out of memory on a device, a device map that
    cannot be followed, files that cannot be read. An exception of another kind (a
    ``TypeError``, an ``AttributeError``: a bug) is raised again as it is, traceback and
    all."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    where = f"device map {place.device_map}" if place.device_map is not None else str(place.device)
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text.lower():
        raise ModelLoadError(
            f"cannot load {name!r}: out of memory on {where} ({first}); free the device, "
            "choose a smaller --dtype or split the model with --device-map"
        ) from exc
    if not isinstance(exc, _LOAD_ERRORS):
        raise exc
    if place.device_map is not None:
        raise ModelLoadError(f"cannot load {name!r} with {where}: {first}") from exc
    raise ModelLoadError(
        f"cannot load {name!r} from local files onto {where} (no network is used): {first}"
    ) from exc


def bridge_from_hf(
    model: PreTrainedModel, tokenizer: object, official_name: str
) -> TransformerBridge:
    """Wrap a loaded (placed, cast) HF causal LM in a TransformerBridge, with no weight
    processing: the bridge's weights are the HF model's own tensors, left where they are.

    The bridge is told the input embedding's device (where tokens go). TransformerLens 4.3,
    given ``hf_model=``, never moves or casts the model; with ``device=None`` it would guess
    ``cuda`` when CUDA is present before correcting itself from ``hf_device_map``, so the
    device is given rather than guessed. A model whose input embedding was offloaded (to
    ``disk``, or to the CPU beside GPUs) is refused in one line: factscope reads that
    embedding's weights directly (the fingerprint, the noise scale), which offloading leaves
    on the meta device."""
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    embedding = model.get_input_embeddings().weight
    if embedding.device.type == "meta":
        where = dict(getattr(model, "hf_device_map", None) or {})
        raise ModelLoadError(
            f"the device map puts the input embedding of {official_name!r} on "
            f"{_embedding_entry(model, where)}: map it (and its tied unembedding) to a device"
        )
    with hub_offline():
        try:
            bridge = TransformerBridge.boot_transformers(
                official_name,
                hf_model=model,
                tokenizer=tokenizer,
                device=str(embedding.device),
                dtype=embedding.dtype,
            )
        except ValueError as exc:  # TransformerLens refuses the placement (a mixed map)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelLoadError(f"TransformerLens cannot wrap {official_name!r}: {first}") from exc
    bridge.eval()
    for p in bridge.parameters():
        p.requires_grad_(False)
    return bridge


def _embedding_entry(model: PreTrainedModel, device_map: dict[str, object]) -> str:
    """The device-map entry that holds the input embedding, as ``'module': target``."""
    names = {id(m): n for n, m in model.named_modules()}
    name = names.get(id(model.get_input_embeddings()), "")
    for key in sorted(device_map, key=len, reverse=True):
        if key == "" or name == key or name.startswith(key + "."):
            return f"{key!r}: {device_map[key]!r}"
    return "an offload device"


def load_bridge(
    name: str = DEFAULT_MODEL, placement: Placement | None = None
) -> tuple[TransformerBridge, bool]:
    """A hooked model by name, from local files only, and whether its own tokenizer starts
    prompts with BOS (read before the bridge adjusts the tokenizer). Use
    :func:`tracing.models.load_model`, which also records the model's identity."""
    model, tok, official = load_hf(name, placement)
    prepend_bos = _raw_tokenizer_adds_bos(tok)
    return bridge_from_hf(model, tok, official), prepend_bos


def _raw_tokenizer_adds_bos(tok) -> bool:
    ids = tok("a", add_special_tokens=True)["input_ids"]
    return tok.bos_token_id is not None and len(ids) > 0 and ids[0] == tok.bos_token_id
