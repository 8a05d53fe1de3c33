""" Shallow-Deep Networks' IC-only training (Kaya et al., ICML 2019) on a frozen pretrained CNN: internal classifiers
('sdn' heads: alpha * maxpool + (1 - alpha) * avgpool to 4 x 4, one Linear) after the blocks nearest 15, 30, 45, 60,
75 and 90 % of the network's FLOPs, the backbone and its final classifier frozen, only the exit heads trained.

Their setting: Adam, lr 1e-3, 25 epochs, lr x0.1 at epoch 15 (0-based, timm's multistep), the loss the unweighted sum
of the internal classifiers' cross-entropies. Their loop also updated the frozen network's BatchNorm statistics; here
the frozen backbone runs in eval mode (``tasks.freeze_modes``): its weights and statistics stay bit-identical, so the
final head's accuracy cannot move. The uncertainty units (MEViT's criterion) get no loss (``uncertainty_weight=0``):
SDN exits on the max softmax (``exit_criterion='confidence'``).

timm's ImageNet weights give a backbone and a final head trained on the same data, the setting of IC-only training:

    python train_recipes/sdn_ic_only.py --data-dir /data/imagenet [--model resnet18.a1_in1k]

``--model`` takes any parent an adapter serves (the twin is built: ``resnet18`` -> ``resnet18_mexit``); a CNN trained
on another dataset comes in with ``--init-checkpoint`` (backbone and head of that dataset, ``--model-kwargs
num_classes=N``).
"""
from timm_exits.train import Recipe, Stage, main

RECIPE = Recipe(
    name='sdn_ic_only',
    model='resnet50_mexit.a1_in1k',
    pretrained=True,
    model_kwargs=dict(exit_head='sdn', exit_criterion='confidence'),
    dataset='folder',
    train_split='train',
    val_split='val',
    batch_size=128,
    stages=[
        Stage('classifier_wise', epochs=25, opt='adam', lr=1e-3, sched='step', decay_epochs=(15,), decay_rate=0.1,
              task_kwargs=dict(exit_weight=1., uncertainty_weight=0.), name='IC-only'),
    ],
)

if __name__ == '__main__':
    main(RECIPE)
