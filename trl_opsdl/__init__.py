"""OPSDL — On-Policy Self-Distillation for Long context (arXiv 2604.17535) — for TRL."""

from .opsdl_config import OPSDLConfig
from .opsdl_trainer import OPSDLTrainer


__version__ = "0.1.0"
__all__ = ["OPSDLConfig", "OPSDLTrainer"]
