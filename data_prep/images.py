"""Checks one image file and returns it as RGB JPEG bytes, decoding it once.

Image shards hold only RGB JPEGs that `tf.io.decode_jpeg(channels=3)` decodes, the
decoder the training pipeline uses. `check_image` decodes every file fully with the
same TensorFlow decoder, so that a truncated or corrupt file fails here rather than in
the middle of training:

* an RGB (3-component) JPEG keeps its original bytes;
* a grayscale or CMYK JPEG, and any PNG (whatever its file name says), is re-encoded
  as an RGB JPEG of quality JPEG_QUALITY; `CheckedImage.conversion` names which;
* anything else raises ImageCheckError with one short reason (see the REASON_*
  constants), so that skipped files can be counted per reason.

TensorFlow's JPEG decoder rejects a file that ends before its last scan (its default
`acceptable_fraction=1`), and a file that ends without the end-of-image marker is
reported as truncated rather than corrupt.
"""
import dataclasses

import numpy as np
import tensorflow as tf

JPEG_QUALITY = 95

CONVERSION_PNG = "png"
CONVERSION_GRAYSCALE = "grayscale"
CONVERSION_CMYK = "cmyk"
CONVERSIONS = (CONVERSION_PNG, CONVERSION_GRAYSCALE, CONVERSION_CMYK)

REASON_MISSING = "file not found"
REASON_EMPTY = "empty file"
REASON_TRUNCATED_JPEG = "truncated JPEG"
REASON_CORRUPT_JPEG = "corrupt JPEG"
REASON_CORRUPT_PNG = "corrupt PNG"
REASON_TEXT = "not an image (text file)"
REASON_UNKNOWN = "not an image (unrecognised content)"

_JPEG_SIGNATURE = b"\xff\xd8\xff"
_JPEG_END_OF_IMAGE = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Image formats recognised by their first bytes but not stored in shards.
_UNSUPPORTED_SIGNATURES = {
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}
_RIFF_SIGNATURE = b"RIFF"
_WEBP_TAG = b"WEBP"
# Bytes looked at to tell a text file from binary content.
_TEXT_SNIFF_BYTES = 4096
_JPEG_COMPONENTS_TO_CONVERSION = {1: CONVERSION_GRAYSCALE, 3: None, 4: CONVERSION_CMYK}


class ImageCheckError(Exception):
    """An image file that cannot be stored: `path` and a short `reason`."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class CheckedImage:
    """An image that passed the check.

    jpeg_bytes: an RGB JPEG (the file's own bytes unless converted).
    height, width: in pixels.
    conversion: None when the file was already an RGB JPEG, else one of CONVERSIONS.
    """

    jpeg_bytes: bytes
    height: int
    width: int
    conversion: str | None


def _looks_like_text(data: bytes) -> bool:
    sample = data[:_TEXT_SNIFF_BYTES]
    if b"\x00" in sample:
        return False
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as error:
        # A multi-byte character cut off at the end of the sample is still text.
        return error.start >= len(sample) - 3
    return True


def _unsupported_format(data: bytes) -> str | None:
    for signature, format_name in _UNSUPPORTED_SIGNATURES.items():
        if data.startswith(signature):
            return format_name
    if data.startswith(_RIFF_SIGNATURE) and data[8:12] == _WEBP_TAG:
        return "WebP"
    return None


def _encode_rgb(pixels: tf.Tensor) -> bytes:
    """uint8 [height, width, 3] -> JPEG bytes of quality JPEG_QUALITY."""
    return tf.io.encode_jpeg(pixels, quality=JPEG_QUALITY).numpy()


def _check_jpeg(path: str, data: bytes) -> CheckedImage:
    try:
        components = int(tf.io.extract_jpeg_shape(data)[2])
        pixels = tf.io.decode_jpeg(data, channels=3)
    except tf.errors.InvalidArgumentError as error:
        if not data.rstrip(b"\x00").endswith(_JPEG_END_OF_IMAGE):
            raise ImageCheckError(path, REASON_TRUNCATED_JPEG) from error
        raise ImageCheckError(path, REASON_CORRUPT_JPEG) from error
    if components not in _JPEG_COMPONENTS_TO_CONVERSION:
        raise ImageCheckError(path, f"unsupported JPEG with {components} colour components")
    conversion = _JPEG_COMPONENTS_TO_CONVERSION[components]
    height, width = int(pixels.shape[0]), int(pixels.shape[1])
    jpeg_bytes = data if conversion is None else _encode_rgb(pixels)
    return CheckedImage(jpeg_bytes, height, width, conversion)


def _flatten_on_white(pixels: np.ndarray) -> np.ndarray:
    """uint8 [height, width, 1..4] (gray, gray+alpha, RGB, RGBA) -> uint8 [height, width, 3]."""
    channels = pixels.shape[2]
    color = pixels[:, :, :3] if channels >= 3 else np.repeat(pixels[:, :, :1], 3, axis=2)
    if channels in (2, 4):
        alpha = pixels[:, :, -1:].astype(np.float32) / 255.0
        color = np.round(color * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return color


def _check_png(path: str, data: bytes) -> CheckedImage:
    try:
        pixels = tf.io.decode_png(data, channels=0).numpy()
    except tf.errors.InvalidArgumentError as error:
        raise ImageCheckError(path, REASON_CORRUPT_PNG) from error
    rgb = _flatten_on_white(pixels)
    return CheckedImage(_encode_rgb(rgb), rgb.shape[0], rgb.shape[1], CONVERSION_PNG)


def check_image(path: str) -> CheckedImage:
    """Reads and fully decodes one image file.

    Args:
      path: the image file (any path tf.io.gfile reads).
    Returns:
      CheckedImage with RGB JPEG bytes that tf.io.decode_jpeg(channels=3) decodes.
    Raises:
      ImageCheckError: with one of the REASON_* reasons, or an "unsupported ..." one.
    """
    if not tf.io.gfile.exists(path):
        raise ImageCheckError(path, REASON_MISSING)
    try:
        with tf.io.gfile.GFile(path, "rb") as image_file:
            data = image_file.read()
    except tf.errors.OpError as error:
        raise ImageCheckError(path, f"cannot read file ({error.message})") from error
    if not data:
        raise ImageCheckError(path, REASON_EMPTY)
    if data.startswith(_JPEG_SIGNATURE):
        return _check_jpeg(path, data)
    if data.startswith(_PNG_SIGNATURE):
        return _check_png(path, data)
    unsupported = _unsupported_format(data)
    if unsupported is not None:
        raise ImageCheckError(path, f"unsupported image format ({unsupported})")
    if _looks_like_text(data):
        raise ImageCheckError(path, REASON_TEXT)
    raise ImageCheckError(path, REASON_UNKNOWN)
