"""Training: recipes, batches from generated scenes, losses, and the stage driver."""

from .loop import Trainer
from .recipe import RECIPES, STAGES, Recipe, StageConfig, get_recipe

__all__ = ["RECIPES", "STAGES", "Recipe", "StageConfig", "Trainer", "get_recipe"]
