"""One sample's bytes -> a uint8 image (C, R, R) of the configured channels and size.

Decoding is strict: the shard writer converts, crops and resizes, so an image that is not
already at the model's resolution, or whose mode cannot be used without guessing (colour for
a grayscale model, alpha, 16-bit), is bad data: `BadSample` says why, and the reader skips
and counts it. Grayscale is expanded to RGB for a 3-channel model, as is usual for mixed
photo collections.

PNG, JPEG and WebP go through torchvision's decoders (libpng / libjpeg-turbo / libwebp,
about twice as fast as PIL on small images); `raw` samples are `.npy` arrays whose header is
parsed once per shape, so reading them costs a copy and no decode.
"""
from __future__ import annotations

import ast
import warnings
from typing import Optional

import numpy as np
import torch

RAW_EXT = "npy"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
# Which member of a sample is the image: the cheapest to decode first.
SAMPLE_IMAGE_EXTS = (RAW_EXT,) + IMAGE_EXTS
REASONS = ("corrupt", "wrong_size", "wrong_mode", "no_image", "truncated", "unreadable", "empty", "uncounted",
           "no_label", "bad_label")
REASON_TEXT = {
    "corrupt": "corrupt image bytes",
    "wrong_size": "wrong image size",
    "wrong_mode": "wrong image mode",
    "no_image": "no image member (unknown extension)",
    "truncated": "truncated or corrupt tar",
    "unreadable": "shard could not be opened",
    "empty": "empty shard",
    "uncounted": "sample beyond the shard's counted length",
    "no_label": "no .cls label (the model is conditional)",
    "bad_label": ".cls label that is not a class index",
}


class BadSample(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


_NPY_MAGIC = b"\x93NUMPY"
_npy_headers: dict[bytes, tuple[np.dtype, tuple[int, ...], int, int]] = {}


def _npy_array(data: bytes) -> np.ndarray:
    if data[:6] != _NPY_MAGIC or len(data) < 10:
        raise BadSample("corrupt", "not an .npy array")
    if data[6] == 1:
        start, hlen = 10, int.from_bytes(data[8:10], "little")
    else:
        start, hlen = 12, int.from_bytes(data[8:12], "little")
    head = data[:start + hlen]
    parsed = _npy_headers.get(head)
    if parsed is None:
        try:
            meta = ast.literal_eval(head[start:].decode("latin1"))
            dtype = np.dtype(meta["descr"])
            if meta.get("fortran_order"):
                raise ValueError("Fortran order")
            shape = tuple(int(s) for s in meta["shape"])
            parsed = (dtype, shape, start + hlen, int(np.prod(shape)) if shape else 1)
        except Exception as exc:  # noqa: BLE001 - any header problem is a corrupt sample
            raise BadSample("corrupt", f"bad .npy header: {exc}") from None
        if len(_npy_headers) < 64:
            _npy_headers[head] = parsed
    dtype, shape, offset, count = parsed
    if len(data) - offset < count * dtype.itemsize:
        raise BadSample("corrupt", ".npy data is shorter than its header says")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


def preload() -> None:
    """Import the decoders once in the parent, so forked loader workers start without it."""
    import torchvision.io  # noqa: F401


def _decode_raw(data: bytes) -> np.ndarray:
    arr = _npy_array(data)
    if arr.dtype != np.uint8:
        raise BadSample("wrong_mode", f"raw array of dtype {arr.dtype}, expected uint8")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise BadSample("wrong_size", f"raw array of shape {arr.shape}, expected (H, W, C)")
    return arr.transpose(2, 0, 1)  # a view: the batch is the one copy


def _decode_compressed(data: bytes) -> np.ndarray:
    from torchvision.io import ImageReadMode, decode_image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision warns about its own decoder fallbacks
        try:
            img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
        except (RuntimeError, ValueError) as exc:
            raise BadSample("corrupt", f"cannot decode: {str(exc).splitlines()[-1][:120]}") from None
    if img.dtype != torch.uint8:
        raise BadSample("wrong_mode", f"{str(img.dtype).removeprefix('torch.')} image, expected 8-bit")
    return img.numpy()


def decode_stored(members: dict[str, Optional[bytes]]) -> np.ndarray:
    """The sample's image as stored: uint8 (C, H, W) of any size and channel count; or BadSample."""
    ext = next((e for e in SAMPLE_IMAGE_EXTS if e in members), None)
    if ext is None:
        shown = ", ".join(sorted(members)) or "none"
        raise BadSample("no_image", f"no image member (extensions: {shown})")
    data = members[ext]
    if not data:
        raise BadSample("corrupt", f"empty .{ext} member")
    return _decode_raw(data) if ext == RAW_EXT else _decode_compressed(data)


def decode_sample(members: dict[str, Optional[bytes]], channels: int, resolution: int) -> np.ndarray:
    """The sample's image as uint8 (channels, resolution, resolution), possibly a read-only
    view of the sample's bytes; or BadSample."""
    img = decode_stored(members)
    c, h, w = img.shape
    if (h, w) != (resolution, resolution):
        raise BadSample("wrong_size", f"image is {w}x{h}, expected {resolution}x{resolution}")
    if c == channels:
        return img
    if c == 1 and channels == 3:
        return np.broadcast_to(img, (3, h, w))
    names = {1: "grayscale", 2: "grayscale+alpha", 3: "RGB", 4: "RGBA or CMYK"}
    raise BadSample("wrong_mode", f"{names.get(c, f'{c}-channel')} image for model.channels={channels}")


def decode_label(members: dict[str, Optional[bytes]]) -> int:
    """The sample's class index from its `.cls` member; BadSample when it has none or it is not
    a non-negative integer (never a silent label 0)."""
    data = members.get("cls")
    if data is None:
        raise BadSample("no_label", "no .cls member, but the model is conditional")
    try:
        label = int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        label = -1
    if label < 0:
        raise BadSample("bad_label", f".cls is not a class index (a non-negative integer): {data[:20]!r}")
    return label
