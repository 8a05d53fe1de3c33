import pytest
import torch

import timm
import timm_exits  # noqa: F401  registers the models


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def spread_exit_heads(model: torch.nn.Module, scale: float = 30.) -> torch.nn.Module:
    """Make random exits disagree in confidence (untrained exits are all near-uniform) so thresholds split batches."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(('exits.', 'uncertainty.', 'head.')) and p.ndim == 2:
                p.mul_(scale)
    return model


@pytest.fixture
def tiny():
    """The tiny test variant in eval mode, with exits whose confidences spread over (0, 1)."""
    return spread_exit_heads(timm.create_model('test_vit_mexit').eval())
