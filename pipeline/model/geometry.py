"""Sizes and offsets of a profile's resize, crop and pad, as each reference computes them.

Pure arithmetic on (width, height) pairs, kept apart from Pillow so each rule can be
read against its source. Libraries that agree on the recipe ("shortest side to 256,
centre crop 224") still differ by a pixel in two places, and a pixel moves a crop
enough to change a model's output by more than one level (tests/model/test_profile_oracle.py):

- the long side of an aspect-keeping resize: torchvision's ``Resize(int)`` and Hugging
  Face truncate (``int(256 * long / short)``); timm's ``ResizeKeepRatio`` and tagpipe
  round;
- the offset of a centre crop: torchvision (so timm) rounds half to even
  (``int(round(d / 2.0))``); Hugging Face and tagpipe floor (``d // 2``).
"""

from __future__ import annotations

from pipeline.model.profiles import Preprocess, ResizeMode, Rounding

Size = tuple[int, int]


def cover_size(size: Size, box: Size, rounding: Rounding) -> Size:
    """Aspect kept, the image just covers box (its shortest side meets the box)."""
    width, height = size
    if rounding is Rounding.TAGPIPE:
        scale = max(box[0] / width, box[1] / height)
        return max(box[0], round(width * scale)), max(box[1], round(height * scale))
    if rounding is Rounding.HF or box[0] == box[1]:  # torchvision Resize(int) and HF: int() long side
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(box[0] * long / short)
        return (box[0], new_long) if width <= height else (new_long, box[0])
    ratio = min(height / box[1], width / box[0])  # timm ResizeKeepRatio, longest=0
    return max(1, round(width / ratio)), max(1, round(height / ratio))


def fit_size(size: Size, box: Size, rounding: Rounding) -> Size:
    """Aspect kept, the image just fits inside box (its longest side meets the box)."""
    width, height = size
    if rounding is Rounding.TIMM:  # ResizeKeepRatio, longest=1
        ratio = max(height / box[1], width / box[0])
        return max(1, round(width / ratio)), max(1, round(height / ratio))
    scale = min(box[0] / width, box[1] / height)
    return max(1, min(box[0], round(width * scale))), max(1, min(box[1], round(height * scale)))


def crop_offset(extra: int, rounding: Rounding) -> int:
    """Where a centre crop starts, given how many pixels it leaves out on one axis."""
    return (
        round(extra / 2.0) if rounding is Rounding.TIMM else extra // 2
    )  # round(): half to even, as torchvision


def centre_box(size: Size, target: Size, rounding: Rounding) -> tuple[int, int, int, int]:
    """Pillow crop box (left, top, right, bottom) of target centred in size (>= target)."""
    left, top = crop_offset(size[0] - target[0], rounding), crop_offset(size[1] - target[1], rounding)
    return left, top, left + target[0], top + target[1]


def pad_offset(extra: int) -> int:
    """Left or top padding of a centred paste: floor(d / 2) in every library."""
    return extra // 2


def resized_size(pre: Preprocess, size: Size) -> Size:
    """The size the profile resizes an upright image of size to, before crop or pad."""
    box = pre.resize_size
    if pre.resize_mode is ResizeMode.SQUASH:
        return box
    if pre.resize_mode is ResizeMode.RESIZE_CROP:
        return cover_size(size, box, pre.rounding)
    if pre.resize_mode is ResizeMode.FIT_PAD:
        return fit_size(size, box, pre.rounding)
    side = max(size)  # PAD_SQUARE: the padded square's side shrinks to the input size
    scale = min(pre.width, pre.height) / side
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))
