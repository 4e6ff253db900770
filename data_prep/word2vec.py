"""Word vectors that initialise the text CNN's word embedding.

The paper initialises its word embedding with word2vec. Two sources:

* `train_word2vec`: vectors trained with gensim on the training split's tokenized
  captions (the default; needs nothing but the dataset);
* `load_word2vec`: a user's pretrained file in the original C word2vec format, binary
  (GoogleNews-vectors-negative300.bin) or text (`.txt`, fastText `.vec`), optionally
  gzipped; the format is told from the file's content.

`init_matrix` turns either into the float32 [vocabulary.size, dim] matrix that
`dual_path.text.word2vec_init_path` names.
"""
import dataclasses
import itertools
import os
from typing import Iterable, Sequence

import numpy as np
from gensim import utils as gensim_utils
from gensim.models import KeyedVectors, Word2Vec

from data_prep.records import DataFormatError
from dual_path.text import PAD_ID, RESERVED_TOKENS, Vocabulary

DEFAULT_DIM = 300
DEFAULT_EPOCHS = 10
DEFAULT_WINDOW = 5

# Bytes of the numbers that follow a word in the text format. A binary float32 vector
# almost never starts with a run of them up to a newline byte: the fourth byte of a
# value of magnitude 0.01 to 2 is one of '<=>?' or 0xbc-0xbf.
_TEXT_VECTOR_BYTES = frozenset(b"0123456789+-.eEinfaINFA \t\r")
_DIGITS = frozenset(b"0123456789")
# Longest first entry read to tell the formats apart (a 300-dim text line is ~3 KB).
_MAX_ENTRY_BYTES = 1 << 20
# Rows checked for NaN/inf at a time, so that a 3M-word file needs no 3M-row temporary.
_FINITE_CHECK_ROWS = 100_000
# Vectors that scale the random rows when no vocabulary word has a vector.
_SCALE_SAMPLE_ROWS = 10_000


def train_word2vec(
    token_lists: Iterable[Sequence[str]],
    dim: int = DEFAULT_DIM,
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
    window: int = DEFAULT_WINDOW,
    min_count: int = 1,
    workers: int = 1,
) -> KeyedVectors:
    """Trains skip-gram word2vec on tokenized captions.

    Args:
      token_lists: tokenized training captions (`dual_path.text.tokenize` output);
        read several times, so a generator is first copied into a list.
      dim: vector size.
      seed: seeds gensim's initial vectors and sampling.
      epochs: passes over the captions.
      window: context words on each side.
      min_count: words seen fewer times get no vector.
      workers: training threads. Only workers=1 gives the same vectors for the same
        seed (in any process, whatever PYTHONHASHSEED); more threads are faster but
        not reproducible.
    Returns:
      KeyedVectors with one float32 [dim] vector per word seen min_count times.
    """
    sentences = [list(tokens) for tokens in token_lists]
    if not any(sentences):
        raise ValueError("train_word2vec needs at least one non-empty caption")
    model = Word2Vec(
        sentences=sentences,
        vector_size=dim,
        window=window,
        min_count=min_count,
        sg=1,
        seed=seed,
        workers=workers,
        epochs=epochs,
    )
    return model.wv


def _read_header(path: str) -> tuple[int, int, bytes]:
    """The header's (vocab_size, dim), and the rest of the first line after it."""
    with gensim_utils.open(path, "rb") as vectors_file:
        header = vectors_file.readline()
        fields = header.split()
        if len(fields) != 2 or not all(field.isdigit() for field in fields):
            raise DataFormatError(
                f"{path}: not a word2vec file: the first line must be 'vocab_size dim', "
                f"got {header[:80]!r}"
            )
        vocab_size, dim = int(fields[0]), int(fields[1])
        if vocab_size == 0 or dim == 0:
            raise DataFormatError(f"{path}: header says {vocab_size} words of dim {dim}")
        return vocab_size, dim, vectors_file.readline(_MAX_ENTRY_BYTES)


def _is_text_entry(first_line: bytes) -> bool:
    """Whether the line after the header is a word followed by numbers written out."""
    word_and_vector = first_line.rstrip(b"\n").split(b" ", 1)
    if len(word_and_vector) != 2:
        return False
    vector = word_and_vector[1]
    return set(vector) <= _TEXT_VECTOR_BYTES and bool(set(vector) & _DIGITS)


def _check_text_lines(path: str, dim: int, num_lines: int) -> None:
    """Checks that each of the first num_lines vectors has dim values.

    gensim's text reader would silently broadcast a line with a single value to all
    dim columns.
    """
    with gensim_utils.open(path, "rb") as vectors_file:
        vectors_file.readline()
        for line_number, line in enumerate(itertools.islice(vectors_file, num_lines), start=2):
            num_values = len(line.rstrip().split(b" ")) - 1
            if num_values != dim:
                raise DataFormatError(
                    f"{path}:{line_number}: expected a word and {dim} values, got {num_values} values"
                )


def load_word2vec(path: str, limit: int | None = None) -> KeyedVectors:
    """Loads pretrained vectors in the C word2vec format, binary or text.

    Args:
      path: the vectors file; `.gz` and `.bz2` are decompressed on the fly.
      limit: read only the first `limit` words (the most frequent ones in word2vec's
        own files); GoogleNews' 3M x 300 vectors take 3.6 GB in full.
    Returns:
      KeyedVectors with float32 [dim] vectors.
    Raises:
      DataFormatError: the file is missing, its header is not `vocab_size dim`, it
        ends early, a line has the wrong number of values, or a vector is not finite.
    """
    if not os.path.isfile(path):
        raise DataFormatError(f"{path}: no such word2vec file")
    vocab_size, dim, first_line = _read_header(path)
    binary = not _is_text_entry(first_line)
    if not binary:
        _check_text_lines(path, dim, min(vocab_size, limit or vocab_size))
    try:
        vectors = KeyedVectors.load_word2vec_format(path, binary=binary, limit=limit)
    except (ValueError, EOFError, UnicodeDecodeError) as error:
        file_format = "binary" if binary else "text"
        raise DataFormatError(f"{path}: malformed {file_format} word2vec file: {error}") from error
    for start in range(0, len(vectors), _FINITE_CHECK_ROWS):
        finite_rows = np.isfinite(vectors.vectors[start : start + _FINITE_CHECK_ROWS]).all(axis=1)
        if not finite_rows.all():
            word = vectors.index_to_key[start + int(np.argmin(finite_rows))]
            raise DataFormatError(f"{path}: the vector of {word!r} is not finite")
    return vectors


@dataclasses.dataclass(frozen=True)
class Coverage:
    """How much of a vocabulary found a pretrained vector (reserved tokens left out).

    found_words / total_words count vocabulary entries; found_tokens / total_tokens
    weight each entry by its training-caption count.
    """

    found_words: int
    total_words: int
    found_tokens: int
    total_tokens: int

    @property
    def word_fraction(self) -> float:
        return self.found_words / self.total_words if self.total_words else 0.0

    @property
    def token_fraction(self) -> float:
        return self.found_tokens / self.total_tokens if self.total_tokens else 0.0

    def __str__(self) -> str:
        return (
            f"{self.found_words}/{self.total_words} words ({self.word_fraction:.1%}), "
            f"{self.found_tokens}/{self.total_tokens} caption tokens ({self.token_fraction:.1%})"
        )


def _lookup(word: str, keyed_vectors: KeyedVectors) -> str | None:
    """The key under which keyed_vectors holds word: as is, else a case variant."""
    for variant in (word, word.capitalize(), word.upper(), word.title()):
        if variant in keyed_vectors.key_to_index:
            return variant
    return None


def init_matrix(
    vocabulary: Vocabulary, keyed_vectors: KeyedVectors, seed: int = 0
) -> tuple[np.ndarray, Coverage]:
    """The word embedding's initial weights.

    Row PAD_ID is zeros. The row of a vocabulary word copies its vector when
    keyed_vectors holds the word or, since GoogleNews is case-sensitive and captions are
    lower-cased, its Capitalized, UPPER or Title form. Every other row (UNK_ID included)
    is drawn from a normal distribution with mean 0 and the standard deviation of the
    copied vectors' values (of the first 10,000 vectors when none is copied); the draw
    for a row depends only on seed, not on which other words were found.

    Args:
      vocabulary: the training vocabulary.
      keyed_vectors: from train_word2vec or load_word2vec.
      seed: seeds the random rows.
    Returns:
      (float32 [vocabulary.size, keyed_vectors.vector_size], Coverage).
    """
    found_rows, found_keys = [], []
    found_tokens = 0
    for index, (word, count) in enumerate(zip(vocabulary.words, vocabulary.counts)):
        key = _lookup(word, keyed_vectors)
        if key is not None:
            found_rows.append(index + len(RESERVED_TOKENS))
            found_keys.append(key)
            found_tokens += count
    found_vectors = keyed_vectors[found_keys] if found_keys else None
    scale_source = found_vectors if found_keys else keyed_vectors.vectors[:_SCALE_SAMPLE_ROWS]
    scale = float(np.std(scale_source))
    rng = np.random.default_rng(seed)
    matrix = rng.normal(0.0, scale, size=(vocabulary.size, keyed_vectors.vector_size))
    matrix = matrix.astype(np.float32)
    matrix[PAD_ID] = 0.0
    if found_keys:
        matrix[found_rows] = found_vectors
    coverage = Coverage(
        found_words=len(found_keys),
        total_words=len(vocabulary.words),
        found_tokens=found_tokens,
        total_tokens=sum(vocabulary.counts),
    )
    return matrix, coverage
