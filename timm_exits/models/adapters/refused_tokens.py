""" Token-passing timm classes (besides ViT and Eva) that no adapter serves, with the reason. """
from typing import Dict

__all__ = ['REFUSED']

REFUSED: Dict[str, str] = {
    'CrossVit': 'two branches of different widths and token counts run side by side; each multi-scale block '
                'exchanges class tokens between them, so no single (B, N, C) state can be cut per block',
    'TNT': 'each block passes two tensors (pixel embeddings (B * N, P, C_in) and patch tokens (B, 1 + N, C)), '
           'the inner one not per image in its first dimension; no single state carries both',
    'Qwen3VitEncoder': 'a VLM vision encoder without a classifier (its forward_head raises)',
    'Gemma4VitEncoder': 'a VLM vision encoder without a classifier (its forward_head raises)',
    'DeepseekVitEncoder': 'a VLM vision encoder without a classifier (its forward_head raises)',
    'Qwen3VitClassifier': 'classifier wrapper over a VLM encoder (self.encoder) whose blocks take a rotary embedding '
                          'of the patch grid and whose merger/projector follows the blocks; not adapted yet',
    'Gemma4VitClassifier': 'classifier wrapper over a VLM encoder with NaFlex-style position ids, padding masks and '
                           'rope passed to every block; not adapted yet',
    'DeepseekVitClassifier': 'classifier wrapper over a VLM encoder whose blocks take a rotary embedding of the patch '
                             'grid; not adapted yet',
}
