""" Bakhtiarnia et al. on CIFAR-100 (001_*.txt, IV): ViT-B/16 with its original pre-trained weights, Adam, lr reduced
by 0.6 on a plateau of 2 epochs, early stopping after 5 (lr picked from {1e-3, 1e-4, 1e-5} in the paper; 1e-4 here,
``--lr`` to change).

Variants (``--variant``):
- ``classifier_wise`` (IV-A): the backbone is first fine-tuned alone, then frozen, and an exit after every block 1..11
  trained independently (``--model-kwargs exit_head=cnn_ignore`` etc. for the other branch types; ViT-EE default).
- ``end_to_end_1`` / ``end_to_end_3`` (IV-B, Tables I-II): one exit after block 6, or three after blocks 3, 6, 9,
  trained with the backbone, the final exit weighing twice an early one.

    python train_recipes/bakhtiarnia_cifar100.py --variant end_to_end_3 --data-dir /data/cifar [--dataset-download]

CIFAR images are upsampled to 224 px. CIFAR-100 has no validation split: early stopping and the plateau rule watch the
test split (the paper does not say which split it watched).
"""
import dataclasses

from timm_exits.train import Recipe, Stage, main

_ADAM = dict(opt='adam', lr=1e-4, sched='plateau', plateau_factor=0.6, plateau_patience=2, early_stop=5)

_BASE = Recipe(
    name='bakhtiarnia_cifar100',
    model='vit_base_patch16_224_mexit.orig_in21k',
    pretrained=True,
    num_classes=100,
    dataset='torch/cifar100',
    train_split='train',
    val_split='test',
    aug=dict(scale=(0.5, 1.0), color_jitter=0.),
    batch_size=32,
    stages=[],
)

RECIPES = {
    'classifier_wise': dataclasses.replace(
        _BASE, name='bakhtiarnia_cifar100_cw', model_kwargs=dict(exit_layers=list(range(1, 12)), exit_head='vit'),
        stages=[Stage('backbone', epochs=50, **_ADAM), Stage('classifier_wise', epochs=50, **_ADAM)]),
    'end_to_end_1': dataclasses.replace(
        _BASE, name='bakhtiarnia_cifar100_e2e1', model_kwargs=dict(exit_layers=[6], exit_head='vit'),
        stages=[Stage('end_to_end', epochs=50, **_ADAM)]),
    'end_to_end_3': dataclasses.replace(
        _BASE, name='bakhtiarnia_cifar100_e2e3', model_kwargs=dict(exit_layers=[3, 6, 9], exit_head='vit'),
        stages=[Stage('end_to_end', epochs=50, **_ADAM)]),
}

if __name__ == '__main__':
    main(RECIPES)
