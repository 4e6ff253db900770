"""Image-text retrieval with an exported SavedModel (`dual_path.export`): an index of
embeddings, text -> image and image -> caption queries, word importance. Their results
are drawn (contact sheets, word charts) by experiments/search_render.py.

Scores are cosine similarities (dot products of L2-normalised embeddings), in -1..1.

The index (`SearchIndex`, saved as one .npz, no pickles) holds the image embeddings of
either a folder of images (*.jpg, *.jpeg, *.png, recursively) or one split of a shard
dir; a shard index also holds that split's captions and their embeddings, so that an
image can be answered with captions. Its images are found again by their file paths
(folder) or by their index in the split's image shards.
"""
import dataclasses
import io
import os
from typing import NamedTuple, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from dual_path import export, input_pipeline, shard_format, text
from dual_path.atomic_write import write_atomically

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
DEFAULT_BATCH_SIZE = 64
FOLDER = "folder"
SHARDS = "shards"
SOURCE_KINDS = (FOLDER, SHARDS)
_INDEX_KEYS = ("model", "source_kind", "source", "split", "image_names", "image_embeddings",
               "captions", "caption_image", "caption_embeddings", "skipped_paths",
               "skipped_reasons")


class Encoders:
    """The exported SavedModel's encode_images and encode_texts, numpy in and out.

    Args:
      export_dir: a folder written by `dual_path.export.export_run`.
    """

    def __init__(self, export_dir: str):
        if not tf.saved_model.contains_saved_model(export_dir):
            raise FileNotFoundError(f"{export_dir}: no SavedModel there (run dual-path-export)")
        self.export_dir = export_dir
        signatures = tf.saved_model.load(export_dir).signatures
        missing = [name for name in ("encode_images", "encode_texts") if name not in signatures]
        if missing:
            raise ValueError(f"{export_dir}: the SavedModel has no signature {missing[0]!r}")
        self._encode_images = signatures["encode_images"]
        self._encode_texts = signatures["encode_texts"]

    def images(self, image_bytes: Sequence[bytes] | tf.Tensor) -> np.ndarray:
        """JPEG/PNG file contents [B] -> float32 [B, D], L2-normalised rows.

        Raises tf.errors.InvalidArgumentError when one of them is not a decodable image.
        """
        batch = tf.convert_to_tensor(image_bytes, tf.string)
        return self._encode_images(image_bytes=batch)[export.EMBEDDINGS_KEY].numpy()

    def texts(self, sentences: Sequence[str]) -> np.ndarray:
        """Raw sentences [B] -> float32 [B, D]; L2-normalised rows, except rows of zeros for
        sentences with no word in the model's vocabulary."""
        batch = tf.constant(list(sentences), tf.string)
        return self._encode_texts(sentences=batch)[export.EMBEDDINGS_KEY].numpy()

    def texts_in_batches(self, sentences: Sequence[str], batch_size: int) -> np.ndarray:
        """`texts` over any number of sentences, batch_size at a time: float32 [M, D]."""
        if not sentences:
            raise ValueError("no sentences to embed")
        return np.concatenate([self.texts(sentences[start:start + batch_size])
                               for start in range(0, len(sentences), batch_size)])


@dataclasses.dataclass(frozen=True)
class SearchIndex:
    """Embeddings of N images (and, from shards, of their split's M captions).

    model: the export dir the embeddings were made with, as it was given (queries must use
      the same model).
    source_kind: FOLDER or SHARDS; source: the images folder or the shard dir.
    split: the shards' split ("" for a folder).
    image_names: str [N]: file paths (folder) or the shards' image/filename.
    image_embeddings: float32 [N, D], L2-normalised rows; row n of a shard index is image
      index n of the split.
    captions: str [M] raw captions; caption_image: int32 [M], the image row of each;
      caption_embeddings: float32 [M, D]. M = 0 for a folder.
    skipped: (path, reason) of each image that could not be read or decoded.
    """

    model: str
    source_kind: str
    source: str
    split: str
    image_names: list[str]
    image_embeddings: np.ndarray
    captions: list[str]
    caption_image: np.ndarray
    caption_embeddings: np.ndarray
    skipped: list[tuple[str, str]]

    def save(self, path: str) -> None:
        """Writes the index as one .npz (`write_atomically`), creating its folder."""
        buffer = io.BytesIO()
        np.savez(
            buffer,
            model=np.str_(self.model), source_kind=np.str_(self.source_kind),
            source=np.str_(self.source), split=np.str_(self.split),
            image_names=np.array(self.image_names, dtype=np.str_),
            image_embeddings=self.image_embeddings.astype(np.float32),
            captions=np.array(self.captions, dtype=np.str_),
            caption_image=self.caption_image.astype(np.int32),
            caption_embeddings=self.caption_embeddings.astype(np.float32),
            skipped_paths=np.array([path for path, _ in self.skipped], dtype=np.str_),
            skipped_reasons=np.array([reason for _, reason in self.skipped], dtype=np.str_))
        directory = os.path.dirname(path)
        if directory:
            tf.io.gfile.makedirs(directory)
        write_atomically(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str) -> "SearchIndex":
        """Reads an index written by `save`; ValueError naming the file if it is not one."""
        try:
            with tf.io.gfile.GFile(path, "rb") as source:
                arrays = np.load(io.BytesIO(source.read()), allow_pickle=False)
                values = {key: arrays[key] for key in _INDEX_KEYS}
        except tf.errors.NotFoundError as error:
            raise FileNotFoundError(f"{path}: no such index (build it with the index command)") \
                from error
        except (KeyError, ValueError, OSError) as error:
            raise ValueError(f"{path}: not a search index: {error}") from error
        index = cls(
            model=str(values["model"]), source_kind=str(values["source_kind"]),
            source=str(values["source"]), split=str(values["split"]),
            image_names=values["image_names"].tolist(),
            image_embeddings=values["image_embeddings"], captions=values["captions"].tolist(),
            caption_image=values["caption_image"],
            caption_embeddings=values["caption_embeddings"],
            skipped=list(zip(values["skipped_paths"].tolist(),
                             values["skipped_reasons"].tolist())))
        if (index.source_kind not in SOURCE_KINDS
                or len(index.image_names) != len(index.image_embeddings)
                or len(index.captions) != len(index.caption_image)
                or len(index.captions) != len(index.caption_embeddings)):
            raise ValueError(f"{path}: not a search index: inconsistent fields")
        return index


def find_images(folder: str) -> list[str]:
    """Every *.jpg, *.jpeg and *.png under folder (any depth, any case), sorted."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder")
    found = []
    for directory, subdirectories, names in os.walk(folder):
        subdirectories.sort()
        found.extend(os.path.join(directory, name) for name in names
                     if name.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(found)


def _skip(skipped: list[tuple[str, str]], path: str, reason: str) -> None:
    logging.warning("skipped %s: %s", path, reason)
    skipped.append((path, reason))


def _first_line(error: Exception) -> str:
    message = getattr(error, "message", None) or str(error)
    return message.strip().splitlines()[0] if message.strip() else type(error).__name__


def _encode_files(encoders: Encoders, paths: Sequence[str],
                  skipped: list[tuple[str, str]]) -> tuple[list[str], list[np.ndarray]]:
    """Embeds one batch of files; a file that cannot be read or decoded is skipped (and
    logged), the others are kept. Returns the kept paths and their [D] embeddings."""
    contents = []
    for path in paths:
        try:
            with open(path, "rb") as image_file:
                contents.append((path, image_file.read()))
        except OSError as error:
            _skip(skipped, path, f"cannot read: {error.strerror or error}")
    if not contents:
        return [], []
    try:
        return [path for path, _ in contents], list(encoders.images([data for _, data in contents]))
    except tf.errors.InvalidArgumentError:
        logging.info("a file of this batch is not an image: embedding them one at a time")
    kept, rows = [], []
    for path, data in contents:
        try:
            rows.append(encoders.images([data])[0])
            kept.append(path)
        except tf.errors.InvalidArgumentError as error:
            _skip(skipped, path, f"not a decodable image: {_first_line(error)}")
    return kept, rows


def index_folder(encoders: Encoders, folder: str,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> SearchIndex:
    """Embeds every image under folder (`find_images`), batch_size at a time.

    Unreadable or undecodable files are skipped with a warning naming the file and are
    listed in the index's `skipped`. Image names are the files' absolute paths.
    Raises ValueError when the folder holds no usable image.
    """
    paths = [os.path.abspath(path) for path in find_images(folder)]
    if not paths:
        raise ValueError(f"{folder}: no {'/'.join(IMAGE_EXTENSIONS)} files")
    names, rows, skipped = [], [], []
    for start in range(0, len(paths), batch_size):
        kept, embedded = _encode_files(encoders, paths[start:start + batch_size], skipped)
        names.extend(kept)
        rows.extend(embedded)
        logging.info("embedded %d of %d images", min(start + batch_size, len(paths)), len(paths))
    if not rows:
        raise ValueError(f"{folder}: none of its {len(paths)} image files could be decoded")
    return SearchIndex(
        model=encoders.export_dir, source_kind=FOLDER, source=os.path.abspath(folder), split="",
        image_names=names, image_embeddings=np.stack(rows).astype(np.float32), captions=[],
        caption_image=np.zeros(0, np.int32),
        caption_embeddings=np.zeros((0, rows[0].shape[0]), np.float32), skipped=skipped)


def _image_records(shard_dir: str, split: str, batch_size: int) -> tf.data.Dataset:
    """The split's parsed image Examples in index order, batched (dicts of [B] tensors)."""
    files = shard_format.shard_files(shard_dir, split, shard_format.IMAGES)
    return tf.data.TFRecordDataset(files).map(shard_format.parse_image_example).batch(batch_size)


def index_shards(encoders: Encoders, shard_dir: str, split: str,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> SearchIndex:
    """Embeds every image and caption of one split of a shard dir.

    Image row n is image index n (the shards hold images in index order; checked); image
    names are the shards' image/filename. The shards' images were checked when they were
    built, so none is skipped.
    """
    names, rows = [], []
    for batch in _image_records(shard_dir, split, batch_size):
        indices = batch[shard_format.IMAGE_INDEX].numpy()
        if not np.array_equal(indices, np.arange(len(names), len(names) + len(indices))):
            raise ValueError(f"{shard_dir} ({split}): image shards are not in index order "
                             f"(index {indices[0]} after {len(names)} images)")
        names.extend(name.decode("utf-8") for name in batch[shard_format.IMAGE_FILENAME].numpy())
        rows.append(encoders.images(batch[shard_format.IMAGE_ENCODED]))
        logging.info("embedded %d images of %s (%s)", len(names), shard_dir, split)
    captions, caption_image = input_pipeline.read_caption_texts(shard_dir, split)
    if len(caption_image) and caption_image.max() >= len(names):
        raise ValueError(f"{shard_dir} ({split}): a caption describes image index "
                         f"{caption_image.max()}, but the split has {len(names)} images")
    return SearchIndex(
        model=encoders.export_dir, source_kind=SHARDS, source=shard_dir, split=split,
        image_names=names, image_embeddings=np.concatenate(rows).astype(np.float32),
        captions=captions, caption_image=caption_image,
        caption_embeddings=encoders.texts_in_batches(captions, batch_size).astype(np.float32),
        skipped=[])


class Hit(NamedTuple):
    """One result: rank (1 = best), row in the searched embeddings, cosine score, and
    name (an image name or a caption)."""

    rank: int
    row: int
    score: float
    name: str


def top_k(query: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k rows of candidates (float32 [N, D]) most similar to query (float32 [D]).

    Returns (rows int64 [min(k, N)], scores float32 [min(k, N)]), scores descending; equal
    scores keep row order.
    """
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    if candidates.shape[1] != query.shape[0]:
        raise ValueError(f"query has dimension {query.shape[0]}, the candidates "
                         f"{candidates.shape[1]}: they come from different models")
    scores = candidates @ query
    rows = np.argsort(-scores, kind="stable")[:k]
    return rows, scores[rows]


def rank(query: np.ndarray, candidates: np.ndarray, names: Sequence[str], k: int) -> list[Hit]:
    """`top_k` as Hits named after names[row]."""
    rows, scores = top_k(query, candidates, k)
    return [Hit(position + 1, int(row), float(score), names[row])
            for position, (row, score) in enumerate(zip(rows, scores))]


def read_caption_file(path: str) -> list[str]:
    """One caption per non-blank line of a UTF-8 text file (surrounding spaces stripped)."""
    with open(path, encoding="utf-8") as caption_file:
        captions = [line.strip() for line in caption_file if line.strip()]
    if not captions:
        raise ValueError(f"{path}: no captions (one sentence per line expected)")
    return captions


def read_image_file(path: str) -> bytes:
    with open(path, "rb") as image_file:
        return image_file.read()


def embed_image_file(encoders: Encoders, path: str) -> np.ndarray:
    """The float32 [D] embedding of one image file; ValueError naming it if undecodable."""
    try:
        return encoders.images([read_image_file(path)])[0]
    except tf.errors.InvalidArgumentError as error:
        raise ValueError(f"{path}: not a decodable image: {_first_line(error)}") from error


def index_image_bytes(index: SearchIndex, rows: Sequence[int]) -> dict[int, bytes | None]:
    """The encoded images of the given index rows: {row: bytes, or None if unreadable}.

    Folder indexes read the files again; shard indexes scan the split's image shards.
    """
    wanted = set(int(row) for row in rows)
    if index.source_kind == FOLDER:
        read: dict[int, bytes | None] = {}
        for row in wanted:
            try:
                read[row] = read_image_file(index.image_names[row])
            except OSError as error:
                logging.warning("%s: cannot read: %s", index.image_names[row], error)
                read[row] = None
        return read
    found = shard_format.read_encoded_images(index.source, index.split, wanted)
    return {row: found.get(row) for row in wanted}


class WordImportance(NamedTuple):
    """words: the caption's words (`text.tokenize`); score: the cosine of the image and the
    whole caption; drops: float32 [W], score minus the cosine without word w (the caption
    re-joined without it): large = the word matters for this image, negative = the caption
    matches better without it."""

    words: list[str]
    score: float
    drops: np.ndarray


def word_importance(encoders: Encoders, image_embedding: np.ndarray,
                    caption: str) -> WordImportance:
    """The similarity drop of each word of caption (the paper's appendix) for the image of
    image_embedding (float32 [D], e.g. `embed_image_file`)."""
    words = text.tokenize(caption)
    if not words:
        raise ValueError(f"caption {caption!r} has no words")
    sentences = [" ".join(words)] + [" ".join(words[:i] + words[i + 1:]) for i in range(len(words))]
    scores = encoders.texts(sentences) @ image_embedding
    return WordImportance(words, float(scores[0]), (scores[0] - scores[1:]).astype(np.float32))
