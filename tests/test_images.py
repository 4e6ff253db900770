"""check_image on real files of each kind: good, convertible and broken."""
import io

import numpy as np
import pytest
import tensorflow as tf

from data_prep import images

HEIGHT, WIDTH = 48, 64


def _smooth_rgb() -> np.ndarray:
    """uint8 [HEIGHT, WIDTH, 3] colour gradients (JPEG keeps them nearly exact)."""
    rows = np.linspace(0, 255, HEIGHT)[:, None]
    cols = np.linspace(0, 255, WIDTH)[None, :]
    channels = [rows + 0 * cols, 0 * rows + cols, 255 - (rows + cols) / 2]
    return np.stack(channels, axis=-1).astype(np.uint8)


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _jpeg(pixels: np.ndarray, progressive: bool = False) -> bytes:
    return tf.io.encode_jpeg(pixels, quality=90, progressive=progressive).numpy()


def _decode_rgb(jpeg_bytes: bytes) -> np.ndarray:
    return tf.io.decode_jpeg(jpeg_bytes, channels=3).numpy()


def _pil_bytes(pixels: np.ndarray, mode: str, file_format: str) -> bytes:
    pil_image = pytest.importorskip("PIL.Image")
    buffer = io.BytesIO()
    pil_image.fromarray(pixels).convert(mode).save(buffer, file_format)
    return buffer.getvalue()


def _reason(path: str) -> str:
    with pytest.raises(images.ImageCheckError) as raised:
        images.check_image(path)
    assert raised.value.path == path
    assert str(raised.value) == f"{path}: {raised.value.reason}"
    return raised.value.reason


def test_rgb_jpeg_keeps_its_bytes(tmp_path):
    data = _jpeg(_smooth_rgb())
    checked = images.check_image(_write(tmp_path / "a.jpg", data))
    assert checked.jpeg_bytes == data
    assert (checked.height, checked.width, checked.conversion) == (HEIGHT, WIDTH, None)


def test_png_named_jpg_is_converted(tmp_path):
    pixels = _smooth_rgb()
    path = _write(tmp_path / "really_a_png.jpg", tf.io.encode_png(pixels).numpy())
    checked = images.check_image(path)
    assert checked.conversion == images.CONVERSION_PNG
    decoded = _decode_rgb(checked.jpeg_bytes)
    assert decoded.shape == (HEIGHT, WIDTH, 3)
    assert np.abs(decoded.astype(int) - pixels).mean() < 3


def test_transparent_png_is_flattened_on_white(tmp_path):
    rgba = np.zeros((HEIGHT, WIDTH, 4), np.uint8)
    rgba[:, : WIDTH // 2] = (255, 0, 0, 255)
    path = _write(tmp_path / "a.png", tf.io.encode_png(rgba).numpy())
    decoded = _decode_rgb(images.check_image(path).jpeg_bytes).astype(int)
    assert np.abs(decoded[HEIGHT // 2, 4] - (255, 0, 0)).max() < 8
    assert np.abs(decoded[HEIGHT // 2, WIDTH - 4] - (255, 255, 255)).max() < 8


def test_grayscale_jpeg_is_converted_to_rgb(tmp_path):
    gray = _smooth_rgb()[:, :, :1]
    checked = images.check_image(_write(tmp_path / "gray.jpg", _jpeg(gray)))
    assert checked.conversion == images.CONVERSION_GRAYSCALE
    assert tf.io.extract_jpeg_shape(checked.jpeg_bytes).numpy().tolist() == [HEIGHT, WIDTH, 3]
    decoded = _decode_rgb(checked.jpeg_bytes).astype(int)
    assert np.abs(decoded - gray).mean() < 3


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    pixels = _smooth_rgb()
    data = _pil_bytes(pixels, "CMYK", "JPEG")
    assert tf.io.extract_jpeg_shape(data).numpy()[2] == 4
    checked = images.check_image(_write(tmp_path / "cmyk.jpg", data))
    assert checked.conversion == images.CONVERSION_CMYK
    assert tf.io.extract_jpeg_shape(checked.jpeg_bytes).numpy().tolist() == [HEIGHT, WIDTH, 3]
    assert np.abs(_decode_rgb(checked.jpeg_bytes).astype(int) - pixels).mean() < 6


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("kept_fraction", [0.3, 0.9, None])
def test_truncated_jpeg_is_rejected(tmp_path, progressive, kept_fraction):
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    data = _jpeg(noisy, progressive=progressive)
    # None: everything but the 2-byte end-of-image marker.
    end = len(data) - 2 if kept_fraction is None else int(len(data) * kept_fraction)
    path = _write(tmp_path / "cut.jpg", data[:end])
    assert _reason(path) == images.REASON_TRUNCATED_JPEG


def test_jpeg_with_corrupt_scan_data_is_rejected(tmp_path):
    data = _jpeg(_smooth_rgb())
    rng = np.random.default_rng(1)
    scan_start = data.index(b"\xff\xda")
    garbage = rng.integers(0, 256, 600, dtype=np.uint8).tobytes()
    corrupt = data[: scan_start + 20] + garbage + data[-2:]
    assert _reason(_write(tmp_path / "corrupt.jpg", corrupt)) == images.REASON_CORRUPT_JPEG


def test_corrupt_png_is_rejected(tmp_path):
    data = tf.io.encode_png(_smooth_rgb()).numpy()
    path = _write(tmp_path / "a.png", data[: len(data) // 2])
    assert _reason(path) == images.REASON_CORRUPT_PNG


def test_text_file_named_jpg_is_rejected(tmp_path):
    path = _write(tmp_path / "notes.jpg", "<html>404 — not found</html>\n".encode("utf-8"))
    assert _reason(path) == images.REASON_TEXT


def test_binary_junk_is_rejected(tmp_path):
    junk = np.random.default_rng(2).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    assert _reason(_write(tmp_path / "junk.jpg", b"\x00\x01" + junk)) == images.REASON_UNKNOWN


def test_gif_is_unsupported(tmp_path):
    path = _write(tmp_path / "a.gif", _pil_bytes(_smooth_rgb(), "P", "GIF"))
    assert _reason(path) == "unsupported image format (GIF)"


def test_missing_and_empty_files_are_rejected(tmp_path):
    assert _reason(str(tmp_path / "nowhere.jpg")) == images.REASON_MISSING
    assert _reason(_write(tmp_path / "empty.jpg", b"")) == images.REASON_EMPTY
