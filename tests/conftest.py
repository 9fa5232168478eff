"""Shared fixtures: tiny SDXL, SD3, FLUX, Z-Image and Qwen-Image pipelines (+ ControlNet) built once per session, and a
CJK font."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A diffusers-format tiny SDXL pipeline with a matching ControlNet in ``<dir>/controlnet``."""
    from skingen.testing.tiny_sdxl import build_tiny_sdxl

    out = tmp_path_factory.mktemp("tiny_sdxl")
    build_tiny_sdxl(out, preset="tiny", seed=0, controlnet=True)
    return out


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A diffusers-format tiny SD3.5-shaped pipeline with a matching SD3ControlNetModel in ``<dir>/controlnet``."""
    from skingen.testing.tiny_models import build_tiny_sd3

    out = tmp_path_factory.mktemp("tiny_sd3")
    build_tiny_sd3(out, seed=0, controlnet=True)
    return out


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """A diffusers-format tiny FLUX.1-dev-shaped pipeline with a matching FluxControlNetModel in ``<dir>/controlnet``."""
    from skingen.testing.tiny_models import build_tiny_flux

    out = tmp_path_factory.mktemp("tiny_flux")
    build_tiny_flux(out, seed=0, controlnet=True)
    return out


@pytest.fixture(scope="session")
def tiny_zimage_dir(tmp_path_factory):
    """A diffusers-format tiny Z-Image pipeline with a matching ZImageControlNetModel in ``<dir>/controlnet``."""
    from skingen.testing.tiny_zimage import build_tiny_zimage

    out = tmp_path_factory.mktemp("tiny_zimage")
    build_tiny_zimage(out, seed=0, controlnet=True)
    return out


@pytest.fixture(scope="session")
def tiny_qwenimage_dir(tmp_path_factory):
    """A diffusers-format tiny Qwen-Image pipeline with a matching QwenImageControlNetModel in ``<dir>/controlnet``."""
    from skingen.testing.tiny_qwenimage import build_tiny_qwenimage

    out = tmp_path_factory.mktemp("tiny_qwenimage")
    build_tiny_qwenimage(out, seed=0, controlnet=True)
    return out


@pytest.fixture(scope="session")
def cjk_font():
    from skingen.prep.glyphs import find_cjk_font

    return find_cjk_font()


@pytest.fixture
def fresh_accelerate_state():
    """Each in-process training run gets a fresh accelerate state, as a new process would."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny-model runs: their ops are too small to split, and on a
    shared 2-core machine two threads stall each other (~10x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
