""" LifeRegress on ImageNet-1k (003_*.txt, III-C, IV): DeiT-S, lives predicted after block 3, patches leaving after
blocks 4, 7, 10, U = 1.5, AdamW, batch 128, two epochs of fine-tuning.

Variants (``--variant``):
- ``two_stage`` (Algorithm 1): one epoch training the life predictor alone at lr 1e-5 (backbone frozen), then one
  epoch fine-tuning the backbone at lr 1e-3 (predictor frozen). The learning rates are the paper's as printed.
- ``single_stage`` (Table IV ablation): two epochs training both together, with the same two learning rates.

    python train_recipes/liferegress_imagenet.py --variant two_stage --data-dir /data/imagenet

``--data-dir`` holds ImageFolder ``train/`` and ``val/`` folders. The weight decay (0.05, DeiT's) and the constant
learning rate within a stage are our choices. The final evaluation reports rho = 1.0, 0.9, 0.8, 0.7.
"""
from timm_exits.train import Recipe, Stage, main

_ADAMW = dict(opt='adamw', weight_decay=0.05, sched='none')

_BASE = dict(
    model='deit_small_liferegress', pretrained=True, num_classes=1000, dataset='folder', train_split='train',
    val_split='val', batch_size=128, workers=8)

RECIPES = {
    'two_stage': Recipe(name='liferegress_imagenet_two_stage', **_BASE, stages=[
        Stage('liferegress', epochs=1, lr=1e-5, task_kwargs=dict(stage='predictor'), name='predictor', **_ADAMW),
        Stage('liferegress', epochs=1, lr=1e-3, task_kwargs=dict(stage='backbone'), name='backbone', **_ADAMW),
    ]),
    'single_stage': Recipe(name='liferegress_imagenet_single_stage', **_BASE, stages=[
        Stage('liferegress', epochs=2, lr=1e-3, part_lrs={'life': 1e-5}, task_kwargs=dict(stage='joint'),
              name='joint', **_ADAMW),
    ]),
}

if __name__ == '__main__':
    main(RECIPES)
