"""Model families; importing this package registers every model with timm."""
from .exit_heads import EXIT_HEADS, ExitHead, create_exit_head
from .multi_exit_vit import EXIT_CRITERIA, AnytimeStep, ExitOutput, MultiExitVisionTransformer
from ._base import UntrainedWeightsWarning
from .life_regress_vit import LifeRegression, LifeRegressVisionTransformer
