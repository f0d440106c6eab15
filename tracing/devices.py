"""Where a model runs and in which precision: device, dtype and device-map choices, checked
before any weights are read.

A user names a device (``cpu``, ``cuda``, ``cuda:N``, ``auto``), a dtype (``float32``,
``bfloat16``, ``float16``, ``auto``) and, for a model larger than one device, a device map
(``auto``, ``balanced``, ``sequential`` or a JSON ``{module: device}`` given inline or as a
file; accelerate places the blocks, as ``transformers`` does). What ``auto`` picks:

* device ``auto``: the first CUDA device when one is present, otherwise the CPU;
* under torchrun, ``auto`` and a bare ``cuda`` are each rank's own GPU, ``cuda:LOCAL_RANK``;
  an explicit ``cuda:N``, or a device map naming GPUs, is refused where several ranks share
  a machine (:func:`tracing.distributed.local_cuda_index`);
* dtype ``auto``: float32 on the CPU; on CUDA, bfloat16 (float16 where the GPU has no
  bfloat16) for models above :data:`HALF_ABOVE_PARAMS` parameters, float32 below.

Every function here raises :class:`~tracing.errors.InvalidInput` with one line naming what is
wrong (no GPU behind ``cuda``, an index past the last GPU, an unknown dtype name, a map
naming a device that does not exist), so a command fails before a model is loaded.

Precision policy (said again where it happens): the model runs in its dtype; the numerically
sensitive parts of editing run in float32 or float64 whatever that dtype is: second-moment
accumulation (:mod:`editing.statistics.stats`), the ROME and MEMIT solves, the v*/z deltas
(:mod:`editing.targets.target_loss`) and FT-L's l-infinity projection
(:mod:`editing.methods.finetune`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from tracing.distributed import local_cuda_index, local_ranks
from tracing.errors import InvalidInput

#: ``--dtype auto`` on CUDA uses half precision above this many parameters (~1B).
HALF_ABOVE_PARAMS = 1_000_000_000

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEVICE_MAP_POLICIES = ("auto", "balanced", "balanced_low_0", "sequential")

#: A device map as accelerate takes it: a policy name or ``{module name: device}``.
DeviceMap = str | dict[str, str | int]


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_device(spec: str | torch.device) -> torch.device:
    """``spec`` (``cpu``, ``cuda``, ``cuda:N``, or ``mps`` where present) as a
    ``torch.device`` that exists on this machine; anything else is refused. A bare ``cuda``
    is ``cuda:0``, under torchrun ``cuda:LOCAL_RANK``."""
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise InvalidInput(
            f"unknown device {str(spec)!r}: expected cpu, cuda, cuda:N or auto"
        ) from exc
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        count = _cuda_count()
        if count == 0:
            raise InvalidInput(
                f"device {str(spec)!r}: no CUDA device is available here "
                "(torch.cuda.is_available() is False); use --device cpu or auto"
            )
        index = local_cuda_index(dev.index)
        if index >= count:
            named = str(spec) if dev.index is not None else f"{spec} (cuda:{index}, LOCAL_RANK)"
            raise InvalidInput(
                f"device {named!r}: only {count} CUDA device(s) here (cuda:0..cuda:{count - 1})"
            )
        return torch.device("cuda", index)
    if dev.type == "mps" and torch.backends.mps.is_available():
        return dev
    raise InvalidInput(f"device {str(spec)!r} is not available here: expected cpu, cuda, cuda:N")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device ``spec`` names, ``auto`` (or ``None``) being CUDA when present (under
    torchrun, ``cuda:LOCAL_RANK``), else the CPU."""
    if spec is None or str(spec) == "auto":
        # a bare "cuda": cuda:0, or under torchrun this rank's own cuda:LOCAL_RANK
        return check_device("cuda") if _cuda_count() else torch.device("cpu")
    return check_device(spec)


def check_dtype(spec: str | torch.dtype) -> str | torch.dtype:
    """``spec`` is ``auto`` or a supported floating dtype (by name or value)."""
    if isinstance(spec, torch.dtype):
        if spec not in DTYPES.values():
            raise InvalidInput(f"unsupported dtype {spec}: expected one of {', '.join(DTYPES)}")
        return spec
    if spec == "auto":
        return spec
    if spec not in DTYPES:
        raise InvalidInput(f"unknown dtype {spec!r}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[spec]


def resolve_dtype(
    spec: str | torch.dtype, device: torch.device, n_params: int | None = None
) -> torch.dtype:
    """The dtype ``spec`` names; ``auto`` is float32 on the CPU and, on CUDA, bfloat16
    (float16 without bfloat16 support) for models above :data:`HALF_ABOVE_PARAMS`
    parameters (``n_params`` unknown counts as large)."""
    checked = check_dtype(spec)
    if isinstance(checked, torch.dtype):
        return checked
    if device.type != "cuda" or (n_params is not None and n_params <= HALF_ABOVE_PARAMS):
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def parse_device_map(spec: str | Mapping[str, str | int] | None) -> DeviceMap | None:
    """A device map from a policy name, a JSON object (inline or a ``.json`` file) or a dict;
    every device it names must exist here (``cpu``, ``disk``, ``cuda:N`` or a GPU index)."""
    if spec is None:
        return None
    if local_ranks() > 1 and (
        spec in DEVICE_MAP_POLICIES
        or (not isinstance(spec, str) and any(_names_gpu(w) for w in spec.values()))
    ):
        raise _shared_map(spec)
    if isinstance(spec, str):
        if spec in DEVICE_MAP_POLICIES:
            if spec != "sequential" and _cuda_count() == 0:
                # accelerate's balancing policies need GPUs; on a CPU-only machine they
                # would silently put everything on the CPU.
                raise InvalidInput(
                    f"device map {spec!r} needs CUDA devices and none is available here; "
                    "give an explicit {module: device} map"
                )
            return spec
        text = Path(spec).read_text() if spec.endswith(".json") and Path(spec).is_file() else spec
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidInput(
                f"device map {spec!r}: expected {', '.join(DEVICE_MAP_POLICIES)}, a JSON object "
                "or a .json file of one"
            ) from exc
        if not isinstance(loaded, dict) or not loaded:
            raise InvalidInput(f"device map {spec!r} must be a non-empty JSON object")
        spec = loaded
        if local_ranks() > 1 and any(_names_gpu(w) for w in loaded.values()):
            raise _shared_map(spec)
    gpus = [m for m, w in spec.items() if _names_gpu(w)]
    offloaded = [m for m, w in spec.items() if w in ("cpu", "disk")]
    if gpus and offloaded:
        # TransformerLens 4.3 refuses such a map when it wraps the model, after every weight
        # has been read; say so before any is.
        raise InvalidInput(
            f"device map puts {offloaded[0]!r} on {spec[offloaded[0]]!r} beside GPUs "
            f"({gpus[0]!r} on {spec[gpus[0]]!r}): TransformerLens 4.3 does not run a model "
            "split between GPUs and CPU/disk offload; map every module to a GPU, or none"
        )
    out: dict[str, str | int] = {}
    for module, where in spec.items():
        if isinstance(where, int) or (isinstance(where, str) and where.isdigit()):
            check_device(f"cuda:{int(where)}")
            out[str(module)] = int(where)
        elif where == "disk":
            out[str(module)] = "disk"
        else:
            try:
                out[str(module)] = str(check_device(str(where)))
            except InvalidInput as exc:
                raise InvalidInput(f"device map entry {module!r}: {exc}") from exc
    return out


def _names_gpu(where: object) -> bool:
    return isinstance(where, int) or (
        isinstance(where, str) and (where.isdigit() or where.startswith("cuda"))
    )


def _shared_map(spec: object) -> InvalidInput:
    return InvalidInput(
        f"device map {spec!r} under torchrun: the {local_ranks()} ranks of this machine would "
        "all load onto the same GPUs; give each rank one device (--device cuda) instead"
    )


def check_placement(
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype = "auto",
    device_map: str | Mapping[str, str | int] | None = None,
) -> tuple[torch.device, str | torch.dtype, DeviceMap | None]:
    """Check the three choices together (a device and a device map exclude each other):
    the device (``auto`` settled), the dtype (``auto`` kept: it needs the model's size) and
    the parsed device map."""
    checked = check_dtype(dtype)
    dmap = parse_device_map(device_map)
    if dmap is not None and device not in (None, "auto"):
        raise InvalidInput("give either --device or --device-map, not both")
    return resolve_device(device), checked, dmap


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for an empty module)."""
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")
