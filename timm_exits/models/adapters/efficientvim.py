""" Refusal for timm's ``EfficientViM`` and ``EfficientViMDistilled``: no single map between blocks. """
from typing import Dict

__all__ = ['REFUSED']

REFUSED: Dict[str, str] = {
    name: 'its head fuses the normalised hidden states of every stage (forward_features returns a list of them, '
          'each block returns a (map, hidden state) pair), so no single map after a block carries what the logits need'
    for name in ('EfficientViM', 'EfficientViMDistilled')
}
