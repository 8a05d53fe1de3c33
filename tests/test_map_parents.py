"""Early exit on parents whose blocks pass a feature map (ResNet, EfficientNet, ConvNeXt, Swin, ...): every such
architecture gets a ``_mexit`` twin with its pretrained tags mirrored (a sweep, nothing built), and a seeded sample of
small ones (``TIMM_EXITS_ALL_PARENTS=1``: every one) keeps the contract of the ViT families: full depth equal to the
parent, per-image exit with compaction, batch invariance, a budget as a ceiling, costs from the one cost model,
gradients to every parameter, BatchNorm statistics untouched by anything but a train-mode forward."""
import math
import os
import random
import re
import warnings

import numpy as np
import pytest
import timm
import torch

import timm_exits
from timm_exits.models._build import twin_parents
from timm_exits.models.adapters import ADAPTERS
from timm_exits.models.multi_exit_vit import MultiExitMixin

MAP_MODULES = tuple(m for a in ADAPTERS if a.state_kind == 'map' for m in a.timm_modules)
MAP_PARENTS = sorted(timm.list_models(module=list(MAP_MODULES)))
SMALL = re.compile(r'(^test_|10t|14t|18|26|_b0|_050|_075|_100|nano|pico|atto|femto|tiny|small|_s$|_xs|002|004|lcnet)')


def _sample() -> list:
    if os.environ.get('TIMM_EXITS_ALL_PARENTS'):
        return MAP_PARENTS
    rng, out = random.Random(0), []
    for adapter in (a for a in ADAPTERS if a.state_kind == 'map'):  # one small architecture per adapter
        names = sorted(n for n in timm.list_models(module=list(adapter.timm_modules)) if SMALL.search(n))
        out += rng.sample(names, min(1, len(names)))
    return sorted(set(['resnet18'] + rng.sample(sorted(set(out)), min(len(out), int(os.environ.get(
        'TIMM_EXITS_MAP_SAMPLE', 10))))))


SAMPLE = _sample()


def _quiet(name: str, **kwargs) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return timm.create_model(name, **kwargs)


def _pair(parent: str, **kwargs):
    torch.manual_seed(0)
    ref = _quiet(parent, num_classes=5).eval()
    model = _quiet(f'{parent}_mexit', num_classes=5, **kwargs).eval()
    model.load_state_dict({**model.state_dict(), **ref.state_dict()})  # strict: the parent's weights, exits kept
    return ref, model


def _size(model) -> tuple:
    return model._input_size() if getattr(model, 'fixed_input_size', False) else (64, 64)


def test_every_map_architecture_has_a_twin_with_its_tags():
    registered = set(timm.list_models('*_mexit'))
    assert MAP_PARENTS and {f'{p}_mexit' for p in MAP_PARENTS} <= registered
    assert set(MAP_PARENTS) <= set(twin_parents('mexit'))
    assert not set(MAP_PARENTS) & set(twin_parents('liferegress'))  # slimming drops patch tokens: ViT parents only
    for parent in MAP_PARENTS:
        tags = {n.split('.', 1)[1] for n in timm.list_pretrained(f'{parent}.*')}
        assert tags == {n.split('.', 1)[1] for n in timm.list_pretrained(f'{parent}_mexit.*')}, parent
    cfg, parent_cfg = (timm.models.get_pretrained_cfg(n) for n in ('resnet50_mexit.a1_in1k', 'resnet50.a1_in1k'))
    assert (cfg.hf_hub_id, cfg.input_size, cfg.mean, cfg.classifier) == (
        parent_cfg.hf_hub_id, parent_cfg.input_size, parent_cfg.mean, parent_cfg.classifier)


@pytest.mark.parametrize('parent', SAMPLE)
def test_map_twin_contract(parent):
    ref, model = _pair(parent)
    assert isinstance(model, MultiExitMixin) and isinstance(model, type(ref))
    x = torch.randn(4, model._in_chans(), *_size(model))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)  # full depth: the parent's answer
        exits = model.forward_exits(x)
        assert len(exits) == len(model.exit_layers) and all(e.shape == (4, 5) for e in exits)
        torch.testing.assert_close(exits[-1], ref(x), rtol=0, atol=0)
        # the threshold that sends about half the images out at the first exit
        first = model.exit_scores(model.exit_layers[0], exits[0]).sort().values
        tau = float(first[1:3].mean())  # between two images' scores: no image sits on the threshold
        out = model.forward_dynamic(x, threshold=tau)
        for b in range(4):  # per image: alone, the same exit and (to float tolerance) the same logits
            alone = model.forward_dynamic(x[b:b + 1], threshold=tau)
            assert alone.exit_layer.item() == out.exit_layer[b].item()
            torch.testing.assert_close(alone.logits, out.logits[b:b + 1], rtol=1e-4, atol=1e-4)
        costs = dict(zip(model.exit_layers, model.threshold_costs_at(_size(model))))
        assert all(math.isclose(c, costs[int(e)], rel_tol=1e-6) for c, e in zip(out.cost.tolist(), out.exit_layer))
        cheapest = model.exit_costs_at(_size(model))[0]
        budget = (cheapest + 1) / 2
        capped = model.forward_dynamic(x, threshold=tau, budget=budget)
        assert float(capped.cost.max()) <= budget + 1e-9
    model.train()
    model(x).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f'no gradient reached {missing}'


def test_exited_images_leave_the_running_batch():
    """Compaction: the blocks after an exit run only on the images still running."""
    _, model = _pair('resnet18')
    seen = []
    after = model.exit_layers[0]  # the first unit after the first exit
    x = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        first = model.exit_scores(after, model.forward_exits(x)[0])
        tau = float(first.sort().values[4])  # 4 of 8 images have a score >= tau
        model.threshold_costs_at((64, 64))  # counted before the hook goes in
        model._exit_blocks()[after][0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
        out = model.forward_dynamic(x, threshold=tau)
    leaving = int((out.exit_layer == after).sum())
    assert leaving == int((first >= tau).sum()) >= 4 and seen == [8 - leaving]


def test_cost_placement_follows_the_flops():
    _, model = _pair('resnet50')
    costs = model.exit_costs  # blocks to the exit plus its own head, shares of the parent's FLOPs
    assert len(model.exit_layers) <= 7 and model.exit_layers[-1] == model.depth == 16
    blocks_only = [c for c in costs[:-1]]
    for share, cost in zip((.15, .3, .45, .6, .75, .9), blocks_only):
        assert abs(cost - share) < .1, (share, cost)


def test_counting_costs_leaves_batchnorm_statistics_alone():
    _, model = _pair('resnet18')
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items() if 'running' in k}
    model._flops = {}
    _ = model.exit_costs, model.threshold_costs_at((96, 96))
    after = {k: v for k, v in model.state_dict().items() if 'running' in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and all(m.training for m in model.modules())


def test_forward_intermediates_and_features_only_as_the_parent():
    ref, model = _pair('resnet18')
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = ref.forward_intermediates(x), model.forward_intermediates(x)
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
        assert all(torch.equal(u, v) for u, v in zip(a[1], b[1]))
    feats = _quiet('resnet18_mexit', features_only=True, out_indices=(1, 3)).eval()
    plain = _quiet('resnet18', features_only=True, out_indices=(1, 3)).eval()
    feats.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert all(torch.equal(u, v) for u, v in zip(feats(x), plain(x)))


def test_features_only_of_a_parent_with_a_feature_class():
    """EfficientNet / MobileNetV3 build features_only as their own class: the twin gives that extractor (exits, like
    the head, are not part of a feature extractor), the parent's maps."""
    x = torch.randn(1, 3, 64, 64)
    for parent in ('efficientnet_b0', 'mobilenetv3_small_050'):
        feats = _quiet(f'{parent}_mexit', features_only=True, exit_layers=(2,)).eval()
        plain = _quiet(parent, features_only=True).eval()
        assert type(feats) is type(plain) and feats.feature_info.channels() == plain.feature_info.channels()
        feats.load_state_dict(plain.state_dict())
        with torch.no_grad():
            assert all(torch.equal(u, v) for u, v in zip(feats(x), plain(x)))


def test_torchscript_and_fx_of_a_map_twin():
    """timm's test_models contracts: torch.jit.script compiles every exit head (full depth answers); torchvision's fx
    feature extractor with timm's leaf functions traces the train-mode forward (exit losses attached, every parameter
    reached) and the eval one (the parent's answer)."""
    from timm.layers import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    ref, model = _pair('resnet18')
    x = torch.randn(2, 3, 64, 64)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), ref(x), rtol=1e-5, atol=1e-5)
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    fx_model = create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs)
    with torch.no_grad():
        torch.testing.assert_close(fx_model(x)[eval_nodes[-1]], ref(x), rtol=0, atol=0)
    fx_model.train()
    fx_model(x)[train_nodes[-1]].mean().backward()
    missing = [n for n, p in fx_model.named_parameters() if p.grad is None]
    assert not missing, f'no gradient reached {missing}'


def test_convert_a_built_resnet():
    torch.manual_seed(0)
    ref = _quiet('resnet18', num_classes=5).eval()
    model = _quiet('resnet18', num_classes=5).eval()
    model.load_state_dict(ref.state_dict())
    timm_exits.convert(model, 'mexit', exit_layers=(2, 5), exit_head='pool_linear')
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    assert model.exit_layers == (2, 5, 8) and model.pretrained_cfg['architecture'] == 'resnet18_mexit'


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match='exit_layers must hold block numbers in 1..8'):
        _quiet('resnet18_mexit', exit_layers=(3, 9))
    with pytest.raises(ValueError, match=r"exit_head \['linear'\] cannot read a feature map.*'pool_linear', 'sdn'"):
        _quiet('resnet18_mexit', exit_head='linear')
    with pytest.raises(ValueError, match=r"exit_head \['sdn'\] cannot read ViT tokens"):
        _quiet('test_vit_mexit', exit_head='sdn')
    with pytest.raises(ValueError, match='liferegress.*needs ViT patch tokens'):
        timm_exits.convert(_quiet('resnet18'), 'liferegress')
    _, model = _pair('resnet18')
    with pytest.raises(ValueError, match='budget=0.01 is below the cheapest exit'):
        model(torch.randn(1, 3, 64, 64), budget=.01)
    with pytest.raises(ValueError, match='exit_input_size'):
        _quiet('resnet18_mexit', exit_input_size=(0, 3))


@pytest.mark.parametrize('seed', range(6))
def test_fuzz_exits_heads_criteria_thresholds_budgets(seed):
    """Seeded: a random sampled parent, exit layers, head, criterion, threshold and budget; the answer of every image is
    its own (alone it exits at the same layer with the same logits) and no image's cost passes the budget."""
    rng = random.Random(seed)
    parent = rng.choice(SAMPLE)
    depth = len(_pair(parent)[1]._exit_blocks())
    layers = tuple(sorted(rng.sample(range(1, depth), min(depth - 1, rng.randint(1, 4)))))
    head = rng.choice(['sdn', 'pool_linear'])
    crit = rng.choice(['confidence', 'entropy', 'uncertainty'])
    _, model = _pair(parent, exit_layers=layers, exit_head=head, exit_criterion=crit)
    x = torch.randn(5, model._in_chans(), *_size(model))
    threshold = rng.uniform(0, 1)
    costs = model.threshold_costs_at(_size(model))
    budget = rng.choice([None, rng.uniform(model.exit_costs_at(_size(model))[0], 1)])
    with torch.no_grad():
        out = model.forward_dynamic(x, threshold=threshold, budget=budget)
        for b in range(5):
            alone = model.forward_dynamic(x[b:b + 1], threshold=threshold, budget=budget)
            assert alone.exit_layer.item() == out.exit_layer[b].item()
            torch.testing.assert_close(alone.logits, out.logits[b:b + 1], rtol=1e-4, atol=1e-4)
    assert budget is None or float(out.cost.max()) <= budget + 1e-9
    assert float(out.cost.max()) <= max(costs) + 1e-6  # float32 costs


def test_staged_onnx_export_of_a_cnn_twin_exits_as_eager(tmp_path):
    """The staged export of a feature-map twin (segments between exits, SDN heads with their pooling windows written
    out) run by ExitSession: the same exits, logits and costs as eager forward_dynamic."""
    pytest.importorskip('onnxruntime', reason='the deploy extra is not installed')
    pytest.importorskip('onnxscript', reason='the deploy extra is not installed')
    from timm_exits.export import export_onnx
    from timm_exits.runtime import ExitSession
    _, model = _pair('resnet10t', exit_layers=(1, 3))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        folder = export_onnx(model, tmp_path / 'onnx', data_config=dict(input_size=(3, 64, 64)))
    session = ExitSession(folder)
    x = torch.randn(6, 3, 64, 64)
    with torch.no_grad():
        scores = model.exit_scores(1, model.forward_exits(x)[0]).sort().values
        tau = float(scores[2:4].mean())  # between two images' scores: about half leave at the first exit
        eager = model.forward_dynamic(x, threshold=tau)
    out = session(x.numpy(), threshold=tau)
    assert out.exit_layer.tolist() == eager.exit_layer.tolist() and len(set(out.exit_layer.tolist())) > 1
    np.testing.assert_allclose(out.logits, eager.logits.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.cost, eager.cost.numpy(), rtol=1e-5)
