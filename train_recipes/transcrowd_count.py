""" Bakhtiarnia et al.'s regression setting (001_*.txt, IV): crowd counting with TransCrowd's token variant, a timm
ViT-B/16 at 384 px from DeiT-B-384 weights ([CLS] through the final norm to a one-output regressor; the GAP variant:
``--model-kwargs global_pool=avg``), L1 on raw counts, early exits after chosen blocks. Adam, lr reduced by 0.6 on a
plateau of 2 epochs, early stopping after 5; the paper picks the lr from {1e-3, 1e-4, 1e-5} (``--lr`` to search it;
1e-5 here, TransCrowd's).

Data: ``--dataset counting`` reads ``DATA_DIR/<split>/images/`` with ``points/<stem>.txt`` (one "x y" per head) or
``density/<stem>.npy`` (``python -m timm_exits.data convert-counting --format shanghaitech|jhu|disco SRC DATA_DIR``
writes them from the sets' own files). TransCrowd resizes each image to 1152 x 768 and counts the heads in each of
its six 384 px crops; eval.json gives the MAE per crop (``mae``) and TransCrowd's per image, on the sum of its crops
(``image_mae``). The crops are recorded in the checkpoint, so ``python -m timm_exits.validate --checkpoint
model.safetensors --dataset counting`` cuts the test images alike. ``val`` is a split you hold out of train.

Variants (``--variant``):
- ``end_to_end_1`` / ``end_to_end_3`` (IV-B, Tables I-II): one exit after block 6, or three after blocks 3, 6, 9,
  trained with the backbone, the final term weighing twice an early one.
- ``classifier_wise`` (IV-A): the backbone and head trained first (TransCrowd), then frozen, and an exit after every
  block 1..11 trained independently.

    python train_recipes/transcrowd_count.py --variant end_to_end_1 --data-dir /data/shanghaitech_a
"""
import dataclasses

from timm_exits.train import Recipe, Stage, main

_ADAM = dict(opt='adam', lr=1e-5, weight_decay=1e-4, sched='plateau', plateau_factor=0.6, plateau_patience=2,
             early_stop=5)
_TASK = dict(loss='l1', nll='laplace')

_BASE = Recipe(
    name='transcrowd_count',
    model='deit_base_patch16_384_mexit.fb_in1k',
    pretrained=True,
    num_classes=1,
    dataset='counting',
    train_split='train',
    val_split='val',
    test_split='test',
    aug=dict(crop=384, resize=(1152, 768)),
    batch_size=8,
    stages=[],
)

RECIPES = {
    'end_to_end_1': dataclasses.replace(
        _BASE, name='transcrowd_count_e2e1', model_kwargs=dict(task='regression', exit_layers=[6], exit_head='vit'),
        stages=[Stage('regression_end_to_end', epochs=100, task_kwargs=_TASK, **_ADAM)]),
    'end_to_end_3': dataclasses.replace(
        _BASE, name='transcrowd_count_e2e3',
        model_kwargs=dict(task='regression', exit_layers=[3, 6, 9], exit_head='vit'),
        stages=[Stage('regression_end_to_end', epochs=100, task_kwargs=_TASK, **_ADAM)]),
    'classifier_wise': dataclasses.replace(
        _BASE, name='transcrowd_count_cw',
        model_kwargs=dict(task='regression', exit_layers=list(range(1, 12)), exit_head='vit'),
        stages=[Stage('regression_backbone', epochs=100, task_kwargs=_TASK, **_ADAM),
                Stage('regression_classifier_wise', epochs=50, task_kwargs=_TASK, **_ADAM)]),
}

if __name__ == '__main__':
    main(RECIPES)
