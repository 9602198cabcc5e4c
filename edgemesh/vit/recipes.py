"""Model shape and training settings per dataset: small enough to train on a CPU in minutes."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from edgemesh.vit.datasets import Dataset
from edgemesh.vit.model import ViT, ViTConfig
from edgemesh.vit.split import SplitConfig
from edgemesh.vit.train import Progress, TrainConfig, train_classifier


@dataclass(frozen=True)
class Recipe:
    patch_size: int
    dim: int
    depth: int
    heads: int
    mlp_ratio: float
    train: TrainConfig
    split: SplitConfig

    def config(self, data: Dataset) -> ViTConfig:
        mean, std = data.stats()
        return ViTConfig.uniform(image_size=data.image_size, patch_size=self.patch_size, in_chans=data.in_chans,
                                 num_classes=data.num_classes, dim=self.dim, depth=self.depth, heads=self.heads,
                                 mlp_ratio=self.mlp_ratio, mean=mean, std=std, labels=data.labels)

    def with_epochs(self, epochs: int | None, seed: int | None = None) -> Recipe:
        """Same recipe with ``epochs`` for training and fine-tuning, and ``seed`` everywhere."""
        r = self
        if epochs is not None:
            r = replace(r, train=replace(r.train, epochs=epochs), split=replace(r.split, finetune=replace(r.split.finetune, epochs=epochs)))
        if seed is not None:
            r = replace(r, train=replace(r.train, seed=seed),
                        split=replace(r.split, finetune=replace(r.split.finetune, seed=seed),
                                      fusion=replace(r.split.fusion, seed=seed)))
        return r


_SMALL = Recipe(patch_size=2, dim=32, depth=2, heads=2, mlp_ratio=2.0,
                train=TrainConfig(epochs=30, batch_size=64, lr=3e-3),
                split=SplitConfig(finetune=TrainConfig(epochs=25, batch_size=64, lr=4e-3),
                                  fusion=TrainConfig(epochs=30, batch_size=64, lr=3e-3, weight_decay=0.01)))
_MNIST = Recipe(patch_size=7, dim=64, depth=4, heads=4, mlp_ratio=2.0,
                train=TrainConfig(epochs=3, batch_size=128, lr=2e-3),
                split=SplitConfig(finetune=TrainConfig(epochs=3, batch_size=128, lr=1.5e-3)))

RECIPES = {"digits": _SMALL, "mnist": _MNIST, "fashion-mnist": _MNIST}


def recipe_for(dataset: str) -> Recipe:
    return RECIPES.get(dataset, _MNIST)


def train_model(data: Dataset, recipe: Recipe, *, progress: Progress | None = None) -> ViT:
    """A freshly initialised ViT (seeded) trained on ``data``."""
    torch.manual_seed(recipe.train.seed)
    model = ViT(recipe.config(data))
    train_classifier(model, data.train_x, data.train_y, recipe.train, progress=progress)
    return model
