"""snzoo's models in other libraries' registries: `snzoo.integrations.timm` (and through timm,
segmentation_models_pytorch's `tu-` encoders).

This package sits on top of snzoo: nothing in snzoo imports it, and importing it imports no third-party
library; each integration module needs its library and says so in one error when it is missing.
"""
