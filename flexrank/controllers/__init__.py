"""Rank controllers: plain torch objects that decide which ranks of the rank layers are active."""

from .adalora import AdaLoRAController
from .base import RankController
from .elastic import ElasticController
from .sora import SoRAController

__all__ = ["RankController", "AdaLoRAController", "ElasticController", "SoRAController"]
