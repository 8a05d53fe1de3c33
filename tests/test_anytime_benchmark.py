"""benchmarks/anytime_deadlines.py: accuracy per exit and at deadlines (deadline 0 answers at the first exit, a
deadline no batch reaches at the final one; both are clock-independent)."""
import importlib.util
from pathlib import Path

import timm
import torch

from timm_exits.data import DigitsDataset

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'anytime_deadlines.py'


def _module():
    spec = importlib.util.spec_from_file_location('anytime_deadlines', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_deadlines_bracket_the_exits():
    bench = _module()
    model = timm.create_model('test_vit_mexit', num_classes=10).eval()
    data = DigitsDataset('test', 32)
    images, targets = data.images[:40], data.targets[:40]
    result = bench.run(model, images, targets, 16, [0., 1e6], None, rounds=1)
    first, final = model.exit_layers[0], model.exit_layers[-1]
    with torch.no_grad():
        exits = model.forward_exits(images)
    expected = [100. * int((z.argmax(-1) == targets).sum()) / len(targets) for z in exits]
    assert list(result['anytime_accuracy'].values()) == expected
    early, late = result['deadlines']
    assert early['answered_at'][str(first)] == 1. and early['accuracy'] == expected[0]
    assert late['answered_at'][str(final)] == 1. and late['accuracy'] == expected[-1] and late['mean_cost'] == 1.
