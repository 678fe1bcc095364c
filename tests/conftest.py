"""Shared fixtures. Tests never touch the network or the user's caches: both are fenced off here, at import,
before any test module imports huggingface_hub (which reads these variables once, when it is imported)."""

import atexit
import os
import shutil
import tempfile

_TEST_CACHE_ROOT = tempfile.mkdtemp(prefix="difflora-test-cache-")
atexit.register(shutil.rmtree, _TEST_CACHE_ROOT, ignore_errors=True)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HOME"] = os.path.join(_TEST_CACHE_ROOT, "huggingface")
os.environ["DIFFLORA_CACHE"] = os.path.join(_TEST_CACHE_ROOT, "difflora")
# One torch thread, here and in the CLI subprocesses (which must match in-process results bit for bit): the tiny
# model's ops are far too small to gain from threads, and when another process keeps a core busy, torch's worker
# threads wait on each other; a 2-step generation measured 9.6 s with 2 threads and 0.13 s with 1.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from difflora.pipelines import load_pipeline  # noqa: E402
from difflora.tiny_model import build_tiny_model  # noqa: E402

torch.set_num_threads(1)  # in case torch was imported before the variable above was set


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The embedded tiny Stable Diffusion as a diffusers folder, built once per test session. Do not modify it."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture
def tiny_pipeline(tiny_model_dir):
    """A fresh pipeline of the tiny model for each test (fp32, CPU, progress bars off): tests may change it freely."""
    return load_pipeline(tiny_model_dir, device="cpu", quiet=True)
