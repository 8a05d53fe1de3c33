"""Checkpoint loading of the package's models: errors that name the file and the argument, recorded layouts checked.

Checkpoints record how their model was built in three ways (safetensors metadata of the recipes' model.safetensors,
the recipes' 'recipe' key, timm train.py's 'args'); each is made here and read back.
"""
import argparse
import json

import pytest
import torch
from safetensors.torch import save_file

import timm
from timm_exits.models._checkpoint import (
    METADATA_KEY, checkpoint_model_args, read_checkpoint, read_checkpoint_args,
)

KWARGS = {'exit_criterion': 'uncertainty', 'exit_layers': [1, 3]}


def _save(path, model, source: str, kwargs=KWARGS, num_classes=10, name='test_vit_mexit'):
    """Write ``model`` as each of the three checkpoint sources records it."""
    record = {'model': name, 'model_kwargs': dict(kwargs), 'num_classes': num_classes}
    if source == 'safetensors':
        meta = dict(record, stage=1, epoch=3, format=1)
        save_file(model.state_dict(), path, metadata={METADATA_KEY: json.dumps(meta)})
    elif source == 'recipe':
        torch.save({'state_dict': model.state_dict(), 'epoch': 3, 'recipe': dict(record, name='tiny', lr=1e-3)}, path)
    else:  # timm train.py
        args = argparse.Namespace(**record, lr=1e-3, epochs=3)
        torch.save({'state_dict': model.state_dict(), 'epoch': 3, 'arch': name, 'args': args}, path)
    return path


SOURCES = [('safetensors', 'model.safetensors'), ('recipe', 'last.pth.tar'), ('train_py', 'model_best.pth.tar')]


@pytest.mark.parametrize('source,file', SOURCES)
def test_recorded_args_read_back_from_every_source(tmp_path, source, file):
    model = timm.create_model('test_vit_mexit', **KWARGS)
    path = _save(tmp_path / file, model, source)
    state_dict, args = read_checkpoint(path)
    assert set(state_dict) == set(model.state_dict())
    assert checkpoint_model_args(args) == ('test_vit_mexit', KWARGS, 10)
    assert checkpoint_model_args(read_checkpoint_args(path)) == ('test_vit_mexit', KWARGS, 10)


@pytest.mark.parametrize('source,file', SOURCES)
def test_create_model_refuses_a_hidden_layout_mismatch(tmp_path, source, file):
    """The exit criterion cannot be seen in the weights: loading as 'confidence' used to pass silently."""
    model = timm.create_model('test_vit_mexit', **KWARGS).eval()
    path = _save(tmp_path / file, model, source)
    with pytest.raises(ValueError, match=rf"{file} was trained with exit_criterion='uncertainty'.* this model has "
                                         rf"exit_criterion='confidence': create the model with "
                                         rf"exit_criterion='uncertainty'"):
        timm.create_model('test_vit_mexit', exit_layers=(1, 3), checkpoint_path=str(path))
    loaded = timm.create_model('test_vit_mexit', checkpoint_path=str(path), **KWARGS).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x, threshold=0.5), model(x, threshold=0.5))


def test_create_model_refuses_a_life_layout_mismatch(tmp_path):
    life = timm.create_model('test_vit_liferegress', life_layer=1, prune_layers=(2, 3), U=2.)
    path = _save(tmp_path / 'last.pth.tar', life, 'recipe', kwargs={'prune_layers': (2, 3), 'U': 2.},
                 name='test_vit_liferegress')
    with pytest.raises(ValueError, match=r'trained with U=2.0.* this model has U=1.5'):
        timm.create_model('test_vit_liferegress', checkpoint_path=str(path))
    assert timm.create_model('test_vit_liferegress', checkpoint_path=str(path), U=2).U == 2.


def test_missing_checkpoint_names_the_file(tmp_path):
    path = tmp_path / 'nowhere' / 'model.safetensors'
    with pytest.raises(FileNotFoundError, match=f'checkpoint {path} does not exist'):
        timm.create_model('test_vit_mexit', checkpoint_path=str(path))
    with pytest.raises(FileNotFoundError, match=f'checkpoint {tmp_path} does not exist .it is a folder.'):
        timm.create_model('test_vit_liferegress', checkpoint_path=str(tmp_path))


def test_corrupt_and_truncated_checkpoints_name_the_file(tmp_path):
    (tmp_path / 'bad.safetensors').write_bytes(b'\x00' * 64)
    with pytest.raises(ValueError, match=f'checkpoint {tmp_path}/bad.safetensors is not a valid safetensors file'):
        timm.create_model('test_vit_mexit', checkpoint_path=str(tmp_path / 'bad.safetensors'))
    full = _save(tmp_path / 'full.pth.tar', timm.create_model('test_vit_mexit'), 'recipe')
    data = full.read_bytes()
    (tmp_path / 'cut.pth.tar').write_bytes(data[:len(data) // 2])  # a copy killed half-way
    unreadable = 'is truncated, corrupt or not a torch checkpoint: torch.load cannot read it'
    with pytest.raises(ValueError, match=f'checkpoint {tmp_path}/cut.pth.tar {unreadable}'):
        timm.create_model('test_vit_mexit', checkpoint_path=str(tmp_path / 'cut.pth.tar'))
    (tmp_path / 'text.pth').write_text('hello')
    with pytest.raises(ValueError, match=f'checkpoint {tmp_path}/text.pth {unreadable}'):
        timm.create_model('test_vit_mexit', checkpoint_path=str(tmp_path / 'text.pth'))


def test_other_num_classes_names_num_classes(tmp_path):
    """A plain state dict (nothing recorded): the classifier's shape tells, and the hint names num_classes, not the
    exit layout."""
    save_file(timm.create_model('test_vit_mexit', num_classes=7).state_dict(), tmp_path / 'w.safetensors')
    with pytest.raises(ValueError, match=r'classifies 7 classes .* this model num_classes=10: create the model with '
                                         r'num_classes=7') as info:
        timm.create_model('test_vit_mexit', checkpoint_path=str(tmp_path / 'w.safetensors'))
    assert 'exit_layers' not in str(info.value)
    model = timm.create_model('test_vit_liferegress', num_classes=0)
    with pytest.raises(ValueError, match=r'classifies 10 classes .* num_classes=0: create the model with '
                                         r'num_classes=10'):
        model.load_state_dict(timm.create_model('test_vit_liferegress').state_dict())
    recorded = _save(tmp_path / 'last.pth.tar', timm.create_model('test_vit_mexit', **KWARGS), 'recipe')
    with pytest.raises(ValueError, match=r'trained with num_classes=10, this model has num_classes=5'):
        timm.create_model('test_vit_mexit', checkpoint_path=str(recorded), num_classes=5, **KWARGS)


def test_ema_weights_are_preferred_like_timm(tmp_path):
    model, ema = timm.create_model('test_vit_mexit'), timm.create_model('test_vit_mexit')
    torch.save({'state_dict': model.state_dict(), 'state_dict_ema': ema.state_dict()}, tmp_path / 'c.pth.tar')
    loaded = timm.create_model('test_vit_mexit', checkpoint_path=str(tmp_path / 'c.pth.tar'))
    assert torch.equal(loaded.head.weight, ema.head.weight)


def test_other_timm_models_load_as_timm_loads_them(tmp_path):
    """Only this package's models take the checked path: a plain timm model keeps timm's loader."""
    vit = timm.create_model('vit_tiny_patch16_224', depth=1, img_size=32, patch_size=8)
    torch.save({'state_dict': vit.state_dict()}, tmp_path / 'vit.pth.tar')
    loaded = timm.create_model('vit_tiny_patch16_224', depth=1, img_size=32, patch_size=8,
                               checkpoint_path=str(tmp_path / 'vit.pth.tar'))
    assert torch.equal(loaded.head.weight, vit.head.weight)
    with pytest.raises(FileNotFoundError):
        timm.create_model('vit_tiny_patch16_224', depth=1, checkpoint_path=str(tmp_path / 'missing.pth'))


def test_missing_pretrained_file_names_it(tmp_path):
    file = str(tmp_path / 'backbone.safetensors')
    with pytest.raises(FileNotFoundError, match=f"pretrained_cfg_overlay file='{file}' does not exist"):
        timm.create_model('test_vit_mexit', pretrained=True, pretrained_cfg_overlay=dict(file=file))
