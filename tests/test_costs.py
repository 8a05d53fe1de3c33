"""One cost model for every family: the numbers recorded before it was shared (``tests/data/costs_main.json``, written
by ``tests/data/record_costs.py``), recomputed on several parents, sizes, keep rates and budgets, and its pieces
against torch's flop counter on the modules themselves."""
import json
import re
from pathlib import Path

import pytest
import torch

import timm

from timm_exits.models._base import count_flops

from .data.record_costs import CASES, record

RECORDED = {(r['family'], r['name'], json.dumps(r['kwargs'], sort_keys=True)): r
            for r in json.loads((Path(__file__).parent / 'data' / 'costs_main.json').read_text())}


def _same(new, old, where):
    if isinstance(old, dict) and 'error' in old:
        assert isinstance(new, dict) and 'error' in new, f'{where}: {new} where {old["error"]!r} was raised'
        low = float(re.search(r'allowed: ([0-9.]+) <= budget <= 1', new['error']).group(1))
        if 'threshold' not in where:  # a threshold path that fits no budget falls back to the budget alone
            assert low <= 1, f'{where}: empty allowed range in {new["error"]!r}'
    elif isinstance(old, dict):
        assert set(new) == set(old), where
        for k in old:
            _same(new[k], old[k], f'{where}[{k}]')
    elif isinstance(old, list):
        assert isinstance(new, list) and len(new) == len(old), f'{where}: {new} != {old}'
        for i, (a, b) in enumerate(zip(new, old)):
            _same(a, b, f'{where}[{i}]')
    elif isinstance(old, float):
        assert new == pytest.approx(old, rel=1e-12, abs=1e-15), f'{where}: {new} != {old}'
    else:
        assert new == old, f'{where}: {new} != {old}'


@pytest.mark.parametrize('family,name,kwargs', [
    pytest.param(*case, marks=pytest.mark.slow) if 'deit_small' in case[1] else case for case in CASES],
    ids=[f'{c[1]}-{i}' for i, c in enumerate(CASES)])
def test_costs_as_recorded(family, name, kwargs):
    old = RECORDED[(family, name, json.dumps(kwargs, sort_keys=True))]
    _same(json.loads(json.dumps(record(family, name, kwargs))), old, name)


def test_pieces_sum_to_the_counted_model():
    """At keep rate 1 every family's full cost is the parent's FLOPs, counted on the whole model."""
    for name in ('test_vit_mexit', 'test_vit_liferegress', 'test_vit_mexit_liferegress'):
        model = timm.create_model(name).eval()
        full = dict(keep_rate=1.) if 'life' in name else {}
        model(torch.zeros(1, 3, 32, 32), **full)  # costs counted (and cached) outside the count below
        parent = count_flops(lambda x: model(x, **full), torch.zeros(1, 3, 32, 32))[0]
        assert (model.full_flops if hasattr(model, 'full_flops') else model.flops(1.)) == parent


def test_one_counter_for_every_family():
    """The combined model at keep rate 1 costs what the multi-exit model costs; its full depth at rho what the
    LifeRegress model costs at rho (same weights' shapes, same schedule)."""
    both = timm.create_model('test_vit_mexit_liferegress').eval()
    mexit = timm.create_model('test_vit_mexit').eval()
    slim = timm.create_model('test_vit_liferegress').eval()
    assert both.exit_costs_for(1.) == mexit.exit_costs and both.threshold_costs_for(1.) == mexit.threshold_costs
    for rate in (1., .9, .7, .5, .3):
        assert both.flops_ratio(rate) == pytest.approx(slim.flops_ratio(rate), rel=1e-12)
