"""Encoder backbones by name: `build_encoder({"name": ..., **kwargs})`; see README.md in this folder."""
from pretrain.encoders.base import Encoder, available_encoders, build_encoder, register_encoder

__all__ = ["Encoder", "available_encoders", "build_encoder", "register_encoder"]
