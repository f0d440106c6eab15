"""Shared fixtures: a no-network guard, tiny random models of every architecture, and the
real embedded model (tests using it are marked ``model``)."""

from __future__ import annotations

import os
import socket

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# Under pytest-xdist (scripts/test.sh runs two workers) the cores are shared between workers.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))

ARCHS = ("gpt2", "gptj", "llama", "gemma3")


def pytest_report_header() -> list[str]:
    """The versions the suite runs on (pyproject.toml bounds them to the ones it passed on)."""
    from importlib.metadata import version

    names = ("torch", "transformers", "transformer-lens", "jaxtyping", "beartype")
    return ["factscope deps: " + ", ".join(f"{n} {version(n)}" for n in names)]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest first: notebooks, then the embedded model's tests, then the tiny models' (stable
    within each). With two xdist workers the long tests start at once and the short ones fill
    the gaps, instead of a notebook running alone at the end. Tests marked ``cuda`` are
    skipped ("no CUDA device") where ``torch.cuda.is_available()`` is false."""

    def rank(item: pytest.Item) -> int:
        if item.get_closest_marker("notebook"):
            return 0
        return 1 if item.get_closest_marker("model") else 2

    items.sort(key=rank)
    if not torch.cuda.is_available():  # the GPU tests show as skipped, with the reason (-rs)
        no_cuda = pytest.mark.skip(reason="no CUDA device")
        for item in items:
            if item.get_closest_marker("cuda"):
                item.add_marker(no_cuda)


class NetworkAccessError(RuntimeError):
    pass


def _is_loopback(address: object) -> bool:
    host = address[0] if isinstance(address, tuple) and address else address
    return isinstance(host, str) and (host in ("localhost", "::1") or host.startswith("127."))


@pytest.fixture(autouse=True, scope="session")
def no_network():
    """Fail any attempt to open a network connection (loopback and unix sockets allowed)."""
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def guarded(self, address, _real=real_connect):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
            raise NetworkAccessError(f"test tried to open a network connection to {address!r}")
        return _real(self, address)

    def guarded_ex(self, address):
        return guarded(self, address, _real=real_connect_ex)

    socket.socket.connect = guarded
    socket.socket.connect_ex = guarded_ex
    yield
    socket.socket.connect = real_connect
    socket.socket.connect_ex = real_connect_ex


@pytest.fixture(scope="session")
def toy_dirs(tmp_path_factory) -> dict[str, str]:
    """Folders of tiny random GPT-2, GPT-J, Llama and Gemma-3 models with their tokenizers."""
    from tracing.toy_models import build_toy_model

    root = tmp_path_factory.mktemp("toy_models")
    return {arch: str(build_toy_model(arch, root / arch)) for arch in ARCHS}


@pytest.fixture(scope="session")
def toy_models(toy_dirs):
    """Loaded bridges of the tiny models, by architecture (shared: tests must undo edits)."""
    from tracing.models import load_model

    return {arch: load_model(path) for arch, path in toy_dirs.items()}


@pytest.fixture(params=ARCHS)
def toy_arch(request) -> str:
    """Each tiny architecture's name in turn (for tests that need its folder and bridge)."""
    return request.param


@pytest.fixture(params=ARCHS)
def toy_model(request, toy_models):
    """Each tiny architecture in turn."""
    return toy_models[request.param]


@pytest.fixture(scope="session")
def gemma():
    """The real embedded model (Gemma 3 270M). Tests must leave its weights as they found them."""
    from tracing.models import load_model

    return load_model("gemma-3-270m")


@pytest.fixture(scope="session")
def reduced_record():
    """A function turning a CounterFact record into the shipped reduced form (one
    paraphrase, one neighbour), the shape of a user's own ``--dataset cases.json`` file."""
    return _reduced_record


def _reduced_record(rec) -> dict:
    return {
        "case_id": rec.case_id,
        "prompt": rec.prompt,
        "subject": rec.subject,
        "target_new": rec.target_new,
        "ground_truth": rec.target_true,
        "rephrase_prompt": rec.paraphrase_prompts[0],
        "locality_prompt": rec.neighborhood_prompts[0],
    }
