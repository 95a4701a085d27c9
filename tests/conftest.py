"""The suite's fixtures and pytest hooks. The tiny pipelines and the helpers the tests share are in
`diffusers_goca.testing`: import them from there (tests import nothing from this file)."""

from __future__ import annotations

import os

import pytest
import torch

from diffusers_goca.testing import make_tiny_sd, make_tiny_sdxl, restoring


def pytest_configure(config):
    torch.set_num_threads(int(os.environ.get("GOCA_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def shared_tiny_sd():
    """One tiny SD pipeline for the session; tests take it through `tiny_sd`, which puts it back after each."""
    return make_tiny_sd()


@pytest.fixture(scope="session")
def shared_tiny_sdxl():
    """One tiny SDXL pipeline for the session; tests take it through `tiny_sdxl`, which puts it back after each."""
    return make_tiny_sdxl()


@pytest.fixture
def tiny_sd(shared_tiny_sd):
    """The session's tiny SD pipeline, put back as it was after the test, passed or failed (`testing.restoring`):
    its UNet's processors and hooks (what `from_pipe` / `enable_goca`, attention slicing or IP-Adapter change), its
    components and its scheduler's config. A test may leave GoCA enabled on a pipeline it made from it."""
    with restoring(shared_tiny_sd):
        yield shared_tiny_sd


@pytest.fixture
def tiny_sdxl(shared_tiny_sdxl):
    """The session's tiny SDXL pipeline, put back as it was after the test (as `tiny_sd`)."""
    with restoring(shared_tiny_sdxl):
        yield shared_tiny_sdxl
