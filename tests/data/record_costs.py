"""The cost numbers of the three families, recorded on main before the cost model was shared:
``python tests/data/record_costs.py tests/data/costs_main.json``; ``tests/test_costs.py`` recomputes them."""
import json
import sys
import warnings

import torch

import timm
import timm_exits  # noqa: F401

CASES = [
    # (family, name, kwargs)
    ('mexit', 'test_vit_mexit', {}),
    ('mexit', 'test_vit_mexit', dict(exit_head='cnn_project')),
    ('mexit', 'test_vit_mexit', dict(exit_head=['vit', 'mlp'], exit_criterion='uncertainty')),
    ('mexit', 'test_vit_mexit_ls', {}),
    ('mexit', 'vit_small_patch14_dinov2_mexit', dict(img_size=56, depth=4, embed_dim=64, num_heads=2, num_classes=10)),
    ('mexit', 'eva02_tiny_patch14_224_mexit', dict(img_size=56, depth=4, embed_dim=64, num_heads=2, num_classes=10)),
    ('mexit', 'vit_base_patch16_siglip_224_mexit', dict(img_size=64, depth=6, embed_dim=64, num_heads=2,
                                                      num_classes=7, exit_head='mlp')),
    ('mexit', 'deit_small_patch16_224_mexit', dict(num_classes=10)),
    ('mexit', 'test_vit_mexit', dict(dynamic_img_size=True, exit_head='cnn_add')),
    ('mexit', 'eva02_tiny_patch14_224_mexit', dict(img_size=56, depth=4, embed_dim=64, num_heads=2, num_classes=10,
                                                 dynamic_img_size=True)),
    ('liferegress', 'test_vit_liferegress', {}),
    ('liferegress', 'deit_small_liferegress', dict(num_classes=10)),
    ('liferegress', 'vit_small_patch14_reg4_dinov2_liferegress', dict(img_size=56, depth=6, embed_dim=64, num_heads=2,
                                                                     num_classes=10)),
    ('liferegress', 'eva02_tiny_patch14_224_liferegress', dict(img_size=56, depth=6, embed_dim=64, num_heads=2,
                                                             num_classes=10)),
    ('mexit_liferegress', 'test_vit_mexit_liferegress', {}),
    ('mexit_liferegress', 'test_vit_mexit_liferegress', dict(exit_criterion='uncertainty', exit_head=['vit', 'mlp'])),
    ('mexit_liferegress', 'test_vit_mexit_liferegress', dict(dynamic_img_size=True)),
    ('mexit_liferegress', 'deit_small_patch16_224_mexit_liferegress', dict(num_classes=10)),
    ('mexit_liferegress', 'eva02_tiny_patch14_224_mexit_liferegress', dict(img_size=56, depth=6, embed_dim=64,
                                                                         num_heads=2, num_classes=10)),
    ('mexit_liferegress', 'vit_base_patch16_siglip_224_mexit_liferegress', dict(img_size=64, depth=6, embed_dim=64,
                                                                              num_heads=2, num_classes=7)),
]
SIZE = {'eva02_tiny_patch14_224_mexit': (42, 70)}
SIZE = dict(SIZE, test_vit_mexit=(48, 64), test_vit_mexit_liferegress=(48, 64))
RATES = [1.0, 0.9, 0.7, 0.5, 0.25]
BUDGETS = [0.3, 0.5, 0.6, 0.75, 0.9, 1.0]


def attempt(fn):
    try:
        v = fn()
        return list(v) if isinstance(v, tuple) else v
    except ValueError as e:
        return {'error': str(e)}


def record(family, name, kwargs):
    """Every cost number of one model."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        m = timm.create_model(name, **kwargs).eval()
    rec = {'family': family, 'name': name, 'kwargs': kwargs}
    if family in ('mexit', 'mexit_liferegress'):
        rec['full_flops'] = m.full_flops
        rec['exit_costs'] = list(m.exit_costs)
        rec['threshold_costs'] = list(m.threshold_costs)
        rec['stop_budget'] = {str(b): attempt(lambda: m._stop_layer(b)) for b in BUDGETS}
        rec['stop_budget_threshold'] = {str(b): attempt(lambda: m._stop_layer(b, True)) for b in BUDGETS}
    if family == 'mexit_liferegress':
        rec['exit_costs_for'] = {str(r): list(m.exit_costs_for(r)) for r in RATES}
        rec['threshold_costs_for'] = {str(r): list(m.threshold_costs_for(r)) for r in RATES}
        rec['flops_ratio'] = {str(r): m.flops_ratio(r) for r in RATES}
        rec['plan_budget'] = {str(b): attempt(lambda: m.plan_budget(b)) for b in BUDGETS}
        rec['plan_budget_threshold'] = {str(b): attempt(lambda: m.plan_budget(b, threshold=True)) for b in BUDGETS}
        rec['plan_budget_rate'] = {str(b): attempt(lambda: m.plan_budget(b, keep_rate=0.7)) for b in BUDGETS}
    if family == 'liferegress':
        rec['flops'] = {str(r): m.flops(r) for r in RATES}
        rec['flops_ratio'] = {str(r): m.flops_ratio(r) for r in RATES}
        rec['keep_rate_for_budget'] = {str(b): attempt(lambda: m.keep_rate_for_budget(b)) for b in BUDGETS}
    if family != 'liferegress' and m.dynamic_img_size:
        rec['exit_costs_at'] = list(m.exit_costs_at(SIZE[name]))
        rec['threshold_costs_at'] = list(m.threshold_costs_at(SIZE[name]))
        if family == 'mexit_liferegress':
            rec['exit_costs_for_at'] = list(m.exit_costs_for(0.6, SIZE[name]))
            rec['threshold_costs_for_at'] = list(m.threshold_costs_for(0.6, SIZE[name]))
    return rec


if __name__ == '__main__':
    out = [record(*case) for case in CASES]
    with open(sys.argv[1], 'w') as f:
        json.dump(out, f, indent=1)
