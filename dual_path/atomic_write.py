"""Whole-file writes: a reader sees the old file or the new one, never a partial one."""
import tensorflow as tf

TMP_SUFFIX = ".tmp"


def write_atomically(path: str, data: bytes) -> None:
    """Writes data to path + TMP_SUFFIX, then renames it over path (any tf.io.gfile path)."""
    tmp_path = path + TMP_SUFFIX
    with tf.io.gfile.GFile(tmp_path, "wb") as out_file:
        out_file.write(data)
    tf.io.gfile.rename(tmp_path, path, overwrite=True)
