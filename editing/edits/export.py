"""Exporting an edited model as a plain Hugging Face folder.

:func:`export_model` writes the model's current weights (edits applied) as safetensors with
its config and its own tokenizer, so that ``AutoModelForCausalLM.from_pretrained(folder)``
loads it without factscope; :meth:`editing.edits.edit.Edit.export` applies an edit, exports and
undoes it. This works for the embedded GGUF-derived model too: it is held as an ordinary
Hugging Face model once dequantised.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from tracing.errors import InvalidInput
from tracing.models import HookedModel, model_info

#: What an export folder records about its origin (beside config.json).
ORIGIN_FILE = "factscope_export.json"


def check_export_folder(folder: str | Path) -> Path:
    """``folder`` may receive an export: it does not exist yet, or is an empty folder."""
    out = Path(folder)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInput(f"export folder {out} exists and is not empty: choose a new folder")
    return out


def _plain_hf_model(hf: Any) -> Any:
    """The Hugging Face model under a bridge, as its own class with its own parameter names.

    The bridge wraps the HF modules in place (``..._original_component...`` paths and alias
    paths share each tensor), which ``save_pretrained`` refuses. A skeleton of the model's
    class is built on the meta device and given the bridge's tensors under their HF names
    (no copy); tied weights are re-tied."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        plain = AutoModelForCausalLM.from_config(hf.config)
    wanted = set(plain.state_dict())
    found: dict[str, torch.Tensor] = {}
    for key, tensor in hf.state_dict().items():
        name = key.replace("._original_component", "")
        if name in wanted:
            found.setdefault(name, tensor)
    plain.load_state_dict(found, strict=False, assign=True)
    plain.tie_weights()
    missing = [n for n, p in plain.named_parameters() if p.device.type == "meta"]
    if missing:
        raise InvalidInput(f"cannot export: no weights found for {', '.join(missing[:3])}")
    plain.generation_config = hf.generation_config
    return plain.eval()


def export_model(model: HookedModel, folder: str | Path, origin: dict | None = None) -> Path:
    """Write ``model`` (its current weights) as a Hugging Face folder: ``model.safetensors``,
    ``config.json``, the tokenizer of the model it was loaded from, and ``origin`` (what was
    edited) in :data:`ORIGIN_FILE`. The folder is assembled under a temporary name and
    renamed into place, so a failed export leaves nothing behind. Returns the folder."""
    from transformers import AutoTokenizer

    from tracing.loading import _hub_offline, resolve_source

    out = check_export_folder(folder)
    hf: Any = model.original_model
    if any(v == "disk" for v in (getattr(hf, "hf_device_map", None) or {}).values()):
        raise InvalidInput("cannot export a model with blocks offloaded to disk: load it whole")
    name = model_info(model).name
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        work = Path(tmp) / "hf"
        _plain_hf_model(hf).save_pretrained(work, safe_serialization=True)
        with _hub_offline():
            AutoTokenizer.from_pretrained(resolve_source(name)).save_pretrained(work)
        info = {"exported_by": "factscope", "source_model": name, **(origin or {})}
        (work / ORIGIN_FILE).write_text(json.dumps(info, indent=1))
        if out.exists():
            out.rmdir()  # empty, checked above
        shutil.move(str(work), str(out))
    return out
