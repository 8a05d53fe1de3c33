"""Every timm ViT parent: mirrored tags, ``convert``, rotary embeddings under slimming, parents without [CLS], and the
parent's own weights loaded strictly with the new parts reported untrained."""
import warnings

import pytest
import timm
import torch
from safetensors.torch import save_file

from timm_exits import UntrainedWeightsWarning, convert
from timm_exits.models import LifeRegressEva, MultiExitEva, MultiExitVisionTransformer
from timm_exits.models._build import twin_parents
from timm_exits.models.life_regress_vit import token_counts

TINY = dict(depth=4, embed_dim=64, num_heads=2, img_size=64, num_classes=5)


def _quiet_create(name: str, **kwargs) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return timm.create_model(name, **kwargs)


def test_families_cover_every_vit_and_eva_architecture():
    parents = set(twin_parents('liferegress'))  # the token parents: every family serves them
    assert {'vit_base_patch14_reg4_dinov2', 'vit_base_patch16_siglip_224', 'eva02_base_patch14_224',
            'deit3_base_patch16_224', 'vit_base_patch16_clip_224', 'deit_base_distilled_patch16_224',
            'vit_large_patch16_dinov3'} <= parents
    token_modules = ['vision_transformer', 'deit', 'eva', 'vision_transformer_hybrid', 'vitamin']
    assert set(timm.list_models(module=token_modules)) == parents
    for family in ('mexit', 'liferegress'):
        registered = set(timm.list_models(f'*_{family}'))
        assert {f'{p}_{family}' for p in parents} <= registered
        assert timm.models.get_arch_name(f'vit_base_patch16_siglip_224_{family}') in registered


@pytest.mark.parametrize('family', ['mexit', 'liferegress'])
def test_every_pretrained_tag_is_mirrored_with_the_parents_weights(family):
    for parent in twin_parents(family):
        if parent == 'test_vit':  # timm's tiny test model: test_vit_mexit / _liferegress are this package's own
            continue
        tags = {n.split('.', 1)[1] for n in timm.list_pretrained(f'{parent}.*')}
        mirrored = {n.split('.', 1)[1] for n in timm.list_pretrained(f'{parent}_{family}.*')}
        assert tags == mirrored, parent
    cfg = timm.models.get_pretrained_cfg(f'vit_base_patch14_reg4_dinov2_{family}.lvd142m')
    parent_cfg = timm.models.get_pretrained_cfg('vit_base_patch14_reg4_dinov2.lvd142m')
    assert cfg.hf_hub_id == parent_cfg.hf_hub_id and cfg.mean == parent_cfg.mean and cfg.license == parent_cfg.license
    assert cfg.input_size == parent_cfg.input_size
    default = timm.models.get_pretrained_cfg(f'vit_base_patch16_224_{family}')
    assert default.tag == timm.models.get_pretrained_cfg('vit_base_patch16_224').tag


@pytest.mark.parametrize('parent', ['vit_base_patch16_siglip_224', 'eva02_tiny_patch14_224', 'deit3_small_patch16_224'])
@pytest.mark.parametrize('family', ['mexit', 'liferegress'])
def test_pretrained_loads_the_parents_file_strictly(tmp_path, parent, family):
    ref = _quiet_create(parent, **TINY).eval()
    path = tmp_path / 'parent.safetensors'
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    with pytest.warns(UntrainedWeightsWarning, match='UNTRAINED'):
        model = timm.create_model(f'{parent}_{family}', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                  **TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # the classifier is timm's business: a checkpoint for other classes leaves it initialised
        out = model.forward_features(x) if family == 'mexit' else model.forward_features(x, keep_rate=1.)
        torch.testing.assert_close(out, ref.forward_features(x), rtol=0, atol=0)


def test_convert_keeps_any_built_model_and_its_output():
    torch.manual_seed(0)
    model = _quiet_create('vit_small_patch14_reg4_dinov2', depth=3, embed_dim=64, num_heads=2, img_size=56,
                          num_classes=7, dynamic_img_size=True).eval()
    x = torch.randn(2, 3, 56, 42)
    with torch.no_grad():
        before = model(x)
    out = convert(model, 'mexit', exit_layers=(1, 2))
    assert out is model and type(model) is MultiExitVisionTransformer and model.exit_layers == (1, 2, 3)
    assert not model.exits.training and model.pretrained_cfg['architecture'] == 'vit_small_patch14_reg4_dinov2_mexit'
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
        assert model.forward_dynamic(x, threshold=0.2).logits.shape == (2, 7)

    eva = _quiet_create('eva02_tiny_patch14_224', **TINY).eval()
    with torch.no_grad():
        before = eva(torch.randn(1, 3, 64, 64))
    assert type(convert(eva, 'liferegress')) is LifeRegressEva
    assert type(convert(_quiet_create('eva02_tiny_patch14_224', **TINY), 'mexit')) is MultiExitEva


def test_convert_refuses_with_the_reason():
    model = _quiet_create('vit_small_patch16_224', **TINY)
    with pytest.raises(ValueError,
                       match=r"family must be one of \['liferegress', 'mexit', 'mexit_liferegress'\], got 'exits'"):
        convert(model, 'exits')
    with pytest.raises(ValueError, match=r'exit_layers must hold block numbers in 1..4'):
        convert(model, 'mexit', exit_layers=(9,))
    assert type(model).__name__ == 'VisionTransformer' and not hasattr(model, 'exits')  # left as it was
    with pytest.raises(ValueError, match='already a MultiExitVisionTransformer'):
        convert(convert(model, 'mexit'), 'liferegress')
    with pytest.raises(ValueError, match=r"TNT is not a parent timm-exits supports \(.*two tensors.*\).*'ResNet'"):
        convert(timm.create_model('tnt_s_legacy_patch16_224', img_size=32, depth=1), 'mexit')
    with pytest.raises(ValueError, match=r"ResNet passes a map between its blocks, and the liferegress family needs"):
        convert(timm.create_model('resnet10t'), 'liferegress')


def test_no_class_token_parents_pool_patches_and_refuse_cls_heads():
    with pytest.raises(ValueError, match=r"exit_head \['cnn_add'\] combines the \[CLS\] token .* no class token"):
        _quiet_create('vit_base_patch16_siglip_224_mexit', exit_head='cnn_add', **TINY)
    model = _quiet_create('vit_base_patch16_siglip_224_mexit', exit_head='linear', **TINY).eval()
    assert model.num_prefix_tokens == 0 and all(e.pool == 'avg' for e in model.exits.values())
    tokens = torch.randn(2, 16, 64)
    exit_head = model.exits[str(model.exit_layers[0])]
    torch.testing.assert_close(exit_head(tokens), exit_head.head(exit_head.norm(tokens.mean(1))))


@pytest.mark.parametrize('parent', ['eva02_tiny_patch14_224', 'vit_base_patch16_rope_mixed_224'])
def test_slimming_keeps_the_rotary_entries_of_kept_patches(parent):
    """An independent reference: the same kept patches (top lives per schedule), each block given the rotary rows of
    those patches by plain indexing of the full-grid embedding."""
    torch.manual_seed(0)
    model = _quiet_create(f'{parent}_liferegress', **TINY).eval()
    assert model.rope is not None
    x = torch.randn(2, 3, 64, 64)
    rate = .5
    with torch.no_grad():
        out = model(x, keep_rate=rate)
        lives = model.predict_lives(x, keep_rate=rate)
        tokens, rope = model._embed(x)
        npt, n_full = model.num_prefix_tokens, lives.shape[1]
        counts = token_counts(n_full, model.depth, model.prune_layers, rate)
        expected = []
        for b in range(2):
            keep = torch.arange(n_full)
            t = tokens[b:b + 1]
            live = lives[b]
            for i, blk in enumerate(model.blocks):
                full = rope[i] if model.rope_mixed else rope  # (heads, N, dim) or (N, dim)
                r = full[..., keep, :]
                t = blk(t, rope=r.unsqueeze(0) if model.rope_mixed else r)
                if i + 1 < model.depth and counts[i + 1] < counts[i]:
                    top = live[keep].topk(counts[i + 1]).indices.sort().values
                    keep = keep[top]
                    t = torch.cat([t[:, :npt], t[:, npt:][:, top]], dim=1)
            expected.append(model.forward_head(model.norm(t)))
    torch.testing.assert_close(out, torch.cat(expected), rtol=1e-4, atol=1e-5)



@pytest.mark.parametrize('parent', ['eva02_tiny_patch14_224', 'vit_base_patch16_rope_mixed_224'])
def test_torchscript_of_a_rotary_parent_slims_as_eager(parent):
    model = _quiet_create(f'{parent}_liferegress', **TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), model(x), rtol=0, atol=0)  # default keep rate 0.7


@pytest.mark.parametrize('name,family', [('mevit', 'mexit'), ('end_to_end', 'mexit'), ('classifier_wise', 'mexit'),
                                         ('liferegress', 'liferegress')])
def test_training_tasks_take_any_parents_twin(name, family):
    """The papers' objectives on a converted rotary parent: a finite loss whose gradient reaches the new parts."""
    from timm_exits.tasks import create_task
    model = convert(_quiet_create('eva02_tiny_patch14_224', **TINY), family)
    task = create_task(name, model)
    task.train()
    out = task(torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3]))
    assert torch.isfinite(out['loss'])
    out['loss'].backward()
    new = 'exits.' if family == 'mexit' else 'life.'
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith(new) and p.requires_grad)


def test_slimming_benchmark_oracle_runs_rotary_parents():
    """benchmark_slim's free-token-choice oracle gives every block its rotary rows: at a full schedule it is the
    parent; with drops, each kept (first) patch keeps its own rows, as the model's slimming does."""
    from timm_exits.benchmark_slim import oracle_forward
    from timm_exits.models.life_regress_vit import token_counts
    torch.manual_seed(0)
    model = _quiet_create('eva02_tiny_patch14_224_liferegress', **TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    full = [model.patch_embed.num_patches] * model.depth
    with torch.no_grad():
        torch.testing.assert_close(oracle_forward(model, x, full), model(x, keep_rate=1.), rtol=0, atol=0)
        counts = token_counts(model.patch_embed.num_patches, model.depth, model.prune_layers, .5)
        tokens, rope = model._embed(x)
        npt = model.num_prefix_tokens
        for i, blk in enumerate(model.blocks):
            tokens = blk(tokens, rope=rope[:tokens.shape[1] - npt])
            if i + 1 < model.depth and counts[i + 1] < counts[i]:
                tokens = tokens[:, :npt + counts[i + 1]]
        torch.testing.assert_close(oracle_forward(model, x, counts), model.forward_head(model.norm(tokens)))
