"""dual_path.text: the tokenizer (Python and TensorFlow) and the vocabulary."""
from pathlib import Path

import pytest
import tensorflow as tf

from data_prep import shared_data
from dual_path import text
from dual_path.text import PAD_ID, UNK_ID, Vocabulary, tf_tokenize, tokenize

FLICKR8K_TOKENS = shared_data.FLICKR8K_CAPTIONS

TRICKY_CAPTIONS = [
    "A child in a pink dress is climbing up a set of stairs in an entry way .",
    "A black-and-white dog (a puppy?) jumps over a log.",
    "The man's hat, the woman's coat; and the dogs' ball!",
    "Two men -- one in red -- play ball...",
    "\"Quoted\" words: 3/4 of [them] {braces} <angle> and_under*score",
    "tabs\tand\nnewlines\r\nand  double  spaces",
    "   leading and trailing   ",
    "e-mail@example.com #hashtag $5 100% a+b=c ~tilde^ `tick` |pipe| back\\slash",
    "CAFÉ Über ÀÉÎ naïve façade",
    "ΣΟΦΟΣ İstanbul straße ǅ Ａ",
    "emoji 🐶 dog ❤️",
    "'quoted' 'tis rock'n'roll",
    "",
    " . , ( ) ? - ",
]

# Unicode spaces that Python's `\s` matches and TensorFlow's RE2 `\s` (ASCII only) does not.
UNICODE_SPACES = ["\u00a0", "\u2009", "\u3000", "\u2028", "\x85", "\x1c"]


def _python_and_tf_tokens(captions: list[str]) -> tuple[list[list[str]], list[list[str]]]:
    tf_tokens = tf_tokenize(tf.constant(captions, dtype=tf.string)).to_list()
    return (
        [tokenize(caption) for caption in captions],
        [[word.decode("utf-8") for word in words] for words in tf_tokens],
    )


# --- tokenize -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "caption, words",
    [
        ("A dog runs.", ["a", "dog", "runs"]),
        ("black-and-white", ["black", "and", "white"]),
        ("a dog (a puppy) runs, jumps? yes", ["a", "dog", "a", "puppy", "runs", "jumps", "yes"]),
        ("The dog's ball", ["the", "dog's", "ball"]),
        ("dogs' toys", ["dogs'", "toys"]),
        ("3/4 of them: 100%", ["3", "4", "of", "them", "100"]),
        ("snake_case e-mail@x.com", ["snake", "case", "e", "mail", "x", "com"]),
        ("CAFÉ Über ÀÉÎ", ["café", "über", "àéî"]),
        ("ΣΟΦΟΣ", ["σοφος"]),
        ("  \t. , ( ) ? -\n", []),
        ("", []),
    ],
)
def test_tokenize_lowercases_and_splits_on_spaces_and_punctuation(caption, words):
    assert tokenize(caption) == words


def test_tf_tokenize_agrees_with_tokenize_on_tricky_captions():
    python_tokens, tf_tokens = _python_and_tf_tokens(TRICKY_CAPTIONS)
    for caption, expected, got in zip(TRICKY_CAPTIONS, python_tokens, tf_tokens):
        assert got == expected, caption


def test_tf_tokenize_agrees_with_tokenize_on_real_flickr8k_captions():
    if not FLICKR8K_TOKENS.is_file():
        pytest.skip(f"{FLICKR8K_TOKENS} not present")
    with open(FLICKR8K_TOKENS, encoding="utf-8") as token_file:
        captions = [line.rstrip("\n").split("\t", 1)[1] for line in token_file]
    python_tokens, tf_tokens = _python_and_tf_tokens(captions)
    mismatches = [caption for caption, a, b in zip(captions, python_tokens, tf_tokens) if a != b]
    assert mismatches == []
    assert len(captions) > 1000


def test_tf_tokenize_gives_a_ragged_string_tensor_of_one_row_per_caption():
    tokens = tf_tokenize(tf.constant(["A dog.", "", "Two cats , one box"]))
    assert isinstance(tokens, tf.RaggedTensor)
    assert tokens.dtype == tf.string
    assert tokens.row_lengths().numpy().tolist() == [2, 0, 4]


@pytest.mark.parametrize("space", UNICODE_SPACES, ids=[f"U+{ord(c):04X}" for c in UNICODE_SPACES])
def test_tf_tokenize_agrees_with_tokenize_on_unicode_spaces(space):
    caption = f"a{space}dog runs"
    python_tokens, tf_tokens = _python_and_tf_tokens([caption])
    assert tf_tokens == python_tokens


# --- Vocabulary ---------------------------------------------------------------------


CAPTIONS = [
    "A dog runs on the grass.",
    "A black dog runs.",
    "The dog's ball is red.",
    "A cat sleeps.",
]


@pytest.fixture
def vocabulary() -> Vocabulary:
    return Vocabulary.build([tokenize(caption) for caption in CAPTIONS])


def test_build_orders_by_decreasing_count_then_alphabetically(vocabulary):
    assert vocabulary.words[:4] == ["a", "dog", "runs", "the"]
    assert vocabulary.counts[:4] == [3, 2, 2, 2]
    assert vocabulary.words[4:] == sorted(vocabulary.words[4:])
    assert set(vocabulary.counts[4:]) == {1}
    assert vocabulary.size == len(vocabulary.words) + 2


def test_build_keeps_words_seen_min_count_times():
    token_lists = [tokenize(caption) for caption in CAPTIONS]
    vocabulary = Vocabulary.build(token_lists, min_count=2)
    assert vocabulary.words == ["a", "dog", "runs", "the"]
    assert Vocabulary.build(token_lists, min_count=4).words == []
    assert Vocabulary.build(token_lists, min_count=4).size == 2


def test_ids_start_after_the_reserved_tokens(vocabulary):
    assert (PAD_ID, UNK_ID) == (0, 1)
    assert vocabulary.word_to_id("a") == 2
    assert vocabulary.word_to_id("dog") == 3
    assert vocabulary.word_to_id("zebra") is None
    assert [vocabulary.id_to_word(i) for i in range(4)] == ["<pad>", "<unk>", "a", "dog"]
    for word in vocabulary.words:
        assert vocabulary.id_to_word(vocabulary.word_to_id(word)) == word


def test_save_writes_word_count_lines_and_load_reads_them_back(tmp_path, vocabulary):
    path = str(tmp_path / "vocab.txt")
    vocabulary.save(path)
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    assert lines[:2] == ["a 3", "dog 2"]
    assert len(lines) == len(vocabulary.words)
    assert not (tmp_path / "vocab.txt.tmp").exists()

    loaded = Vocabulary.load(path)
    assert loaded.words == vocabulary.words
    assert loaded.counts == vocabulary.counts
    assert loaded.size == vocabulary.size


def test_save_and_load_keep_non_ascii_words_and_overwrite(tmp_path):
    path = str(tmp_path / "vocab.txt")
    Vocabulary(["old"], [1]).save(path)
    unicode_vocabulary = Vocabulary.build([tokenize("Café naïve dog's Ü")])
    unicode_vocabulary.save(path)
    assert Vocabulary.load(path).words == unicode_vocabulary.words == ["café", "dog's", "naïve", "ü"]


def test_load_reads_a_file_with_windows_line_ends(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_bytes(b"a 3\r\ndog 2\r\n")
    loaded = Vocabulary.load(str(path))
    assert (loaded.words, loaded.counts) == (["a", "dog"], [3, 2])


def test_vocabulary_path_is_vocab_txt_in_the_shard_dir(tmp_path):
    assert text.vocabulary_path(str(tmp_path)) == str(tmp_path / "vocab.txt")
    assert text.word2vec_init_path(str(tmp_path)) == str(tmp_path / "word2vec_init.npy")


@pytest.mark.parametrize(
    "content, bad_line",
    [
        ("a 3\ndog\n", 2),
        ("a 3\ndog two\n", 2),
        ("a 3\ndog 2 1\n", 2),
        ("a 3\ndog -2\n", 2),
        ("a 3\n\n", 2),
    ],
)
def test_load_of_a_malformed_file_names_the_file_and_line(tmp_path, content, bad_line):
    path = tmp_path / "vocab.txt"
    path.write_bytes(content.encode("utf-8"))
    with pytest.raises(ValueError, match=f"{path}:{bad_line}: expected 'word count'"):
        Vocabulary.load(str(path))


def test_load_of_a_superscript_count_names_the_file_and_line(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("a 3\ndog ²\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{path}:2: expected 'word count'"):
        Vocabulary.load(str(path))


def test_words_and_counts_must_match_in_length():
    with pytest.raises(ValueError, match="differ in length"):
        Vocabulary(["a", "b"], [1])


def test_encode_drops_or_maps_unknown_words_then_truncates(vocabulary):
    tokens = tokenize("A zebra dog runs on the moon")
    dog, runs, on, the = (vocabulary.word_to_id(word) for word in ["dog", "runs", "on", "the"])
    assert vocabulary.encode(tokens, max_length=32) == [2, dog, runs, on, the]
    assert vocabulary.encode(tokens, max_length=32, oov="unk") == [2, UNK_ID, dog, runs, on, the, UNK_ID]
    assert vocabulary.encode(tokens, max_length=3) == [2, dog, runs]
    assert vocabulary.encode(tokens, max_length=3, oov="unk") == [2, UNK_ID, dog]
    assert vocabulary.encode([], max_length=3) == []
    assert PAD_ID not in vocabulary.encode(tokens, max_length=32, oov="unk")


def test_encode_refuses_an_unknown_oov_mode(vocabulary):
    with pytest.raises(ValueError, match="oov must be one of"):
        vocabulary.encode(["dog"], max_length=4, oov="skip")


@pytest.mark.parametrize("word", ["dog", "<pad>", "<unk>"])
def test_load_rejects_repeated_or_reserved_words(tmp_path, word):
    path = tmp_path / "vocab.txt"
    path.write_text(f"dog 3\n{word} 2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab\.txt:2: .*reserved or repeated"):
        text.Vocabulary.load(str(path))
