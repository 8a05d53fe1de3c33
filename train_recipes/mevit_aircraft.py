""" MEViT on FGVC-Aircraft (000_*.txt, sec. 3.1): as ``mevit_cars.py`` (ViT-B/16 from ImageNet-21k at 448 px, linear
exits after blocks 6..11, sandwich rule + in-place distillation, SGD momentum 0.9, cosine, batch 32) with lr 0.001.

    python train_recipes/mevit_aircraft.py --data-dir /data/fgvc_aircraft [--dataset-download]

Trains on 'trainval' (6667 images) and validates on 'test' (100 variants). Epochs, no warm-up and two sampled exits per
step are our choices (not in the seed).
"""
import dataclasses

from timm_exits.train import Stage, main

from mevit_cars import RECIPE as CARS

RECIPE = dataclasses.replace(
    CARS,
    name='mevit_aircraft',
    num_classes=100,
    dataset='torch/fgvc_aircraft',
    train_split='trainval',
    val_split='test',
    stages=[Stage('mevit', epochs=40, opt='momentum', lr=1e-3, momentum=0.9, sched='cosine',
                  task_kwargs=dict(num_sampled=2))],
)

if __name__ == '__main__':
    main(RECIPE)
