"""Staged ONNX export of regression exits: the runtime's patience (carrying each image's previous prediction and
counter) and predicted-scale exits equal eager ``forward_dynamic``'s, with and without a budget."""
import pytest
import timm
import torch

from timm_exits.export import export_onnx

from .test_regression import _spread

pytest.importorskip('onnxruntime', reason='the deploy extra (onnx, onnxruntime, onnxscript) is not installed')
pytest.importorskip('onnxscript', reason='the deploy extra (onnx, onnxruntime, onnxscript) is not installed')
from timm_exits.runtime import ExitSession  # noqa: E402


@pytest.mark.parametrize('criterion,patience,taus', [('patience', 1, (0., .4, 1.5)), ('patience', 2, (.8, 3.)),
                                                     ('uncertainty', 1, (.5, 2., 30.))])
def test_runtime_matches_eager(tmp_path, criterion, patience, taus):
    torch.manual_seed(0)
    model = _spread(timm.create_model('test_vit_mexit', task='regression', num_classes=2, exit_layers=(1, 2, 3),
                                      exit_criterion=criterion, exit_patience=patience)).eval()
    session = ExitSession(export_onnx(model, tmp_path / 'onnx', 'test_vit_mexit'))
    assert session.manifest['task'] == 'regression' and session.manifest['exit_patience'] == patience
    x = torch.randn(20, 3, 32, 32)
    seen = set()
    for tau in taus:
        for budget in (None, .9):
            with torch.no_grad():
                ref = model.forward_dynamic(x, threshold=tau, budget=budget)
            out = session(x, threshold=tau, budget=budget)
            assert out.exit_layer.tolist() == ref.exit_layer.tolist(), (tau, budget)
            torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=0)
            torch.testing.assert_close(out.cost, ref.cost.float(), atol=1e-6, rtol=0)
            seen |= set(ref.exit_layer.tolist())
    assert len(seen) > 1
    with pytest.raises(ValueError, match='threshold must be a finite number >= 0 in target units'):
        session(x, threshold=-1.)
