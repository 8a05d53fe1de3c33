"""Contracts of the LifeRegress family (003_*.txt): eqs. (2)-(3), (6)-(7), (9)-(10), slimming, budgets, timm API."""
import math

import pytest
import torch
import torch.nn as nn

import timm
from timm.models import VisionTransformer
from timm.models._manipulate import group_parameters

from timm_exits import LifeRegression, LifeRegressVisionTransformer
from timm_exits.models._base import count_flops
from timm_exits.models.life_regress_vit import life_stats, renormalize_lives, soft_weights, token_counts

TINY_ARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2., num_classes=10)
LR_MODELS = [
    'deit_tiny_liferegress', 'deit_small_liferegress', 'deit_base_liferegress', 'vit_tiny_liferegress',
    'vit_small_liferegress', 'vit_base_liferegress',
]


@pytest.fixture
def tiny() -> LifeRegressVisionTransformer:
    """The tiny variant (16 patches, 4 blocks, lives after block 1, prune after 2 and 3) in eval mode."""
    return timm.create_model('test_vit_liferegress').eval()


def _parent_of(model: LifeRegressVisionTransformer, **kwargs) -> VisionTransformer:
    parent = VisionTransformer(**kwargs).eval()
    missing, unexpected = parent.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith('life.') for k in unexpected)
    return parent


def test_registered():
    assert set(LR_MODELS) | {'test_vit_liferegress'} <= set(timm.list_models('*liferegress*'))
    cfg = timm.models.get_pretrained_cfg('deit_small_liferegress')
    assert cfg.hf_hub_id == 'timm/deit_small_patch16_224.fb_in1k' and cfg.tag == 'fb_in1k'
    assert 'vit_base_liferegress.augreg_in21k' in timm.list_pretrained('vit_base_liferegress*')
    model = timm.create_model('deit_small_liferegress')
    assert (model.life_layer, model.prune_layers, model.keep_rate, model.U) == (3, (4, 7, 10), 0.7, 1.5)


# --- equations ---------------------------------------------------------------------------------------------------

def test_schedule_and_life_stats_by_hand(tiny):
    # 16 patches, 4 blocks, prune after blocks 2 and 3, rho = 0.7: ceil(11.2) = 12, ceil(8.4) = 9
    assert tiny.token_schedule() == (16, 16, 12, 9)
    # lives: 0 patches live 1 block, 16 - 12 = 4 live 2, 12 - 9 = 3 live 3, 9 live 4
    mu, sigma = life_stats((16, 16, 12, 9))
    assert mu == pytest.approx((2 * 4 + 3 * 3 + 4 * 9) / 16) == pytest.approx(3.3125)
    assert sigma == pytest.approx(math.sqrt((4 * 1.3125 ** 2 + 3 * 0.3125 ** 2 + 9 * 0.6875 ** 2) / 16))
    assert sigma == pytest.approx(math.sqrt(0.71484375))
    # eq. (10) as printed (no square) is identically zero: the reason for the correction
    assert 4 * (2 - mu) + 3 * (3 - mu) + 9 * (4 - mu) == pytest.approx(0.)
    assert life_stats((16,) * 4) == (4., 0.)  # keep_rate 1: every patch lives T
    # DeiT-S, rho 0.7, patches leave after blocks 4, 7, 10: ceil(137.2), ceil(96.6), ceil(67.9)
    assert token_counts(196, 12, (4, 7, 10), 0.7) == (196,) * 4 + (138,) * 3 + (97,) * 3 + (68,) * 2
    assert token_counts(196, 12, (4, 7, 10), 138 / 196)[4] == 138  # rho = k / n exactly gives k
    assert token_counts(16, 4, (2, 3), 1e-6) == (16, 16, 1, 1)  # never below one patch


def test_renormalization_eq3_by_hand():
    mu, sigma = 3.3125, math.sqrt(0.71484375)
    s = torch.tensor([[1., 2., 3., 4.]])  # mean 2.5, population std sqrt(1.25)
    z = [-1.5 / math.sqrt(1.25), -0.5 / math.sqrt(1.25), 0.5 / math.sqrt(1.25), 1.5 / math.sqrt(1.25)]
    tau = renormalize_lives(s, mu, sigma)
    assert torch.allclose(tau, torch.tensor([[mu + sigma * v for v in z]]))
    assert tau.mean().item() == pytest.approx(mu) and tau.std(correction=0).item() == pytest.approx(sigma)
    assert torch.equal(renormalize_lives(torch.full((2, 5), 7.), mu, sigma), torch.full((2, 5), mu))  # std 0


def test_life_scores_eq2_by_hand():
    life = LifeRegression(2)
    with torch.no_grad():
        life.proj.weight.copy_(torch.tensor([[2., 0.], [0., 1.]]))  # W = proj.weight^T = diag(2, 1)
    # LayerNorm of a 2-vector is (+-1, -+1) (or 0 for equal entries): cls (1, -1); patches (1, -1), (-1, 1), (0, 0)
    x = torch.tensor([[[1., 0.], [3., 1.], [0., 2.], [5., 5.]]])
    s = life.scores(x, num_prefix_tokens=1)
    assert torch.allclose(s, torch.tensor([[2 + 1., -2 - 1., 0.]]), atol=1e-4)  # x_cls^T W x_i
    tau = life(x, 1, 3., 0.5)
    assert torch.allclose(tau, torch.tensor([[3 + 0.5 * math.sqrt(1.5), 3 - 0.5 * math.sqrt(1.5), 3.]]), atol=1e-4)


def test_soft_weights_tend_to_the_step_of_eq4():
    tau = torch.tensor([5.])
    for U in (0.5, 1.5, 10., 1e3):
        assert soft_weights(tau, 5., U).item() == pytest.approx(0.5)
    before = [soft_weights(tau, 4.9, U).item() for U in (1., 10., 100., 1e3)]
    after = [soft_weights(tau, 5.1, U).item() for U in (1., 10., 100., 1e3)]
    assert all(a < b for a, b in zip(before, before[1:])) and before[-1] == pytest.approx(1., abs=1e-6)
    assert all(a > b for a, b in zip(after, after[1:])) and after[-1] == pytest.approx(0., abs=1e-6)
    assert soft_weights(tau, 3., 1.5).item() > 0.95 and soft_weights(tau, 7., 1.5).item() < 0.05  # 1 before, 0 after


def test_attention_mask_is_log_beta(tiny):
    lives = torch.tensor([[1.5, 2.5, 3.5, 4.5] * 4])
    mask = tiny.life_attn_mask(lives, 3, torch.float32)
    assert mask.shape == (1, 1, 1, 17)
    beta = torch.cat([soft_weights(torch.tensor([[4.]]), 3, 1.5), soft_weights(lives, 3, 1.5)], 1)  # [CLS] lives T
    assert torch.allclose(mask.exp().flatten(), beta.flatten())


def _block_eq6(blk, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """A timm Block with eq. (6) written out: attn_ij = beta_j exp(h_ij) / sum_k beta_k exp(h_ik)."""
    attn = blk.attn
    B, L, D = x.shape
    qkv = attn.qkv(blk.norm1(x)).reshape(B, L, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    w = (q @ k.transpose(-2, -1) * attn.scale).exp() * beta[:, None, None, :]
    out = attn.proj(((w / w.sum(-1, keepdim=True)) @ v).transpose(1, 2).reshape(B, L, D))
    x = x + blk.ls1(out)
    return x + blk.ls2(blk.mlp(blk.norm2(x)))


@pytest.mark.parametrize('extra', [{}, dict(init_values=0.1, reg_tokens=1)])
def test_train_mode_applies_eq6_to_every_block_after_life_layer(extra):
    model = timm.create_model('test_vit_liferegress', **extra).train()
    x = torch.randn(3, 3, 32, 32)
    lives = model.predict_lives(x)
    with torch.no_grad():
        h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        for t, blk in enumerate(model.blocks, 1):
            if t <= model.life_layer:
                h = blk(h)
            else:
                prefix = torch.full((3, model.num_prefix_tokens), float(model.depth))
                h = _block_eq6(blk, h, soft_weights(torch.cat([prefix, lives], 1), t, model.U))
        expected = model.forward_head(model.norm(h))
        assert torch.allclose(model(x), expected, atol=1e-5)
        assert not torch.allclose(model(x), _parent_of(model, **TINY_ARGS, **extra)(x), atol=1e-3)
        # keep_rate 1: every life is T, beta is uniform over keys and cancels in the softmax: the parent's answer
        assert torch.allclose(model(x, keep_rate=1.), _parent_of(model, **TINY_ARGS, **extra)(x), atol=1e-5)


def test_train_mode_gradients_reach_every_parameter_and_the_life_predictor():
    model = timm.create_model('test_vit_liferegress', init_values=0.1, reg_tokens=1).train()
    x = torch.randn(2, 3, 32, 32)
    hooks, rows = [blk.register_forward_hook(lambda m, i, o: rows.append(o.shape[1])) for blk in model.blocks], []
    model(x).mean().backward()
    assert rows == [18] * 4  # nothing is dropped in training
    for name, p in model.named_parameters():
        assert p.grad is not None, f'no gradient for {name}'
    for name, p in model.life.named_parameters():
        assert p.grad.abs().sum() > 0, f'zero gradient for life.{name}'
    for h in hooks:
        h.remove()


def test_grad_checkpointing_matches():
    model = timm.create_model('test_vit_liferegress').train()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    model.set_grad_checkpointing(True)
    out = model(x)
    assert torch.allclose(out, ref, atol=1e-6)
    out.mean().backward()
    assert model.life.proj.weight.grad.abs().sum() > 0


# --- eval: slimming --------------------------------------------------------------------------------------------

@pytest.mark.parametrize('extra', [{}, dict(init_values=0.1, reg_tokens=1)])
def test_keep_rate_one_equals_parent(extra):
    model = timm.create_model('test_vit_liferegress', **extra).eval()
    parent = _parent_of(model, **TINY_ARGS, **extra)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (model(x, keep_rate=1.) - parent(x)).abs().max() <= 1e-5
        assert (model(x, budget=1.) - parent(x)).abs().max() <= 1e-5
        assert not torch.allclose(model(x), parent(x), atol=1e-3)  # the default 0.7 slims


def test_keep_rate_one_equals_timm_parent_real_size():
    model = timm.create_model('deit_tiny_liferegress', keep_rate=1.).eval()
    parent = timm.create_model('deit_tiny_patch16_224').eval()
    parent.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith('life.')})
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (model(x) - parent(x)).abs().max() <= 1e-4


def test_forward_is_forward_head_of_forward_features(tiny):
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(tiny(x), tiny.forward_head(tiny.forward_features(x)))
    assert tiny.forward_features(x).shape == (2, 1 + 9, 32)
    assert tiny.forward_features(x, keep_rate=1.).shape == (2, 17, 32)


def _record_tokens(model):
    ins, outs = {}, {}
    hooks = []
    for i, blk in enumerate(model.blocks):
        hooks.append(blk.register_forward_pre_hook(lambda m, a, i=i: ins.__setitem__(i, a[0].detach().clone())))
        hooks.append(blk.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o.detach().clone())))
    return ins, outs, hooks


@pytest.mark.parametrize('rate,expected', [(0.7, [17, 17, 13, 10]), (0.5, [17, 17, 9, 5]), (0.05, [17, 17, 2, 2]),
                                           (1., [17] * 4)])
def test_kept_token_count_per_block(tiny, rate, expected):
    ins, _, hooks = _record_tokens(tiny)
    tiny(torch.randn(2, 3, 32, 32), keep_rate=rate)
    assert [ins[i].shape[1] for i in range(4)] == expected
    assert [n + 1 for n in tiny.token_schedule(rate)] == expected


def test_kept_tokens_are_the_longest_lived_in_original_order(tiny):
    x = torch.randn(4, 3, 32, 32)
    lives = tiny.predict_lives(x).tolist()
    ins, outs, hooks = _record_tokens(tiny)
    tiny(x)
    counts = tiny.token_schedule()
    for b in range(len(x)):
        order = sorted(range(16), key=lambda i: -lives[b][i])
        kept_before = list(range(16))
        for p in tiny.prune_layers:  # patches leave after block p: block p + 1 (index p) sees the rest
            kept = sorted(order[:counts[p]])
            pos = torch.tensor([1 + kept_before.index(i) for i in kept])
            expected = torch.cat([outs[p - 1][b, :1], outs[p - 1][b, pos]])
            assert torch.equal(ins[p][b], expected)
            kept_before = kept


def test_batch_invariance(tiny):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, 32, 32, generator=gen)
    for rate in (0.7, 0.4):
        full = tiny(x, keep_rate=rate)
        alone = torch.cat([tiny(x[i:i + 1], keep_rate=rate) for i in range(len(x))])
        assert torch.allclose(full, alone, atol=1e-5)
        perm = torch.randperm(len(x), generator=gen)[:7]
        assert torch.allclose(tiny(x[perm], keep_rate=rate), full[perm], atol=1e-5)


# --- compute and budgets ---------------------------------------------------------------------------------------

def test_flops_counted_with_the_flop_counter(tiny):
    parent = _parent_of(tiny, **TINY_ARGS)
    assert tiny.flops(1.) == count_flops(parent, torch.zeros(1, 3, 32, 32))[0]
    assert tiny.flops_ratio(1.) == 1.
    with torch.no_grad():
        counted, _ = count_flops(tiny, torch.zeros(1, 3, 32, 32))
    assert tiny.flops() == counted  # the default 0.7, life module included
    ratios = [tiny.flops_ratio(r) for r in (1., .9, .7, .5, .1)]
    assert all(a > b for a, b in zip(ratios, ratios[1:]))


def test_deit_small_flops_ratios_match_table_iii():
    model = timm.create_model('deit_small_liferegress')
    for rate, expected in ((1., 1.), (.9, .882), (.8, .784), (.7, .693)):
        assert abs(model.flops_ratio(rate) - expected) < 0.01
    assert model.flops_ratio() == model.flops_ratio(0.7)
    assert abs(model.flops(1.) / 1e9 - 8.48) < 0.01  # 4.24 GMACs: timm's DeiT-S


@pytest.mark.parametrize('budget', [0.63, 0.7, 0.75, 0.8, 0.9, 0.97, 1.])
def test_budget_picks_the_largest_fitting_keep_rate(tiny, budget):
    rate = tiny.keep_rate_for_budget(budget)
    assert 0 < rate <= 1 and tiny.flops_ratio(rate) <= budget + 1e-9
    if rate < 1:
        assert tiny.flops_ratio(rate + 1e-6) > budget
    grid = [k / 10000 for k in range(1, 10001)]  # steps are >= 1/16^2 wide: the grid finds every one
    best = max(r for r in grid if tiny.flops_ratio(r) <= budget + 1e-9)
    assert tiny.token_schedule(best) == tiny.token_schedule(rate) and best <= rate + 1e-12
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(tiny(x, budget=budget), tiny(x, keep_rate=rate))
    assert torch.equal(tiny(x, keep_rate=0.3, budget=budget), tiny(x, keep_rate=min(0.3, rate)))  # the budget caps
    assert torch.equal(tiny(x, keep_rate=1., budget=budget), tiny(x, keep_rate=rate))


def test_default_budget_and_keep_rate():
    x = torch.randn(2, 3, 32, 32)
    model = timm.create_model('test_vit_liferegress', budget=0.8).eval()
    rate = model.keep_rate_for_budget(0.8)
    assert model.keep_rate is None and model.resolve_keep_rate() == rate
    assert torch.equal(model(x), model(x, keep_rate=rate)) and model.flops_ratio() <= 0.8
    exact = timm.create_model('test_vit_liferegress', budget=model.flops_ratio(0.7))  # a budget on a step's edge
    assert exact.token_schedule() == (16, 16, 12, 9) and exact.keep_rate_for_budget(exact.budget) == 12 / 16
    capped = timm.create_model('test_vit_liferegress', budget=0.8, keep_rate=0.3)
    assert capped.resolve_keep_rate() == 0.3 and capped.resolve_keep_rate(keep_rate=0.9) == 0.9


# --- bad input -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kwargs,match', [
    (dict(keep_rate=0.), r'keep_rate.*\(0, 1\]'), (dict(keep_rate=-0.1), 'keep_rate'),
    (dict(keep_rate=1.5), 'keep_rate'), (dict(keep_rate=float('nan')), 'keep_rate'),
    (dict(keep_rate='high'), 'keep_rate'),
    (dict(budget=0.), r'budget.*\(0, 1\]'), (dict(budget=-1), 'budget'), (dict(budget=1.01), 'budget'),
    (dict(budget=float('nan')), 'budget'), (dict(budget=0.2), r'budget=0.2 .*cheapest.*0\.6275 <= budget'),
])
def test_bad_forward_arguments(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(torch.randn(1, 3, 32, 32), **kwargs)
    with pytest.raises(ValueError, match=match):
        tiny.flops(**kwargs) if 'keep_rate' in kwargs else tiny.keep_rate_for_budget(kwargs['budget'])


@pytest.mark.parametrize('kwargs,match', [
    (dict(prune_layers=(3, 2)), r'prune_layers.*increasing.*2\.\.3'), (dict(prune_layers=(2, 2)), 'prune_layers'),
    (dict(life_layer=2, prune_layers=(2, 3)), r'prune_layers.*3\.\.3.*life_layer=2'),
    (dict(prune_layers=(2, 5)), r'prune_layers.*2\.\.3'), (dict(prune_layers=(2, 4)), r'prune_layers.*2\.\.3'),
    (dict(prune_layers=()), 'prune_layers'), (dict(prune_layers=2), 'prune_layers'),
    (dict(life_layer=0), r'life_layer.*1\.\.3'), (dict(life_layer=4), r'life_layer.*1\.\.3'),
    (dict(U=0.), 'U'), (dict(U=-1.), 'U'), (dict(U=float('nan')), 'U'), (dict(U=float('inf')), 'U'),
    (dict(keep_rate=0.), 'keep_rate'), (dict(keep_rate=1.2), 'keep_rate'), (dict(budget=0.), 'budget'),
    (dict(budget=0.1), r'budget=0.1 .*cheapest'), (dict(depth=2), r'at least 3 blocks.*depth=2'),
])
def test_bad_creation_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('test_vit_liferegress', **kwargs)


def test_unknown_kwarg_rejected():
    with pytest.raises(TypeError):
        timm.create_model('test_vit_liferegress', keeprate=0.5)


def test_checkpoint_life_predictor_mismatch(tmp_path):
    from safetensors.torch import save_file
    other = timm.create_model('test_vit_liferegress', embed_dim=48)
    model = timm.create_model('test_vit_liferegress')
    with pytest.raises(ValueError, match='life predictor.*life_layer'):
        model.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match='life predictor'):  # a plain ViT checkpoint, strict: missing life predictor
        model.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith('life.')})
    path = tmp_path / 'other.safetensors'
    save_file(other.state_dict(), str(path))
    with pytest.raises(ValueError, match='life predictor'):
        timm.create_model('test_vit_liferegress', checkpoint_path=str(path))
    same = timm.create_model('test_vit_liferegress', embed_dim=48, checkpoint_path=str(path))
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), other.state_dict().values()))


def test_pretrained_loads_parent_checkpoint_strictly(tmp_path):
    from safetensors.torch import save_file
    from timm_exits import UntrainedWeightsWarning
    parent = VisionTransformer(**TINY_ARGS).eval()
    path = tmp_path / 'parent.safetensors'
    save_file(parent.state_dict(), str(path))
    with pytest.warns(UntrainedWeightsWarning, match='life predictor.*UNTRAINED'):
        model = timm.create_model('test_vit_liferegress', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.eval()(x, keep_rate=1.), parent(x), atol=1e-5)
    with pytest.warns(UntrainedWeightsWarning):  # another class count: the head is dropped, backbone kept
        model = timm.create_model(
            'test_vit_liferegress', pretrained=True, num_classes=7, pretrained_cfg_overlay=dict(file=str(path)))
    assert model(x).shape == (2, 7) and torch.equal(model.blocks[0].attn.qkv.weight, parent.blocks[0].attn.qkv.weight)
    broken = {k: v for k, v in parent.state_dict().items() if k != 'blocks.1.mlp.fc1.weight'}
    save_file(broken, str(path))
    with pytest.raises(RuntimeError, match='blocks.1.mlp.fc1.weight'), pytest.warns(UntrainedWeightsWarning):
        timm.create_model('test_vit_liferegress', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


# --- timm conformance ------------------------------------------------------------------------------------------

def test_reset_classifier(tiny):
    x = torch.randn(2, 3, 32, 32)
    flops = tiny.flops()
    tiny.reset_classifier(5)
    assert tiny(x).shape == (2, 5) and tiny.flops() < flops  # the smaller head is counted again
    tiny.reset_classifier(0)
    assert tiny(x).shape == (2, 32)
    assert tiny.forward_head(tiny.forward_features(x), pre_logits=True).shape == (2, 32)


def test_timm_cfg_fields_name_real_modules():
    model = timm.create_model('test_vit_liferegress', reg_tokens=1, life_layer=2, prune_layers=(3,))
    modules = dict(model.named_modules())
    cfg = model.pretrained_cfg
    assert isinstance(modules[cfg['classifier']], nn.Linear) and isinstance(modules[cfg['first_conv']], nn.Conv2d)
    params = dict(model.named_parameters())
    assert {'pos_embed', 'cls_token', 'reg_token'} <= set(model.no_weight_decay()) & set(params)
    groups = group_parameters(model, model.group_matcher())
    assert sorted(n for names in groups.values() for n in names) == sorted(params)
    life_group = [names for names in groups.values() if 'life.proj.weight' in names][0]
    assert 'blocks.1.attn.qkv.weight' in life_group and not any(n.startswith('blocks.2.') for n in life_group)


def test_forward_intermediates_and_features_only(tiny):
    x = torch.randn(2, 3, 32, 32)
    final, inter = tiny.forward_intermediates(x)
    assert len(inter) == 4 and all(y.shape == (2, 32, 4, 4) for y in inter)
    assert torch.allclose(final, tiny.forward_features(x), atol=1e-6)  # timm's rule: the slimmed final tokens
    full, full_inter = tiny.forward_intermediates(x, keep_rate=1.)
    assert torch.allclose(full, tiny.forward_features(x, keep_rate=1.), atol=1e-6)  # the parent's path
    assert full.shape[1] == 17 and final.shape[1] == 1 + tiny.token_schedule()[-1]
    # up to the first prune layer (block 2) the same as the parent; after it, a dropped patch keeps its block-2 features
    for a, b in zip(inter[:2], full_inter[:2]):
        assert torch.allclose(a, b, atol=1e-6)
    unchanged = (inter[2] == inter[1]).all(dim=1).flatten(1).sum(1)  # per image, patches not updated by block 3
    assert (unchanged == 16 - tiny.token_schedule()[2]).all()
    nlc = tiny.forward_intermediates(x, output_fmt='NLC', intermediates_only=True, indices=[2])
    assert torch.equal(nlc[0], inter[2].flatten(2).transpose(1, 2))
    feats = timm.create_model('test_vit_liferegress', features_only=True, out_indices=(1, 3))
    assert [f.shape for f in feats(x)] == [torch.Size([2, 32, 4, 4])] * 2


def test_device_and_dtype_kwargs():
    model = timm.create_model('test_vit_liferegress', dtype=torch.float64).eval()
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model(torch.randn(2, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64
    model.train()(torch.randn(2, 3, 32, 32, dtype=torch.float64)).sum().backward()
    meta = timm.create_model('test_vit_liferegress', device='meta', budget=0.8)
    assert all(p.device.type == 'meta' for p in meta.parameters()) and meta.resolve_keep_rate() < 1


def test_torch_compile_fixed_keep_rate(tiny):
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(tiny)
    with torch.no_grad():
        assert torch.allclose(compiled(x, keep_rate=0.5), tiny(x, keep_rate=0.5), atol=1e-5)


def test_torch_fx_traces_the_default_keep_rate():
    """As timm's test_models.py does it: torchvision's fx feature extractor with timm's leaf functions."""
    from timm.layers import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    model = timm.create_model('test_vit_liferegress').eval()
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    fx_model = create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(fx_model(x)[eval_nodes[-1]], model(x), atol=1e-5)
    fx_model.train()
    model.train()
    assert torch.allclose(fx_model(x)[train_nodes[-1]], model(x), atol=1e-5)
    fx_model(x)[train_nodes[-1]].mean().backward()
    assert all(p.grad is not None for p in fx_model.parameters())
