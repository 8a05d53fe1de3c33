"""No silent wrong answer at inference: budgets that bound, parent configurations, offline weights, scripting."""
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import timm

from timm_exits import EXIT_HEADS, TOKEN_EXIT_HEADS, UntrainedWeightsWarning

from .conftest import spread_exit_heads

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize('head', sorted(TOKEN_EXIT_HEADS))
def test_budget_is_a_ceiling_with_and_without_threshold(head):
    model = spread_exit_heads(timm.create_model('test_vit_mexit', exit_head=head, exit_layers=(1, 2, 3))).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, 32, 32, generator=gen)
    cheapest = model.exit_costs[0]
    for _ in range(3):
        budget = cheapest + (1 - cheapest) * float(torch.rand(1, generator=gen))
        for threshold in (None, float(torch.rand(1, generator=gen)), 1.0):
            with torch.no_grad():
                out = model.forward_dynamic(x, threshold=threshold, budget=budget)
            assert (out.cost <= budget + 1e-9).all(), (head, budget, threshold, out.cost.max().item())
            costs = model.exit_costs if threshold is None else model.threshold_costs
            # the reported cost is the one of the exit taken
            assert all(c == pytest.approx(costs[model.exit_layers.index(k)]) for k, c in zip(
                out.exit_layer.tolist(), out.cost.tolist()))


def test_worst_case_threshold_cost_reports_expensive_heads():
    cheap = timm.create_model('test_vit_mexit')
    assert cheap.worst_case_threshold_cost == cheap.threshold_costs[-1] and cheap.worst_case_threshold_cost > 1.
    vit = timm.create_model('test_vit_mexit', exit_head='vit', exit_layers=(1, 2, 3)).eval()  # unsure exits
    assert vit.worst_case_threshold_cost > 1.5  # three extra encoder layers on a 4-block model
    with torch.no_grad():
        out = vit.forward_dynamic(torch.randn(4, 3, 32, 32), threshold=1.0)  # nobody leaves early
    assert torch.allclose(out.cost, torch.tensor(vit.worst_case_threshold_cost))
    with torch.no_grad():
        capped = vit.forward_dynamic(torch.randn(4, 3, 32, 32), threshold=1.0, budget=1.0)
    assert (capped.cost <= 1.0).all()


def test_budget_below_cheapest_exit_raises_at_creation():
    cheapest = timm.create_model('test_vit_mexit').exit_costs[0]
    with pytest.raises(ValueError, match=rf'budget=0.1 is below the cheapest exit .*allowed: {cheapest:.4f} <= budget'):
        timm.create_model('test_vit_mexit', budget=0.1)
    with pytest.raises(ValueError, match='budget=0.1 is below the cheapest exit'):
        timm.create_model('test_vit_mexit', budget=0.1, threshold=0.5)
    with pytest.raises(ValueError, match='budget=0.01 is below the cheapest schedule'):
        timm.create_model('test_vit_liferegress', budget=0.01)


def test_liferegress_budget_is_a_ceiling():
    model = timm.create_model('test_vit_liferegress').eval()
    cheapest = model.flops(1e-6) / model.flops(1.)
    for budget in torch.linspace(cheapest, 1., 9).tolist():
        assert model.flops_ratio(model.resolve_keep_rate(budget=budget)) <= budget + 1e-9
        assert model.flops_ratio(model.resolve_keep_rate(keep_rate=0.9, budget=budget)) <= budget + 1e-9


def test_default_threshold_and_budget_still_train_every_exit():
    """train.py path: --model-kwargs threshold=... must not stop the exits from training; eval mode applies it."""
    for kwargs in (dict(threshold=0.5), dict(budget=0.9), dict(threshold=0.5, budget=0.9)):
        model = timm.create_model('test_vit_mexit', **kwargs).train()
        x = torch.randn(4, 3, 32, 32)
        loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (kwargs, name)
        model.eval()
        with torch.no_grad():
            ref = model.forward_dynamic(x).logits  # the defaults
            assert torch.equal(model(x), ref)


@pytest.mark.parametrize('rate', [-0.1, 1.0, 1.5, float('nan'), 'high'])
def test_exit_drop_rate_checked(rate):
    with pytest.raises(ValueError, match=re.escape(f'exit_drop_rate must be a number in [0, 1), got {rate!r}')):
        timm.create_model('test_vit_mexit', exit_drop_rate=rate)


def test_map_pooling_counts_and_runs():
    model = timm.create_model('test_vit_mexit', global_pool='map').eval()
    assert model.exit_costs[-1] == 1.0
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        assert torch.allclose(model(x, budget=1.0), model(x), atol=1e-5)
    slim = timm.create_model('test_vit_liferegress', global_pool='map').eval()
    assert 0 < slim.flops_ratio(0.5) < 1


@pytest.mark.parametrize('head', sorted(TOKEN_EXIT_HEADS))
def test_dynamic_img_size_every_exit_head(head):
    kwargs = dict(exit_head=head, exit_layers=(1, 2), dynamic_img_size=True)
    if EXIT_HEADS[head].fixed_grid:
        with pytest.raises(ValueError, match=rf"exit_head \['{head}'\] mixes a fixed number of patch tokens.*dynamic"):
            timm.create_model('test_vit_mexit', **kwargs)
        return
    model = timm.create_model('test_vit_mexit', **kwargs).eval()
    x = torch.randn(3, 3, 48, 40)  # a 6 x 5 grid instead of 4 x 4
    with torch.no_grad():
        outs = model.forward_exits(x)
        out = model.forward_dynamic(x, budget=model.exit_costs_at((48, 40))[0])
        assert torch.allclose(out.logits, outs[0], atol=1e-5)
        thr = model.forward_dynamic(x, threshold=0.)  # everybody leaves at the first exit
    assert (thr.exit_layer == 1).all() and torch.allclose(thr.logits, outs[0], atol=1e-5)
    # costs are counted at the size actually used: the first exit is the same, the shares differ a little
    assert torch.allclose(thr.cost, torch.tensor(model.threshold_costs_at((48, 40))[0]))
    assert model.exit_costs_at((48, 40)) != model.exit_costs_at((32, 32)) == model.exit_costs
    model.train()  # the train-mode hook reads the exits at the input's grid too, and trains them
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2])).backward()
    assert all(p.grad is not None for p in model.exits.parameters())


@pytest.mark.parametrize('head', ['mixer', 'resmlp'])
def test_fixed_grid_heads_at_another_size(head):
    model = timm.create_model('test_vit_mexit', exit_head=head, img_size=48).eval()  # built at that size: works
    with torch.no_grad():
        assert model(torch.randn(2, 3, 48, 48), threshold=0.5).shape == (2, 10)
    with pytest.raises(ValueError, match='fixed token count'):
        model.set_input_size(img_size=64)


def test_empty_batch_returns_empty_without_warnings():
    x = torch.randn(0, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        with torch.no_grad():
            assert timm.create_model('test_vit_liferegress').eval()(x).shape == (0, 10)
            mexit = timm.create_model('test_vit_mexit').eval()
            assert mexit(x, threshold=0.5).shape == mexit(x, budget=0.9).shape == (0, 10)


def test_untrained_warning_printed_once(tmp_path, caplog):
    from safetensors.torch import save_file
    parent = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2,
                               mlp_ratio=2., num_classes=10)
    path = tmp_path / 'parent.safetensors'
    save_file(parent.state_dict(), str(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        timm.create_model('test_vit_mexit', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    untrained = [w for w in caught if issubclass(w.category, UntrainedWeightsWarning)]
    assert len(untrained) == 1 and 'UNTRAINED' in str(untrained[0].message)
    assert not [r for r in caplog.records if 'UNTRAINED' in r.getMessage()]  # no second copy through logging


@pytest.mark.parametrize('offline', [True, False])
def test_offline_pretrained_fails_at_once_with_how_to(tmp_path, monkeypatch, offline):
    """HF_HUB_OFFLINE=1, or an endpoint nobody answers: the error comes before any download retry."""
    from huggingface_hub import constants
    from timm_exits.models._base import WeightsUnavailableError
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', offline)
    monkeypatch.setattr(constants, 'ENDPOINT', 'http://127.0.0.1:9')  # the discard port: connection refused
    import timm.models._hub as timm_hub

    def no_download(*args, **kwargs):
        raise AssertionError('a download was attempted')

    monkeypatch.setattr(timm_hub, 'hf_hub_download', no_download)
    with pytest.raises(WeightsUnavailableError) as info:
        timm.create_model('deit_tiny_patch16_224_mexit', pretrained=True)
    msg = str(info.value)
    assert msg.startswith('deit_tiny_patch16_224_mexit.fb_in1k: pretrained=True needs model.safetensors of Hugging '
                          "Face Hub repo 'timm/deit_tiny_patch16_224.fb_in1k'")
    assert 'HF_HUB_OFFLINE=1' in msg and 'pretrained_cfg_overlay=dict(file=' in msg and str(tmp_path) in msg
    assert ('HF_HUB_OFFLINE is set' if offline else 'http://127.0.0.1:9 is unreachable') in msg
    with pytest.raises(WeightsUnavailableError, match='deit_tiny_liferegress.fb_in1k: pretrained=True needs'):
        timm.create_model('deit_tiny_liferegress', pretrained=True)


def test_offline_pretrained_in_a_fresh_process(tmp_path):
    """The same with the variables set before import, as users set them (huggingface_hub reads them at import)."""
    code = 'import timm, timm_exits; timm.create_model("deit_tiny_patch16_224_mexit", pretrained=True)'
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'HF_HUB_CACHE': str(tmp_path), 'HF_HUB_OFFLINE': '1'}
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=45, env=env)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('timm_exits.models._base.WeightsUnavailableError: deit_tiny_patch16_224_mexit'), last


@pytest.mark.parametrize('name,kwargs', [
    ('test_vit_mexit', dict(exit_head='linear')),
    ('test_vit_mexit', dict(exit_head=['cnn_project', 'vit'])),
    ('test_vit_mexit', dict(exit_head=['mixer', 'resmlp'])),
    ('test_vit_mexit_ls', dict(exit_head=['mlp', 'cnn_add'], threshold=0.5)),
    ('test_vit_liferegress', dict()),
    ('test_vit_liferegress', dict(budget=0.8)),
])
def test_torch_jit_script(name, kwargs):
    model = timm.create_model(name, **kwargs).eval()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        if 'threshold' in kwargs:  # the dynamic path is not scripted: it refuses instead of answering wrongly
            with pytest.raises(Exception):
                scripted(x)
        else:
            assert torch.allclose(scripted(x), model(x), atol=1e-5)


def test_benchmark_accepts_the_multi_exit_name():
    from timm_exits.benchmark import build_models
    parent, model = build_models('deit_tiny_patch16_224_mexit')
    assert type(parent).__name__ == 'VisionTransformer' and model.default_cfg['architecture'].endswith('_mexit')


@pytest.mark.parametrize('module,name', [('benchmark', 'bogus'), ('benchmark', 'test_vit_mexit'),
                                         ('benchmark_slim', 'bogus_liferegress')])
def test_benchmark_rejects_unknown_models_in_one_line(module, name, capsys):
    import importlib
    main = importlib.import_module(f'timm_exits.{module}').main
    with pytest.raises(SystemExit) as info:
        main(['--models', name])
    assert info.value.code == 2
    assert f'error: --models {name}: no ' in capsys.readouterr().err


@pytest.mark.parametrize('name', ['test_vit_mexit', 'test_vit_mexit_ls', 'test_vit_liferegress'])
def test_forward_intermediates_as_timm_checks_it(name):
    """timm's test_model_forward_intermediates (its module filter does not collect plugin models): the final output of
    forward_intermediates equals forward_features, with and without grad checkpointing."""
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        output, intermediates = model.forward_intermediates(x, output_fmt='NCHW')
        assert len(intermediates) == len(model.feature_info) and all(y.shape == (1, 32, 4, 4) for y in intermediates)
        assert torch.allclose(output, model.forward_features(x))
        model.set_grad_checkpointing()
        output3, _ = model.forward_intermediates(x, output_fmt='NCHW')
    assert torch.allclose(output, output3, rtol=1e-4, atol=1e-5)


def test_liferegress_dynamic_img_size_follows_the_input_grid():
    model = timm.create_model('test_vit_liferegress', dynamic_img_size=True).eval()
    x = torch.randn(2, 3, 48, 40)  # 30 patches instead of 16
    counts = model._plan(model.resolve_keep_rate(), 30)[0]
    with torch.no_grad():
        feats = model.forward_features(x)
        final, inter = model.forward_intermediates(x)
    assert feats.shape == (2, 1 + counts[-1], 32) and counts[0] == 30 and counts[-1] < 30
    assert torch.allclose(final, feats) and all(y.shape == (2, 32, 6, 5) for y in inter)
