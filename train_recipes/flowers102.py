""" Seed 004's setting done so that the exits train: Oxford Flowers102, ViT-B/16 (torchvision's ImageNet weights are
timm's ``orig_in21k_ft_in1k``), a classifier after every encoder layer, lr 0.001, batch 32, backbone frozen for four
epochs and unfrozen for the last one (004's best schedule, 86 % test accuracy for the final head).

Why 004's exits never trained: its log shows every exit's top probability near 1/102 and the same class, epoch after
epoch: the branches never received a gradient (frozen along with the backbone, outside the optimizer, or outside the
loss). Here stage 1 is classifier-wise training with the final head trained too (``train_head=True``): every exit has
its own loss term and trainable parameters while the backbone is frozen; stage 2 unfreezes everything end to end.
The tests check that every exit's parameters move.

    python train_recipes/flowers102.py --data-dir /data/flowers [--dataset-download]

Adam is our choice (004 does not name its optimizer).
"""
from timm_exits.train import Recipe, Stage, main

RECIPE = Recipe(
    name='flowers102',
    model='vit_base_patch16_224_mexit.orig_in21k_ft_in1k',
    pretrained=True,
    model_kwargs=dict(exit_layers=list(range(1, 12)), exit_head='linear'),
    num_classes=102,
    dataset='torch/flowers102',
    train_split='train',
    val_split='val',
    test_split='test',
    batch_size=32,
    stages=[
        Stage('classifier_wise', epochs=4, opt='adam', lr=1e-3, sched='none', task_kwargs=dict(train_head=True),
              name='frozen backbone'),
        Stage('end_to_end', epochs=1, opt='adam', lr=1e-3, sched='none', name='unfrozen'),
    ],
)

if __name__ == '__main__':
    main(RECIPE)
