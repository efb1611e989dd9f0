"""Model architectures: ImageNet ResNet v1 / v2 and CIFAR ResNets with SN, SSN, BN or GN, registered by name."""

from snzoo.models.registry import ARCHITECTURES, ArchitectureSpec, get_architecture, list_architectures
from snzoo.models.resnet import ResNet
from snzoo.models.resnet_cifar import ResNetCifar

__all__ = ["ARCHITECTURES", "ArchitectureSpec", "ResNet", "ResNetCifar", "get_architecture", "list_architectures"]
