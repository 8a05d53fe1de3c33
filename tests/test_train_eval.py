"""Evaluation (timm_exits.validate): threshold simulation and selection, budgets, practical exits, the JSON schema."""
import json

import pytest
import torch
from safetensors.torch import save_file

import timm
from timm_exits.data import DigitsDataset, make_loader
from timm_exits.evaluation import (
    budget_table, budgeted_batch_table, collect_outputs, evaluate, practical_exits, select_threshold, threshold_table,
)
from timm_exits.validate import main

from .conftest import spread_exit_heads

# 3 exits, 4 images: per image the confidence at each exit and whether that exit is right
SCORES = torch.tensor([[.95, .40, .70, .20],
                       [.99, .85, .60, .30],
                       [.99, .99, .90, .50]])
CORRECT = torch.tensor([[1, 0, 1, 0],
                        [1, 1, 0, 0],
                        [1, 1, 1, 1]], dtype=torch.bool)
COSTS = [.5, .75, 1.]


def test_threshold_table_by_hand():
    rows = threshold_table(SCORES, CORRECT, COSTS, [.15, .65, .8, .96])
    # t=.15: every image leaves at exit 1 -> right: 1, 0, 1, 0
    # t=.65: images 1 and 3 at exit 1 (right), image 2 at exit 2 (right), image 4 at exit 3 (right)
    # t=.8: image 1 at exit 1, image 2 at exit 2, images 3, 4 at exit 3: all right
    # t=.96: image 1 at exit 2, image 2 at exit 3, images 3, 4 at exit 3
    assert [r['accuracy'] for r in rows] == [50., 100., 100., 100.]
    assert [r['mean_cost'] for r in rows] == pytest.approx([.5, (.5 + .75 + .5 + 1) / 4, (.5 + .75 + 1 + 1) / 4,
                                                            (.75 + 1 + 1 + 1) / 4])
    low = threshold_table(1 - SCORES, CORRECT, COSTS, [.35], confident_high=False)[0]  # entropy-like: exit if <= t
    assert low['accuracy'] == 100. and low['mean_cost'] == pytest.approx(rows[1]['mean_cost'])


def test_select_threshold_by_hand():
    rows = threshold_table(SCORES, CORRECT, COSTS, [.15, .65, .8, .96])  # accuracy 50, 100, 100, 100
    assert select_threshold(rows, 100., max_drop=0.)['threshold'] == .65  # cheapest with no drop
    assert select_threshold(rows, 100., max_drop=60.)['threshold'] == .15
    assert select_threshold(rows, 100., max_cost=.85)['threshold'] == .65  # most accurate under the cost, cheapest
    assert select_threshold(rows, 100., max_cost=.6)['threshold'] == .15
    with pytest.raises(ValueError, match='no threshold'):
        select_threshold(rows, 100., max_cost=.4)
    with pytest.raises(ValueError, match='exactly one'):
        select_threshold(rows, 100.)


def test_budgeted_batch_by_hand():
    # thresholds' (accuracy, mean cost) on SCORES: the best accuracy 100 first costs (.5 + .75 + .5 + 1) / 4 = .6875
    rows = budgeted_batch_table(SCORES, CORRECT, COSTS, [.4, .5, .6, .7, 1.])
    assert [r['mean_budget'] for r in rows] == [.5, .6, .7, 1.]  # .4: below every exit, left out
    assert [r['accuracy'] for r in rows] == [50., 50., 100., 100.]
    assert all(r['mean_cost'] <= r['mean_budget'] + 1e-9 for r in rows)
    assert rows[2]['mean_cost'] == pytest.approx(.6875)
    # chosen on another split where exit 1 is always right: there every image leaving at exit 1 is best (and
    # cheapest) even under budget 1, and that choice, applied here, gives this split's exit-1 accuracy
    calib_correct = CORRECT.clone()
    calib_correct[0] = True
    other = budgeted_batch_table(SCORES, CORRECT, COSTS, [1.], calib=(SCORES, calib_correct))
    assert [(r['accuracy'], r['mean_cost']) for r in other] == [(50., .5)]
    assert rows[-1]['accuracy'] == 100.  # chosen on this split itself


def test_practical_exits_and_budgets():
    assert practical_exits([60., 70., 65., 80., 80.]) == [True, True, False, True, False]
    rows = budget_table([60., 70., 80.], COSTS, [.4, .5, .8, 1.])
    assert [(r['budget'], r['accuracy'], r['mean_cost']) for r in rows] == [(.5, 60., .5), (.8, 70., .75),
                                                                             (1., 80., 1.)]


@pytest.mark.parametrize('criterion', ['confidence', 'entropy', 'uncertainty'])
def test_simulated_thresholds_match_forward_dynamic(criterion):
    model = spread_exit_heads(timm.create_model('test_vit_mexit', exit_criterion=criterion, exit_layers=[1, 2, 3]))
    model.eval()
    ds = DigitsDataset('val', 32)
    outputs = collect_outputs(model, make_loader(ds, 128), torch.device('cpu'))
    threshold = float(outputs['scores'][0].median())  # about half the images leave at the first exit
    row = threshold_table(outputs['scores'], outputs['correct'], list(model.threshold_costs), [threshold],
                          criterion == 'confidence')[0]
    with torch.no_grad():
        out = model.forward_dynamic(ds.images, threshold=threshold)
    assert row['accuracy'] == pytest.approx(100. * (out.logits.argmax(-1) == ds.targets).float().mean().item())
    assert row['mean_cost'] == pytest.approx(out.cost.double().mean().item(), rel=1e-6)
    assert len(set(out.exit_layer.tolist())) >= 2  # images really leave at different exits


def test_validate_warns_when_a_threshold_can_cost_more_than_the_model(tmp_path, caplog):
    model = timm.create_model('test_vit_mexit', exit_head='vit')  # heads as heavy as a block: worst case above 1
    save_file(model.state_dict(), str(tmp_path / 'w.safetensors'))
    with caplog.at_level('INFO'):
        result = main(['--model', 'test_vit_mexit', '--model-kwargs', 'exit_head=vit', '--checkpoint',
                       str(tmp_path / 'w.safetensors'), '--dataset', 'digits', '--split', 'test', '--output',
                       str(tmp_path), '--workers', '0', '--no-progress'])
    assert result['worst_case_threshold_cost'] > 1
    assert f"costs {result['worst_case_threshold_cost']:.4f} of the full model" in caplog.text


def test_validate_cli_schema_and_threshold_choice(tmp_path):
    model = timm.create_model('test_vit_mexit')
    save_file(model.state_dict(), str(tmp_path / 'w.safetensors'))
    result = main(['--model', 'test_vit_mexit', '--checkpoint', str(tmp_path / 'w.safetensors'), '--dataset',
                   'digits', '--split', 'test', '--calib-split', 'val', '--target-cost', '.9', '--output',
                   str(tmp_path), '--workers', '0', '--latency-batch', '4'])
    assert json.loads((tmp_path / 'eval.json').read_text()) == result
    assert set(result) == {'model', 'dataset', 'num_images', 'exits', 'thresholds', 'budgets', 'plot',
                           'worst_case_threshold_cost', 'budgeted_batch', 'budgeted_batch_chosen_on', 'data_config'}
    assert result['budgeted_batch_chosen_on'] == 'calibration split'
    assert all(r['mean_budget'] >= 0.3 for r in result['budgeted_batch'])
    assert result['worst_case_threshold_cost'] == pytest.approx(model.threshold_costs[-1])
    assert max(r['mean_cost'] for r in result['thresholds']) <= result['worst_case_threshold_cost'] + 1e-9
    assert {'threshold', 'accuracy', 'mean_cost'} == set(result['thresholds'][0])
    assert {'budget', 'accuracy', 'mean_cost'} == set(result['budgets'][0])
    assert all(e['latency_ms'] > 0 for e in result['exits']) and result['exits'][-1]['cost'] == 1.
    choice = json.loads((tmp_path / 'threshold.json').read_text())
    assert choice['calib_mean_cost'] <= .9 and choice['split'] == 'test'


def test_life_regress_evaluation_schema():
    model = timm.create_model('test_vit_liferegress')
    result = evaluate(model, make_loader(DigitsDataset('val', 32), 256), torch.device('cpu'), 'test_vit_liferegress',
                      'digits')
    assert set(result) == {'model', 'dataset', 'num_images', 'keep_rates', 'plot'}
    rows = result['keep_rates']
    assert [r['keep_rate'] for r in rows] == [1., .9, .8, .7]
    assert set(rows[0]) == {'keep_rate', 'accuracy', 'flops_ratio', 'gflops', 'latency_ms'}
    assert rows[0]['flops_ratio'] == 1. and rows[-1]['flops_ratio'] < 1. and rows[0]['latency_ms'] is None
