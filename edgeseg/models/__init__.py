"""Model zoo. Importing this package registers every family."""

from edgeseg.models._registry import SegModel, create_model, list_models, register_model
from edgeseg.models import lite, malunet, microaunet, ultraseg, unet  # noqa: F401  (registration)
from edgeseg.models.counting import count_macs, count_params, count_params_thop
from edgeseg.models.fuse import fuse_model

__all__ = ["SegModel", "create_model", "list_models", "register_model", "count_params", "count_params_thop", "count_macs",
           "fuse_model"]
