"""Knowledge distillation: losses that transfer and the Distiller that applies a recipe."""

from edgeseg.distill.distiller import RECIPES, Distiller

__all__ = ["RECIPES", "Distiller"]
