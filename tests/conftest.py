"""Fixtures shared across test folders."""

import pytest
import torch


@pytest.fixture
def exact_fp32():
    """CUDA checks against the CPU in true fp32: TF32 matmuls (allowed by some torch builds
    or settings) round to ~1e-3, so they are switched off for the test and restored after."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
