"""Model architectures (ImageNet ResNet v1 / v2 and CIFAR ResNets with SN, SSN, BN or GN), registered by name,
and the one builder that makes them and loads checked weights into them."""

from snzoo.models.registry import (
    ARCHITECTURES,
    NORMS,
    ArchitectureSpec,
    get_architecture,
    list_architectures,
    unknown_name_message,
)
from snzoo.models.resnet import ResNet
from snzoo.models.resnet_cifar import ResNetCifar
from snzoo.models._features import FeatureInfo, FeatureListNet
from snzoo.models._builder import (
    CLASSIFIER_PREFIX,
    adapt_input_conv,
    build_model,
    check_finite,
    check_state_dict,
    check_values,
    compare_state_dict,
    infer_model_kwargs,
    load_checked,
    skeleton,
)

__all__ = [
    "ARCHITECTURES", "CLASSIFIER_PREFIX", "NORMS", "ArchitectureSpec", "FeatureInfo", "FeatureListNet", "ResNet",
    "ResNetCifar", "adapt_input_conv", "build_model",
    "check_finite", "check_state_dict", "check_values", "compare_state_dict", "get_architecture", "infer_model_kwargs", "list_architectures",
    "load_checked", "skeleton", "unknown_name_message",
]
