"""edgeseg: tiny polyp-segmentation networks from training to verified edge deployment."""

__version__ = "0.1.0"
