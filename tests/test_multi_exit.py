"""Contracts of the multi-exit family (issue 2): parent equality, per-image exits, budgets, timm conformance."""
import math

import pytest
import torch
import torch.nn as nn

import timm
from timm.models import VisionTransformer
from timm.models._manipulate import group_parameters

from timm_exits import EXIT_HEADS, TOKEN_EXIT_HEADS, MultiExitVisionTransformer

from .conftest import spread_exit_heads

MEXIT_MODELS = [
    'vit_tiny_patch16_224_mexit', 'vit_small_patch16_224_mexit', 'vit_base_patch16_224_mexit',
    'vit_large_patch16_224_mexit', 'deit_tiny_patch16_224_mexit', 'deit_small_patch16_224_mexit',
    'deit_base_patch16_224_mexit',
]
TINY_ARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2., num_classes=10)


def _parent_of(model: MultiExitVisionTransformer, **kwargs) -> VisionTransformer:
    parent = VisionTransformer(**kwargs).eval()
    missing, unexpected = parent.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith(('exits.', 'uncertainty.')) for k in unexpected)
    return parent


def test_registered():
    names = set(timm.list_models('*_mexit*'))
    assert set(MEXIT_MODELS) <= names
    assert {'test_vit_mexit', 'test_vit_mexit_ls'} <= names
    assert 'vit_base_patch16_224_mexit.augreg_in21k' in timm.list_pretrained('vit_base_patch16_224_mexit*')
    cfg = timm.models.get_pretrained_cfg('vit_base_patch16_224_mexit.augreg_in21k')
    assert cfg.hf_hub_id == 'timm/vit_base_patch16_224.augreg_in21k' and cfg.num_classes == 21843


@pytest.mark.parametrize('name', ['deit_tiny_patch16_224_mexit', 'vit_tiny_patch16_224_mexit'])
def test_full_depth_equals_timm_parent(name):
    model = timm.create_model(name).eval()
    parent = timm.create_model(name.replace('_mexit', '')).eval()
    parent.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(('exits.', 'uncert'))})
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = parent(x)
        assert (model(x) - ref).abs().max() <= 1e-4
        assert (model.forward_dynamic(x).logits - ref).abs().max() <= 1e-4
        assert (model.forward_head(model.forward_features(x)) - ref).abs().max() <= 1e-4
        assert (model.forward_exits(x)[-1] - ref).abs().max() <= 1e-4


@pytest.mark.parametrize('name', ['test_vit_mexit', 'test_vit_mexit_ls'])
def test_train_mode_output_equals_parent(name):
    model = timm.create_model(name)
    extra = dict(init_values=1e-2, reg_tokens=1) if name.endswith('_ls') else {}
    parent = _parent_of(model, **TINY_ARGS, **extra)
    x = torch.randn(3, 3, 32, 32)
    model.eval()
    assert torch.allclose(model(x), parent(x), atol=1e-5)
    model.train()  # no dropout in this variant: train-mode output (with the exits attached) is the same
    assert torch.allclose(model(x), parent(x), atol=1e-5)


@pytest.mark.parametrize('criterion', ['confidence', 'entropy', 'uncertainty'])
def test_batch_invariance(criterion):
    model = spread_exit_heads(timm.create_model('test_vit_mexit', exit_criterion=criterion, exit_layers=(1, 2, 3)))
    model.eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(24, 3, 32, 32, generator=gen)
    first_scores = model.exit_scores(1, model.forward_exits(x)[0])
    quantiles = 0.2 + 0.6 * torch.rand(4, generator=gen)  # random thresholds inside the scores' range
    for threshold in torch.quantile(first_scores, quantiles).tolist():
        full = model.forward_dynamic(x, threshold=threshold)
        assert len(set(full.exit_layer.tolist())) > 1, 'thresholds should split this batch'
        alone = [model.forward_dynamic(x[i:i + 1], threshold=threshold) for i in range(len(x))]
        assert torch.equal(full.exit_layer, torch.cat([a.exit_layer for a in alone]))
        assert torch.allclose(full.logits, torch.cat([a.logits for a in alone]), atol=1e-5)
        assert torch.allclose(full.cost, torch.cat([a.cost for a in alone]))
        perm = torch.randperm(len(x), generator=gen)[:11]
        sub = model.forward_dynamic(x[perm], threshold=threshold)
        assert torch.equal(sub.exit_layer, full.exit_layer[perm])
        assert torch.allclose(sub.logits, full.logits[perm], atol=1e-5)


def test_threshold_exit_matches_first_passing_exit(tiny):
    x = torch.randn(32, 3, 32, 32)
    out = tiny.forward_dynamic(x, threshold=0.7)
    all_logits = tiny.forward_exits(x)
    scores = torch.stack([tiny.exit_scores(layer, z) for layer, z in zip(tiny.exit_layers, all_logits)], 1)
    passed = scores >= 0.7
    passed[:, -1] = True  # the final exit always answers
    first = passed.float().argmax(1)
    expected_layer = torch.tensor(tiny.exit_layers)[first]
    assert torch.equal(out.exit_layer, expected_layer)
    expected_logits = torch.stack([all_logits[j][i] for i, j in enumerate(first.tolist())])
    assert torch.allclose(out.logits, expected_logits, atol=1e-5)
    assert torch.allclose(tiny(x, threshold=0.7), out.logits)
    # the cost of a threshold exit counts every head evaluated on the way (the first exit's is its own cost)
    path = torch.tensor(tiny.threshold_costs)
    assert torch.allclose(out.cost, path[first].float())
    assert path[0].item() == pytest.approx(tiny.exit_costs[0]) and (path[1:] > torch.tensor(tiny.exit_costs[1:])).all()


def test_exited_images_leave_the_batch(tiny):
    tiny.exit_costs  # counted once, on one image, before the hooks go in
    rows = []
    hooks = [blk.register_forward_hook(lambda m, i, o: rows.append(o.shape[0])) for blk in tiny.blocks]
    x = torch.randn(32, 3, 32, 32)
    out = tiny.forward_dynamic(x, threshold=0.7)
    for h in hooks:
        h.remove()
    expected = [32 - int((out.exit_layer < b).sum()) for b in range(1, tiny.depth + 1)]
    assert rows == [r for r in expected if r > 0]
    assert rows[-1] < 32


def test_budget_semantics(tiny):
    x = torch.randn(16, 3, 32, 32)
    costs = tiny.exit_costs
    assert len(costs) == len(tiny.exit_layers) and costs[-1] == 1.0
    assert all(a < b for a, b in zip(costs, costs[1:]))
    all_logits = tiny.forward_exits(x)
    for k, (layer, cost) in enumerate(zip(tiny.exit_layers, costs)):
        for budget in (cost, (cost + (costs[k + 1] if k + 1 < len(costs) else 1.)) / 2):
            out = tiny.forward_dynamic(x, budget=budget)
            assert (out.exit_layer == layer).all()
            assert torch.allclose(out.logits, all_logits[k], atol=1e-5)
            assert (out.cost <= budget + 1e-9).all()
    # threshold and budget combine: the budget picks the deepest exit whose threshold path (heads passed included)
    # fits, nothing passes it, and unconfident images answer from it
    assert tiny._stop_layer(costs[1], threshold_path=True) == tiny.exit_layers[0]  # heads on the way cost too
    out = tiny.forward_dynamic(x, threshold=0.9, budget=tiny.threshold_costs[1])
    assert (out.exit_layer <= tiny.exit_layers[1]).all()
    confident_first = tiny.exit_scores(tiny.exit_layers[0], all_logits[0]) >= 0.9
    assert torch.equal(out.exit_layer == tiny.exit_layers[0], confident_first)
    assert torch.allclose(out.logits[~confident_first], all_logits[1][~confident_first], atol=1e-5)


def test_exit_costs_counted_with_flop_counter():
    model = timm.create_model('deit_small_patch16_224_mexit')
    costs = model.exit_costs
    # 12 equal blocks and a cheap patch embedding: exit after block k costs about k/12 of the full model
    for layer, cost in zip(model.exit_layers, costs):
        assert abs(cost - layer / 12) < 0.01
    vit_head = timm.create_model('deit_small_patch16_224_mexit', exit_head='vit')
    assert vit_head.exit_costs[0] > costs[0] + 0.05  # a ViT-EE branch costs about one more block


def test_default_threshold_and_budget_kwargs(tiny):
    x = torch.randn(8, 3, 32, 32)
    model = timm.create_model('test_vit_mexit', budget=tiny.exit_costs[0])
    model.load_state_dict(tiny.state_dict())
    model.eval()
    assert torch.allclose(model(x), tiny.forward_exits(x)[0], atol=1e-5)


@pytest.mark.parametrize('head', sorted(TOKEN_EXIT_HEADS))
def test_exit_head_shapes_and_gradients(head):
    model = timm.create_model('test_vit_mexit_ls', exit_head=head, exit_layers=(1, 3))
    model.train()
    x = torch.randn(2, 3, 32, 32)
    outs = model.forward_exits(x)
    assert [o.shape for o in outs] == [torch.Size([2, 10])] * 3
    model(x).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f'no gradient for {name}'
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith('exits.'))


def test_mixed_exit_heads_per_exit():
    model = timm.create_model('test_vit_mexit', exit_layers=(1, 2, 3), exit_head=['cnn_add', 'mixer', 'linear'])
    assert model.exit_head_types == ('cnn_add', 'mixer', 'linear')
    assert type(model.exits['1']).__name__ == 'CnnAddExit'


def test_criteria_against_hand_computed_values():
    model = timm.create_model('test_vit_mexit', num_classes=3)
    logits = torch.tensor([[2., 0., 0.], [0., 0., 0.]])
    p0 = math.exp(2) / (math.exp(2) + 2)
    model.exit_criterion = 'confidence'
    assert torch.allclose(model.exit_scores(2, logits), torch.tensor([p0, 1 / 3]))
    model.exit_criterion = 'entropy'
    q = 1 / (math.exp(2) + 2)
    h0 = -(p0 * math.log(p0) + 2 * q * math.log(q)) / math.log(3)
    assert torch.allclose(model.exit_scores(2, logits), torch.tensor([h0, 1.]))
    assert torch.equal(model._exits_now(2, logits, 0.9), torch.tensor([True, False]))
    model.exit_criterion = 'uncertainty'
    with torch.no_grad():
        model.uncertainty['2'].weight.copy_(torch.tensor([[1., -1., 0.5]]))
        model.uncertainty['2'].bias.fill_(-1.)
    expected = torch.sigmoid(torch.tensor([2. - 1., -1.]))
    assert torch.allclose(model.exit_scores(2, logits), expected)
    assert torch.equal(model._exits_now(2, logits, 0.5), torch.tensor([False, True]))


@pytest.mark.parametrize('kwargs,match', [
    (dict(threshold=-0.1), 'threshold'), (dict(threshold=1.5), 'threshold'),
    (dict(threshold=float('nan')), 'threshold'),
    (dict(threshold='high'), 'threshold'), (dict(budget=0.), 'budget'), (dict(budget=-1), 'budget'),
    (dict(budget=1.01), 'budget'), (dict(budget=float('nan')), 'budget'), (dict(budget=0.2), r'budget=0.2 .*0\.5'),
])
def test_bad_forward_arguments(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(torch.randn(1, 3, 32, 32), **kwargs)


@pytest.mark.parametrize('kwargs,match', [
    (dict(exit_head='resnet'), 'exit_head.*allowed'), (dict(exit_criterion='margin'), 'exit_criterion.*allowed'),
    (dict(exit_layers=(0, 2)), r'exit_layers.*1\.\.4'), (dict(exit_layers=(2, 5)), r'exit_layers.*1\.\.4'),
    (dict(exit_layers=(2, 2)), 'exit_layers.*repeat'), (dict(exit_layers=(1, 2), exit_head=['mlp']), 'exit_head'),
    (dict(threshold=2.), 'threshold'), (dict(budget=0), 'budget'), (dict(exit_layers=3), 'exit_layers'),
])
def test_bad_creation_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('test_vit_mexit', **kwargs)


def test_unknown_kwarg_rejected():
    with pytest.raises(TypeError):
        timm.create_model('test_vit_mexit', exit_layer=(1,))


def test_checkpoint_layout_mismatch(tmp_path):
    from safetensors.torch import save_file
    other = timm.create_model('test_vit_mexit', exit_layers=(1, 2))
    model = timm.create_model('test_vit_mexit')
    with pytest.raises(ValueError, match='exit_layers'):
        model.load_state_dict(other.state_dict())
    path = tmp_path / 'other.safetensors'
    save_file(other.state_dict(), str(path))
    with pytest.raises(ValueError, match='exit_layers'):
        timm.create_model('test_vit_mexit', checkpoint_path=str(path))
    same = timm.create_model('test_vit_mexit', exit_layers=(1, 2), checkpoint_path=str(path))
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), other.state_dict().values()))
    heads = timm.create_model('test_vit_mexit', exit_layers=(1, 2), exit_head='mlp')
    with pytest.raises(ValueError, match='exit_head'):
        heads.load_state_dict(other.state_dict())


def test_pretrained_loads_parent_checkpoint_strictly(tmp_path):
    from safetensors.torch import save_file
    from timm_exits import UntrainedWeightsWarning
    parent = VisionTransformer(**TINY_ARGS).eval()
    path = tmp_path / 'parent.safetensors'
    save_file(parent.state_dict(), str(path))
    with pytest.warns(UntrainedWeightsWarning, match='UNTRAINED'):
        model = timm.create_model('test_vit_mexit', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.eval()(x), parent(x), atol=1e-5)
    with pytest.warns(UntrainedWeightsWarning):  # another class count: every head is dropped, backbone kept
        model = timm.create_model(
            'test_vit_mexit', pretrained=True, num_classes=7, pretrained_cfg_overlay=dict(file=str(path)))
    assert model(x).shape == (2, 7) and torch.equal(model.blocks[0].attn.qkv.weight, parent.blocks[0].attn.qkv.weight)
    broken = {k: v for k, v in parent.state_dict().items() if k != 'blocks.1.mlp.fc1.weight'}
    save_file(broken, str(path))
    with pytest.raises(RuntimeError, match='blocks.1.mlp.fc1.weight'), pytest.warns(UntrainedWeightsWarning):
        timm.create_model('test_vit_mexit', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_reset_classifier_resets_every_head(tiny):
    tiny.reset_classifier(5)
    x = torch.randn(2, 3, 32, 32)
    assert [o.shape[-1] for o in tiny.forward_exits(x)] == [5, 5, 5]
    assert all(u.in_features == 5 for u in tiny.uncertainty.values())
    assert tiny.forward_dynamic(x, threshold=0.5).logits.shape == (2, 5)
    assert tiny.exit_costs[-1] == 1.0
    tiny.reset_classifier(0)
    assert tiny(x).shape == (2, 32)
    assert tiny.forward_head(tiny.forward_features(x), pre_logits=True).shape == (2, 32)
    with pytest.raises(ValueError, match='num_classes'):
        tiny.forward_dynamic(x, threshold=0.5)


def test_timm_cfg_fields_name_real_modules():
    model = timm.create_model('test_vit_mexit_ls', exit_layers=(1, 3))
    modules = dict(model.named_modules())
    cfg = model.pretrained_cfg
    classifiers = cfg['classifier']
    assert set(classifiers) == {'head', 'exits.1.head', 'exits.3.head', 'uncertainty.1', 'uncertainty.3',
                                'uncertainty.4'}
    assert all(isinstance(modules[name], nn.Linear) for name in classifiers)
    assert cfg['first_conv'] in modules
    params = dict(model.named_parameters())
    assert {'pos_embed', 'cls_token', 'reg_token'} <= set(model.no_weight_decay()) & set(params)
    groups = group_parameters(model, model.group_matcher())
    assert sorted(n for names in groups.values() for n in names) == sorted(params)


def test_forward_intermediates_and_features_only():
    model = timm.create_model('test_vit_mexit').eval()
    x = torch.randn(2, 3, 32, 32)
    final, inter = model.forward_intermediates(x)
    assert len(inter) == 4 and inter[0].shape == (2, 32, 4, 4)
    assert torch.allclose(final, model.forward_features(x))
    feats = timm.create_model('test_vit_mexit', features_only=True, out_indices=(1, 3))
    assert [f.shape for f in feats(x)] == [torch.Size([2, 32, 4, 4])] * 2


def test_device_and_dtype_kwargs():
    model = timm.create_model('test_vit_mexit', dtype=torch.float64, exit_head='cnn_project')
    assert all(p.dtype == torch.float64 for p in model.parameters())
    out = model.eval().forward_dynamic(torch.randn(2, 3, 32, 32, dtype=torch.float64), threshold=0.5)
    assert out.logits.dtype == torch.float64
    meta = timm.create_model('test_vit_mexit', device='meta')
    assert all(p.device.type == 'meta' for p in meta.parameters())


def test_torch_compile_full_depth(tiny):
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(tiny)
    with torch.no_grad():
        assert torch.allclose(compiled(x), tiny(x), atol=1e-5)


def test_torch_fx_traces_the_full_depth_path():
    """As timm's test_models.py does it: torchvision's fx feature extractor with timm's leaf functions."""
    from timm.layers import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    model = timm.create_model('test_vit_mexit').eval()
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    fx_model = create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(fx_model(x)[eval_nodes[-1]], model(x), atol=1e-5)
    fx_model.train()
    fx_model(x)[train_nodes[-1]].mean().backward()
    assert all(p.grad is not None for p in fx_model.parameters())
