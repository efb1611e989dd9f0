"""Model architectures: ResNet v1 / v2 with SN, SSN, BN or GN, registered by name."""

from snzoo.models.registry import ARCHITECTURES, ArchitectureSpec, get_architecture, list_architectures
from snzoo.models.resnet import ResNet

__all__ = ["ARCHITECTURES", "ArchitectureSpec", "ResNet", "get_architecture", "list_architectures"]
