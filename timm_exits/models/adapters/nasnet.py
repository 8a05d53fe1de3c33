""" NASNet-A and PNASNet-5 (timm's ``NASNetALarge``, ``PNASNet5Large``): refused, no adapter. """
from typing import Dict

__all__ = ['REFUSED']

REFUSED: Dict[str, str] = {
    'NASNetALarge': 'every cell takes the outputs of the two cells before it (of different sizes across a reduction '
                    'cell), so no point between cells holds one feature map to exit from',
    'PNASNet5Large': 'every cell takes the outputs of the two cells before it, so no point between cells holds one '
                     'feature map to exit from',
}
