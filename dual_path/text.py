"""Caption text: the tokenizer and the vocabulary.

The tokenizer follows the original MatConvNet code: lower case, and every space or
punctuation mark (`- . , ( ) ?` and the like) separates words and is dropped.
The same rule exists twice, once in Python (`tokenize`, used when shards are built)
and once in TensorFlow ops (`tf_tokenize`, used inside exported SavedModels); both
are built from `SEPARATOR_PATTERN`, and a test checks that they agree.

Token ids: 0 is padding, 1 is the unknown word (used only with `oov="unk"`),
vocabulary words start at 2 in order of decreasing training-split count.
"""
import collections
import os
import re
from typing import Iterable, Sequence

import tensorflow as tf

from dual_path.atomic_write import write_atomically

PAD_ID = 0
UNK_ID = 1
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
RESERVED_TOKENS = (PAD_TOKEN, UNK_TOKEN)

# Every character Python calls whitespace, written out literally because RE2's \s (used by
# tf_tokenize) matches only ASCII spaces while Python's matches Unicode ones too.
_WHITESPACE = "".join(chr(code) for code in range(0x3001) if chr(code).isspace())
# Whitespace and ASCII punctuation except the apostrophe (kept inside words: "woman's").
SEPARATOR_PATTERN = "[" + _WHITESPACE + r"!\"#$%&()*+,\-./:;<=>?@\[\\\]^_`{|}~]+"
_SEPARATOR_RE = re.compile(SEPARATOR_PATTERN)

OOV_MODES = ("drop", "unk")


def tokenize(text: str) -> list[str]:
    """Splits one caption into lower-case words; punctuation is dropped."""
    return [word for word in _SEPARATOR_RE.split(text.lower()) if word]


def tf_tokenize(texts: tf.Tensor) -> tf.RaggedTensor:
    """`tokenize` in TensorFlow ops.

    Args:
      texts: tf.string [N], UTF-8 captions.
    Returns:
      tf.RaggedTensor of tf.string, [N, (words)].
    """
    lowered = tf.strings.lower(texts, encoding="utf-8")
    spaced = tf.strings.regex_replace(lowered, SEPARATOR_PATTERN, " ")
    return tf.strings.split(tf.strings.strip(spaced))


class Vocabulary:
    """Words of the training captions with their counts; maps words to token ids.

    The file format is im2txt's: one `word count` line per word, most frequent first.
    The reserved tokens are not written; they always take ids 0 and 1.
    """

    def __init__(self, words: Sequence[str], counts: Sequence[int]):
        if len(words) != len(counts):
            raise ValueError("words and counts differ in length")
        self.words = list(words)
        self.counts = list(counts)
        self._ids = {word: index + len(RESERVED_TOKENS) for index, word in enumerate(self.words)}

    @classmethod
    def build(cls, token_lists: Iterable[Sequence[str]], min_count: int = 1) -> "Vocabulary":
        """Counts words over tokenized training captions; keeps those seen min_count times."""
        counter = collections.Counter()
        for tokens in token_lists:
            counter.update(tokens)
        kept = sorted(
            ((word, count) for word, count in counter.items() if count >= min_count),
            key=lambda item: (-item[1], item[0]),
        )
        return cls([word for word, _ in kept], [count for _, count in kept])

    @classmethod
    def load(cls, path: str) -> "Vocabulary":
        words, counts, seen = [], [], set()
        with tf.io.gfile.GFile(path, "r") as vocab_file:
            for line_number, line in enumerate(vocab_file, start=1):
                parts = line.rstrip("\n").split(" ")
                if len(parts) != 2 or not (parts[1].isascii() and parts[1].isdigit()):
                    raise ValueError(f"{path}:{line_number}: expected 'word count', got {line!r}")
                if parts[0] in RESERVED_TOKENS or parts[0] in seen:
                    raise ValueError(f"{path}:{line_number}: word {parts[0]!r} is reserved or repeated")
                seen.add(parts[0])
                words.append(parts[0])
                counts.append(int(parts[1]))
        return cls(words, counts)

    def save(self, path: str) -> None:
        lines = "".join(f"{word} {count}\n" for word, count in zip(self.words, self.counts))
        write_atomically(path, lines.encode("utf-8"))

    @property
    def size(self) -> int:
        """Number of token ids, reserved ones included (the embedding's input_dim)."""
        return len(self.words) + len(RESERVED_TOKENS)

    def id_to_word(self, token_id: int) -> str:
        if token_id < len(RESERVED_TOKENS):
            return RESERVED_TOKENS[token_id]
        return self.words[token_id - len(RESERVED_TOKENS)]

    def word_to_id(self, word: str) -> int | None:
        """The word's id, or None when the word is not in the vocabulary."""
        return self._ids.get(word)

    def encode(self, tokens: Sequence[str], max_length: int, oov: str = "drop") -> list[int]:
        """Token ids of one tokenized caption, at most max_length of them.

        oov="drop" leaves unknown words out (as the original); oov="unk" maps them to UNK_ID.
        """
        if oov not in OOV_MODES:
            raise ValueError(f"oov must be one of {OOV_MODES}, got {oov!r}")
        ids = []
        for word in tokens:
            token_id = self._ids.get(word)
            if token_id is None:
                if oov == "drop":
                    continue
                token_id = UNK_ID
            ids.append(token_id)
        return ids[:max_length]


def vocabulary_path(shard_dir: str) -> str:
    return os.path.join(shard_dir, "vocab.txt")


def word2vec_init_path(shard_dir: str) -> str:
    """The [vocab.size, dim] float32 .npy matrix that initialises the word embedding."""
    return os.path.join(shard_dir, "word2vec_init.npy")
