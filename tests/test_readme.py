"""Every ```python block of the README runs, in order, in one namespace (as a reader would paste them).

Blocks that need weights get tiny stand-ins (no download): every model is built at ``embed_dim=192, num_heads=3`` (ViT-Ti's width)
(depth, patch size, input size and exits as written, so the README's layouts and cost shares keep their meaning);
``pretrained=True`` loads, through the real pretrained path (``pretrained_cfg_overlay=dict(file=...)``), a
random-weight file of what would have been downloaded: the timm parent's checkpoint for a ``*_mexit`` /
``*_liferegress`` name (so the untrained-exits warning is real), the whole model for a published name;
``hf-hub:`` and ``local-dir:`` names load a folder exported with ``timm_exits.hub.export``; the ONNX folder the
deployment example opens is a staged export (``timm_exits.export``) of a tiny multi-exit model at 224 px.
"""
import re
import warnings
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from safetensors.torch import save_file

import timm
from timm_exits.hub import export
from timm_exits.models.adapters import parent_modules

README = Path(__file__).resolve().parents[1] / 'README.md'
SMALL = dict(embed_dim=192, num_heads=3)


def python_blocks() -> List[str]:
    return re.findall(r'^```python\n(.*?)^```', README.read_text(), flags=re.S | re.M)


def _small(name: str) -> Dict[str, Any]:
    """``SMALL`` (a tiny ViT) for the ViT / Eva models and this package's named ones; a CNN's own arguments stay."""
    base = re.sub(r'_(mexit_liferegress|mexit|liferegress)$', '', name.split('.', 1)[0])
    module = timm.models._registry._model_to_module.get(base)
    return {} if module in set(parent_modules('mexit')) - set(parent_modules('liferegress')) else SMALL


class StandIns:
    """``timm.create_model`` with tiny models and locally made weight files."""

    def __init__(self, real: Any, tmp: Path) -> None:
        self.real, self.tmp, self.calls = real, tmp, []
        self._export = None

    def _file(self, name: str, **kwargs: Any) -> str:
        path = self.tmp / f'{name}.safetensors'
        if not path.exists():
            model = self.real(name, pretrained=False, **SMALL, **kwargs)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        return str(path)

    def exported(self) -> str:
        """A Hub folder (config.json, model.safetensors, card) of a tiny ``vit_b16_mexit_cars``."""
        if self._export is None:
            model = self.real('vit_b16_mexit_cars', pretrained=False, **SMALL)
            self._export = str(export(model, self.tmp / 'export', 'vit_b16_mexit_cars', 'timm-exits/vit_b16_mexit_cars'))
        return self._export

    def __call__(self, name: str, pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
        self.calls.append(name)
        if name.startswith(('hf-hub:', 'local-dir:')):
            return self.real(f'local-dir:{self.exported()}', pretrained=pretrained, **kwargs)
        kwargs = {**_small(name), **kwargs}
        if pretrained:
            hub_id = timm.models.get_pretrained_cfg(name).hf_hub_id or ''
            parent = hub_id.split('/', 1)[1].split('.', 1)[0] if hub_id.startswith('timm/') else None
            file = self._file(parent) if parent else self._file(name.split('.', 1)[0])
            kwargs['pretrained_cfg_overlay'] = dict(file=file, **kwargs.get('pretrained_cfg_overlay', {}))
        return self.real(name, pretrained=pretrained, **kwargs)


def test_readme_has_python_blocks():
    assert len(python_blocks()) >= 4


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    from timm_exits.export import export_onnx
    monkeypatch.chdir(tmp_path)
    tiny = timm.create_model('test_vit_mexit', img_size=224, patch_size=16, exit_layers=(2,)).eval()
    export_onnx(tiny, tmp_path / 'exports' / 'cars_onnx')  # the folder the deployment example opens
    stand_ins = StandIns(timm.create_model, tmp_path)
    monkeypatch.setattr(timm, 'create_model', stand_ins)
    namespace: Dict[str, Any] = {'__name__': '__readme__'}
    for i, block in enumerate(python_blocks()):
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            try:
                exec(compile(block, f'README.md python block {i + 1}', 'exec'), namespace)
            except Exception as e:  # noqa: BLE001  name the block that fails
                pytest.fail(f'README python block {i + 1} fails: {type(e).__name__}: {e}\n{block}')
    assert stand_ins.calls, 'no README block created a model'
