"""Finding and reading the shipped hyper-parameter files (``editing/hparams_defaults``).

A model's files are ``{family}_{model key}.json``; the key comes from the model's name
(:func:`model_key`), another spelling of it (:data:`ALIASES`), or, for a local folder whose
name says nothing, from its ``config.json`` (:func:`config_key`). :mod:`editing.hparams`
reads them into typed hyper-parameters.
"""

from __future__ import annotations

import json
import logging
from importlib.resources import files
from pathlib import Path

from tracing.errors import InvalidHparams

log = logging.getLogger("editing.hparams")


def defaults_dir() -> Path:
    """The folder of the shipped default files."""
    return Path(str(files("editing").joinpath("hparams_defaults")))


def model_key(model_name: str) -> str:
    """File-name form of a model name: the last path component, lower case
    (``EleutherAI/gpt-j-6B`` -> ``gpt-j-6b``; ``/models/gpt2-xl/`` -> ``gpt2-xl``)."""
    return Path(str(model_name).rstrip("/")).name.lower()


#: Other spellings of the models that have published files, by the file's model key.
ALIASES: dict[str, str] = {
    "llama-3-8b": "meta-llama-3-8b",
    "llama3-8b": "meta-llama-3-8b",
    "llama-3-8b-instruct": "meta-llama-3-8b-instruct",
    "llama3-8b-instruct": "meta-llama-3-8b-instruct",
}

#: A local folder's ``config.json`` -> the model key, for folders whose name says nothing:
#: (architecture, layers, width, vocabulary, context, eos id). The released configs of a
#: base model and its instruct model differ in the eos id (and Qwen2.5 in the context);
#: Qwen2-7B's config equals Qwen2.5-7B's, so such a folder gets Qwen2.5's file (logged).
CONFIG_SIGNATURES: dict[tuple[str, int, int, int, int, int], str] = {
    ("LlamaForCausalLM", 32, 4096, 128256, 8192, 128001): "meta-llama-3-8b",
    ("LlamaForCausalLM", 32, 4096, 128256, 8192, 128009): "meta-llama-3-8b-instruct",
    ("Qwen2ForCausalLM", 28, 3584, 152064, 131072, 151643): "qwen2.5-7b",
    ("Qwen2ForCausalLM", 28, 3584, 152064, 32768, 151645): "qwen2.5-7b-instruct",
    ("MistralForCausalLM", 32, 4096, 32768, 32768, 2): "mistral-7b-v0.3",
}


def config_key(folder: str | Path) -> str | None:
    """The model key a local Hugging Face folder's ``config.json`` identifies
    (:data:`CONFIG_SIGNATURES`), or None (no config, or a model without published files)."""
    path = Path(folder).expanduser() / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    eos = cfg.get("eos_token_id")
    signature = (
        str((cfg.get("architectures") or [""])[0]),
        cfg.get("num_hidden_layers"),
        cfg.get("hidden_size"),
        cfg.get("vocab_size"),
        cfg.get("max_position_embeddings"),
        eos[0] if isinstance(eos, list) and eos else eos,
    )
    return CONFIG_SIGNATURES.get(signature)  # type: ignore[arg-type]


def default_file(family: str, model_name: str | None = None) -> Path:
    """The default file of a method family for ``model_name`` (the family's ``_default``
    file when that model has none).

    ``model_name`` is found by its key (:func:`model_key`), then by another spelling of it
    (:data:`ALIASES`), then, for a local folder, by what its ``config.json`` says the model
    is (:func:`config_key`: a folder named ``/data/ckpt`` holding Llama-3-8B-Instruct gets
    the Llama-3-8B-Instruct files)."""
    if model_name is not None:
        key = model_key(model_name)
        for candidate in (key, ALIASES.get(key), config_key(model_name)):
            path = defaults_dir() / f"{family}_{candidate}.json"
            if candidate is not None and path.exists():
                if candidate != key:
                    log.info("%s defaults for %r: %s", family, model_name, path.name)
                return path
        log.info("no %s defaults for model %r: using %s_default.json", family, model_name, family)
    return defaults_dir() / f"{family}_default.json"


def read_file(path: Path) -> dict:
    """The JSON object of a hyper-parameter file; unreadable or non-object files refused."""
    if not path.is_file():
        raise InvalidHparams(f"no hyper-parameter file {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidHparams(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise InvalidHparams(f"{path}: expected a JSON object of hyper-parameters")
    return data
