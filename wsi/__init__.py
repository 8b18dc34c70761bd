"""wsi: whole-slide-image pipeline."""
__version__ = "0.1.0"
