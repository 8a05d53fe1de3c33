""" MEViT on Stanford Cars (000_*.txt, sec. 3.1): ViT-B/16 pre-trained on ImageNet-21k, linear exits after blocks 6..11
with uncertainty predictors, sandwich rule + in-place distillation (eqs. 1-5), 448 px (TransFG's augmentation: resize
to 600, random crop 448, flip), SGD momentum 0.9, cosine schedule, lr 0.003, batch 32.

    python train_recipes/mevit_cars.py --data-dir /data/stanford_cars [--output output/mevit_cars] [--dataset-download]

Not in the seed (our choices): 40 epochs (TransFG's 10k steps at this batch), no warm-up, no weight decay, two exits
sampled besides the earliest per step (slimmable networks' sandwich rule), and the test split as validation set (Cars
has no other). Use ``vit_base_patch16_224_mexit.orig_in21k`` for the original ViT weights.
"""
from timm_exits.train import Recipe, Stage, main

RECIPE = Recipe(
    name='mevit_cars',
    model='vit_base_patch16_224_mexit.augreg_in21k',
    pretrained=True,
    model_kwargs=dict(img_size=448, exit_head='linear', exit_criterion='uncertainty'),  # as vit_b16_mexit_cars
    num_classes=196,
    dataset='torch/stanford_cars',
    train_split='train',
    val_split='test',
    resize_crop=600,
    batch_size=32,
    stages=[Stage('mevit', epochs=40, opt='momentum', lr=3e-3, momentum=0.9, sched='cosine',
                  task_kwargs=dict(num_sampled=2))],
)

if __name__ == '__main__':
    main(RECIPE)
