"""Shared fixtures. Tests never touch the network or the user's cache: both are fenced off here, at import."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["DIFFLORA_CACHE"] = tempfile.mkdtemp(prefix="difflora-test-cache-")

import pytest  # noqa: E402

from difflora.models import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The embedded tiny Stable Diffusion, built once per test session."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd")
