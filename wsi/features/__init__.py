"""Tile features: the encoder registry (:mod:`.encoders`) and cohort extraction on Dask (:mod:`.extract`)."""

from .encoders import Encoder, EncoderSpec, list_encoders, load_encoder, register_encoder
from .extract import ExtractConfig, extract_cohort, h5_path

__all__ = ["Encoder", "EncoderSpec", "ExtractConfig", "extract_cohort", "h5_path", "list_encoders",
           "load_encoder", "register_encoder"]
