"""Word vectors that initialise the text CNN's word embedding.

The paper initialises its word embedding with word2vec. Two sources:

* `train_word2vec`: vectors trained with gensim on the training split's tokenized
  captions (the default; needs nothing but the dataset);
* `load_word_vectors`: a user's pretrained file, optionally gzipped, in one of FORMATS:
  the original C word2vec format, binary (GoogleNews-vectors-negative300.bin) or text
  (a `vocab_size dim` header, then `word v1 ... vD` lines: word2vec's `.txt`, fastText's
  `.vec`), or GloVe's text format (the same lines with no header: glove.6B.300d.txt).
  `detect_format` tells them apart from the file's first two lines.

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


WORD2VEC_BINARY = "word2vec_binary"
WORD2VEC_TEXT = "word2vec_text"
GLOVE = "glove"
AUTO = "auto"
FORMATS = (AUTO, WORD2VEC_BINARY, WORD2VEC_TEXT, GLOVE)


def _is_header(line: bytes) -> bool:
    """Whether line is word2vec's `vocab_size dim` header."""
    fields = line.split()
    return len(fields) == 2 and all(field.isdigit() for field in fields)


def _is_text_entry(line: bytes) -> bool:
    """Whether line is a word followed by numbers written out (a text format's entry)."""
    word_and_vector = line.rstrip(b"\r\n").split(b" ", 1)
    if len(word_and_vector) != 2:
        return False
    vector = word_and_vector[1]
    return set(vector) <= _TEXT_VECTOR_BYTES and bool(set(vector) & _DIGITS)


def _first_lines(path: str) -> tuple[bytes, bytes]:
    """The file's first two lines (each cut at _MAX_ENTRY_BYTES), decompressed."""
    with gensim_utils.open(path, "rb") as vectors_file:
        return vectors_file.readline(_MAX_ENTRY_BYTES), vectors_file.readline(_MAX_ENTRY_BYTES)


def detect_format(path: str) -> str:
    """The format (one of FORMATS but AUTO) of a word vectors file, from its first two lines.

    A `vocab_size dim` header makes it word2vec, text if the next line is a word and numbers
    written out, else binary; a first line that is a word and numbers makes it GloVe.
    Raises:
      DataFormatError: the file is missing, empty, or starts with neither (names the file).
    """
    if not os.path.isfile(path):
        raise DataFormatError(f"{path}: no such word vectors file")
    first, second = _first_lines(path)
    if _is_header(first):
        return WORD2VEC_TEXT if _is_text_entry(second) else WORD2VEC_BINARY
    if _is_text_entry(first):
        return GLOVE
    raise DataFormatError(
        f"{path}: not a word vectors file: the first line is neither a word2vec header "
        f"'vocab_size dim' nor a GloVe line 'word v1 ... vD', got {first[:80]!r}")


def _header(path: str, first_line: bytes) -> tuple[int, int]:
    """(vocab_size, dim) of word2vec's header line."""
    if not _is_header(first_line):
        raise DataFormatError(
            f"{path}: not a word2vec file: the first line must be 'vocab_size dim', "
            f"got {first_line[:80]!r}")
    vocab_size, dim = (int(field) for field in first_line.split())
    if vocab_size == 0 or dim == 0:
        raise DataFormatError(f"{path}: header says {vocab_size} words of dim {dim}")
    return vocab_size, dim


def _check_text_lines(path: str, dim: int, first_line_number: int, num_lines: int | None) -> None:
    """Checks that each of num_lines vectors (None: all) from line first_line_number has dim values.

    gensim's text reader would silently broadcast a line with a single value to all
    dim columns.
    """
    with gensim_utils.open(path, "rb") as vectors_file:
        lines = itertools.islice(vectors_file, first_line_number - 1, None)
        for line_number, line in enumerate(itertools.islice(lines, num_lines), start=first_line_number):
            num_values = len(line.rstrip().split(b" ")) - 1
            if num_values != dim:
                raise DataFormatError(
                    f"{path}:{line_number}: expected a word and {dim} values, got {num_values} values"
                )


def load_word_vectors(path: str, file_format: str = AUTO, limit: int | None = None) -> KeyedVectors:
    """Loads pretrained word vectors: word2vec binary or text, fastText .vec, or GloVe.

    Args:
      path: the vectors file; `.gz` and `.bz2` are decompressed on the fly.
      file_format: one of FORMATS; AUTO tells it from the file (`detect_format`).
      limit: read only the first `limit` words (the most frequent ones in word2vec's and
        GloVe's own files); GoogleNews' 3M x 300 vectors take 3.6 GB in full.
    Returns:
      KeyedVectors with float32 [dim] vectors, dim as the file has them.
    Raises:
      DataFormatError: the file is missing, is not in file_format (a word2vec file without
        its `vocab_size dim` header), ends early, a line has the wrong number of values, or
        a vector is not finite; the message names the file and the reason.
      ValueError: file_format is not one of FORMATS.
    """
    if file_format not in FORMATS:
        raise ValueError(f"word vectors format must be one of {FORMATS}, got {file_format!r}")
    if file_format == AUTO:
        file_format = detect_format(path)
    elif not os.path.isfile(path):
        raise DataFormatError(f"{path}: no such word vectors file")
    first_line, second_line = _first_lines(path)
    if file_format == GLOVE:
        if _is_header(first_line) or not _is_text_entry(first_line):
            raise DataFormatError(f"{path}: not a GloVe file: the first line must be 'word v1 ... vD', "
                                  f"got {first_line[:80]!r}")
        dim = len(first_line.rstrip().split(b" ")) - 1
        _check_text_lines(path, dim, 1, limit)
    else:
        vocab_size, dim = _header(path, first_line)
        if file_format == WORD2VEC_TEXT:
            _check_text_lines(path, dim, 2, min(vocab_size, limit or vocab_size))
        elif _is_text_entry(second_line):
            raise DataFormatError(f"{path}: not a binary word2vec file: its vectors are written as text")
    binary = file_format == WORD2VEC_BINARY
    try:
        vectors = KeyedVectors.load_word2vec_format(path, binary=binary, limit=limit,
                                                    no_header=file_format == GLOVE)
    except (ValueError, EOFError, UnicodeDecodeError) as error:
        raise DataFormatError(f"{path}: malformed {file_format} file: {error}") from error
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
    weight each entry by its training-caption count. found_*_as_is count the words found
    in the form the vocabulary holds them (lower case), the rest through a case variant.
    """

    found_words: int
    total_words: int
    found_tokens: int
    total_tokens: int
    found_words_as_is: int
    found_tokens_as_is: int

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
    """The key under which keyed_vectors holds word: as is, lower-cased, else a case variant."""
    for variant in (word, word.lower(), word.capitalize(), word.upper(), word.title()):
        if variant in keyed_vectors.key_to_index:
            return variant
    return None


def init_matrix(
    vocabulary: Vocabulary, keyed_vectors: KeyedVectors, seed: int = 0
) -> tuple[np.ndarray, Coverage]:
    """The word embedding's initial weights.

    Row PAD_ID is zeros. The row of a vocabulary word copies its vector when
    keyed_vectors holds the word as is, lower-cased (GloVe's words are) or, since
    GoogleNews is case-sensitive and captions are lower-cased, in its Capitalized, UPPER or
    Title form. Every other row (UNK_ID included)
    is drawn from a normal distribution with mean 0 and the standard deviation of the
    copied vectors' values (of the first 10,000 vectors when none is copied); the draw
    for a row depends only on seed, not on which other words were found.

    Args:
      vocabulary: the training vocabulary.
      keyed_vectors: from train_word2vec or load_word_vectors.
      seed: seeds the random rows.
    Returns:
      (float32 [vocabulary.size, keyed_vectors.vector_size], Coverage).
    """
    found_rows, found_keys = [], []
    found_tokens = found_words_as_is = found_tokens_as_is = 0
    for index, (word, count) in enumerate(zip(vocabulary.words, vocabulary.counts)):
        key = _lookup(word, keyed_vectors)
        if key is not None:
            found_rows.append(index + len(RESERVED_TOKENS))
            found_keys.append(key)
            found_tokens += count
            if key == word:
                found_words_as_is += 1
                found_tokens_as_is += count
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
        found_words_as_is=found_words_as_is,
        found_tokens_as_is=found_tokens_as_is,
    )
    return matrix, coverage
