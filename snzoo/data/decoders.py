"""Image decoders of the evaluation datasets: PIL (the published protocol's) or torchvision's libjpeg-turbo.

``pil`` gives 8-bit RGB PIL images for the PIL eval transform. ``torchvision`` decodes JPEG bytes with
``torchvision.io.decode_jpeg`` straight to a ``(3, H, W)`` uint8 tensor (grayscale and CMYK converted to RGB by
libjpeg) for the tensor eval transform; every other format, and any JPEG libjpeg refuses, goes through the
same PIL decoding as ``pil`` and is then turned into a tensor, so a corrupt file fails (or is skipped) with the
same one-line error under both decoders.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Union

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from snzoo.errors import DataError

DECODERS = ("pil", "torchvision")
_JPEG_MAGIC = b"\xff\xd8\xff"

Decoded = Union[Image.Image, torch.Tensor]


def check_decoder(name: str) -> str:
    """`name` when it is one of DECODERS, else a DataError listing them."""
    if name not in DECODERS:
        raise DataError(f"unknown image decoder {name!r}; expected one of {', '.join(DECODERS)}")
    return name


def jpeg_to_tensor(data: bytes) -> Optional[torch.Tensor]:
    """JPEG bytes as a (3, H, W) uint8 RGB tensor, or None for data that is not a JPEG libjpeg can decode."""
    if not data.startswith(_JPEG_MAGIC):
        return None
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs in favour of torchcodec; they still work and are the fast path.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            # Truncated or corrupt: PIL decodes it again and raises the error the pil decoder would.
            return None


def decode_with(decoder: str, data: Optional[bytes], pil: Callable[[], Image.Image]) -> Decoded:
    """The image as `decoder` delivers it: `pil()` (PIL decoding, which raises for bad data) for "pil"; for
    "torchvision" the tensor of `data` (the encoded bytes, None when they could not be read), else `pil()`'s."""
    if decoder == "torchvision":
        tensor = jpeg_to_tensor(data) if data is not None else None
        return tensor if tensor is not None else pil_to_tensor(pil())
    return pil()
