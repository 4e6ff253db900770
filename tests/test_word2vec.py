"""data_prep.word2vec: training on captions, reading word vector files (word2vec, fastText, GloVe), the init matrix."""
import gzip
import hashlib
import itertools

import numpy as np
import pytest
from gensim.models import KeyedVectors

from data_prep import shared_data
from data_prep import word2vec
from data_prep.records import DataFormatError
from dual_path.text import PAD_ID, UNK_ID, Vocabulary, tokenize

FLICKR8K_TOKENS = shared_data.FLICKR8K_CAPTIONS
# Enough real captions (500 images) for word similarities to mean something; trains in ~1 s.
NUM_REAL_CAPTIONS = 2500
TRAIN_DIM = 50
TRAIN_EPOCHS = 10

# Pairs of words used alike in captions, each with a word used differently.
SIMILAR_AND_UNRELATED = [("man", "woman", "water"), ("girl", "boy", "grass"), ("shirt", "jacket", "dog")]


def _inline_captions() -> list[str]:
    """Captions in which people, clothes, colours and places each share their contexts (2,880)."""
    people = ["man", "woman", "girl", "boy"]
    clothes = ["shirt", "jacket", "hat"]
    colours = ["red", "blue", "black"]
    places = ["water", "grass", "snow"]
    animals = ["dog", "cat"]
    captions = [
        f"A {person} in a {colour} {clothing} stands near the {place} ."
        for person, colour, clothing, place in itertools.product(people, colours, clothes, places)
    ]
    captions += [
        f"The {animal} is running through the {place} with a stick ."
        for animal, place in itertools.product(animals, places)
    ] * 6
    # Repeated to about as many captions as the real corpus: word2vec needs the passes.
    return captions * 20


def _captions() -> list[str]:
    if FLICKR8K_TOKENS.is_file():
        with open(FLICKR8K_TOKENS, encoding="utf-8") as token_file:
            lines = list(itertools.islice(token_file, NUM_REAL_CAPTIONS))
        return [line.rstrip("\n").split("\t", 1)[1] for line in lines]
    return _inline_captions()


@pytest.fixture(scope="module")
def caption_tokens() -> list[list[str]]:
    return [tokenize(caption) for caption in _captions()]


@pytest.fixture(scope="module")
def trained(caption_tokens) -> KeyedVectors:
    return word2vec.train_word2vec(caption_tokens, dim=TRAIN_DIM, seed=0, epochs=TRAIN_EPOCHS)


def _digest(vectors: KeyedVectors) -> str:
    return hashlib.md5(vectors.vectors.tobytes() + "\n".join(vectors.index_to_key).encode()).hexdigest()


def _tiny_vectors() -> KeyedVectors:
    """Case-sensitive keys as in GoogleNews: 'Dog', 'NASA', "Man's", 'red', 'New_York'."""
    keys = ["red", "Dog", "NASA", "Man's", "New_York"]
    vectors = KeyedVectors(4)
    values = np.arange(len(keys) * 4, dtype=np.float32).reshape(len(keys), 4) / 8.0 - 1.0
    vectors.add_vectors(keys, values)
    return vectors


# --- training ---------------------------------------------------------------------


def test_trained_vectors_cover_every_caption_word(trained, caption_tokens):
    words = {word for tokens in caption_tokens for word in tokens}
    assert set(trained.index_to_key) == words
    assert trained.vectors.shape == (len(words), TRAIN_DIM)
    assert trained.vectors.dtype == np.float32


def test_same_seed_gives_same_vectors_and_another_seed_does_not(trained, caption_tokens):
    again = word2vec.train_word2vec(caption_tokens, dim=TRAIN_DIM, seed=0, epochs=TRAIN_EPOCHS)
    other_seed = word2vec.train_word2vec(caption_tokens, dim=TRAIN_DIM, seed=1, epochs=TRAIN_EPOCHS)
    assert _digest(again) == _digest(trained)
    assert not np.allclose(other_seed["man"], trained["man"])


@pytest.mark.parametrize("word, similar, unrelated", SIMILAR_AND_UNRELATED)
def test_words_used_alike_are_closer_than_unrelated_words(trained, word, similar, unrelated):
    assert trained.similarity(word, similar) > trained.similarity(word, unrelated) + 0.1


def test_training_copies_a_generator_before_its_several_passes(caption_tokens, trained):
    from_generator = word2vec.train_word2vec(
        (tokens for tokens in caption_tokens), dim=TRAIN_DIM, seed=0, epochs=TRAIN_EPOCHS
    )
    assert _digest(from_generator) == _digest(trained)


def test_training_on_no_words_is_refused():
    with pytest.raises(ValueError, match="non-empty caption"):
        word2vec.train_word2vec([[], []], dim=8)


# --- reading word2vec files ---------------------------------------------------------


@pytest.mark.parametrize(
    "name, binary",
    [("vectors.bin", True), ("vectors.txt", False), ("vectors.vec.gz", False), ("no_extension", True)],
)
def test_saved_vectors_load_back_in_either_format(tmp_path, name, binary):
    saved = _tiny_vectors()
    path = str(tmp_path / name)
    saved.save_word2vec_format(path, binary=binary)
    loaded = word2vec.load_word_vectors(path)
    assert loaded.index_to_key == saved.index_to_key
    np.testing.assert_allclose(loaded.vectors, saved.vectors, atol=1e-6)


def test_text_format_with_trailing_spaces_and_crlf_loads(tmp_path):
    path = tmp_path / "c_tool.txt"
    path.write_bytes(b"2 3\r\nab 1 2 3 \r\ncd -4 5.5 6e-1 \r\n")
    loaded = word2vec.load_word_vectors(str(path))
    assert loaded.index_to_key == ["ab", "cd"]
    np.testing.assert_allclose(loaded.vectors, [[1, 2, 3], [-4, 5.5, 0.6]], rtol=1e-6)


def test_trained_vectors_round_trip_through_a_binary_file(tmp_path, trained):
    path = str(tmp_path / "captions.bin")
    trained.save_word2vec_format(path, binary=True)
    loaded = word2vec.load_word_vectors(path)
    assert loaded.index_to_key == trained.index_to_key
    np.testing.assert_array_equal(loaded.vectors, trained.vectors)


@pytest.mark.parametrize("binary", [True, False])
def test_limit_reads_only_the_first_words(tmp_path, binary):
    path = str(tmp_path / "vectors")
    _tiny_vectors().save_word2vec_format(path, binary=binary)
    assert word2vec.load_word_vectors(path, limit=2).index_to_key == ["red", "Dog"]


def _write_tiny(tmp_path, name: str, binary: bool) -> bytes:
    path = tmp_path / name
    _tiny_vectors().save_word2vec_format(str(path), binary=binary)
    return path.read_bytes()


def _malformed_files(tmp_path) -> dict[str, tuple[bytes, str]]:
    text = _write_tiny(tmp_path, "good.txt", binary=False)
    binary = _write_tiny(tmp_path, "good.bin", binary=True)
    nasa_line = next(line for line in text.split(b"\n") if line.startswith(b"NASA "))
    return {
        "empty.bin": (b"", "not a word vectors file: the first line is neither a word2vec header"),
        "garbage.txt": (b"<html>\n<body>\n", "not a word vectors file: the first line is neither"),
        "zero_dim.txt": (b"3 0\n", "header says 3 words of dim 0"),
        "truncated.bin": (binary[:-7], "malformed word2vec_binary file: unexpected end"),
        "fewer_words.txt": (b"9" + text[1:], "malformed word2vec_text file: unexpected end"),
        "short_line.txt": (text.replace(nasa_line, b"NASA 0.5"), ":4: expected a word and 4 values, got 1"),
        "not_a_number.txt": (text.replace(nasa_line, b"NASA 1 2 x 4"), "could not convert string to float"),
        "nan.txt": (text.replace(nasa_line, b"NASA 1 2 nan 4"), "the vector of 'NASA' is not finite"),
        "wrong_dim.txt": (b"5 6" + text[3:], ":2: expected a word and 6 values, got 4"),
    }


def test_malformed_files_raise_naming_the_file_and_reason(tmp_path):
    for name, (content, reason) in _malformed_files(tmp_path).items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataFormatError) as raised:
            word2vec.load_word_vectors(str(path))
        assert str(path) in str(raised.value), name
        assert reason in str(raised.value), name


def test_infinite_value_in_a_binary_file_is_refused(tmp_path):
    binary = _write_tiny(tmp_path, "good.bin", binary=True)
    nasa_at = binary.index(b"NASA ") + len(b"NASA ")
    infinite = binary[:nasa_at] + np.float32(np.inf).tobytes() + binary[nasa_at + 4 :]
    path = tmp_path / "inf.bin"
    path.write_bytes(infinite)
    with pytest.raises(DataFormatError, match="the vector of 'NASA' is not finite"):
        word2vec.load_word_vectors(str(path))


def test_gzipped_truncated_file_is_refused(tmp_path):
    text = _write_tiny(tmp_path, "good.txt", binary=False)
    path = tmp_path / "cut.txt.gz"
    path.write_bytes(gzip.compress(text[: len(text) // 2]))
    with pytest.raises(DataFormatError, match="cut.txt.gz"):
        word2vec.load_word_vectors(str(path))


def test_missing_file_is_refused(tmp_path):
    missing = str(tmp_path / "GoogleNews-vectors-negative300.bin")
    for file_format in word2vec.FORMATS:
        with pytest.raises(DataFormatError, match="GoogleNews-vectors-negative300.bin: no such"):
            word2vec.load_word_vectors(missing, file_format)


# --- GloVe's format and the format flag ----------------------------------------------


def _glove_text(vectors: KeyedVectors) -> bytes:
    """GloVe's own text format: `word v1 ... vD` lines, no header (as in glove.6B.50d.txt)."""
    return b"".join(
        (word + " " + " ".join(f"{value:.5f}" for value in vectors[word]) + "\n").encode("utf-8")
        for word in vectors.index_to_key)


def _lower_case_vectors() -> KeyedVectors:
    """GloVe-like: lower-case keys only."""
    vectors = KeyedVectors(4)
    keys = ["red", "dog", "nasa", "the"]
    vectors.add_vectors(keys, np.arange(16, dtype=np.float32).reshape(4, 4) / 4.0 - 2.0)
    return vectors


@pytest.mark.parametrize("name, compress", [("glove.6B.4d.txt", False), ("glove.4d.txt.gz", True)])
def test_glove_text_without_a_header_loads_with_its_dim(tmp_path, name, compress):
    expected = _lower_case_vectors()
    content = _glove_text(expected)
    path = tmp_path / name
    path.write_bytes(gzip.compress(content) if compress else content)
    assert word2vec.detect_format(str(path)) == word2vec.GLOVE
    for file_format in (word2vec.AUTO, word2vec.GLOVE):
        loaded = word2vec.load_word_vectors(str(path), file_format)
        assert loaded.index_to_key == expected.index_to_key and loaded.vector_size == 4
        np.testing.assert_allclose(loaded.vectors, expected.vectors, atol=1e-5)
    assert word2vec.load_word_vectors(str(path), limit=2).index_to_key == ["red", "dog"]


@pytest.mark.parametrize("name, binary, expected_format", [
    ("GoogleNews-like.bin", True, word2vec.WORD2VEC_BINARY),
    ("word2vec.txt", False, word2vec.WORD2VEC_TEXT),
    ("wiki.en.vec", False, word2vec.WORD2VEC_TEXT),  # fastText's .vec: a header, then text lines
])
def test_each_format_is_detected_from_the_content_and_loads_when_named(tmp_path, name, binary, expected_format):
    path = str(tmp_path / name)
    _tiny_vectors().save_word2vec_format(path, binary=binary)
    assert word2vec.detect_format(path) == expected_format
    loaded = word2vec.load_word_vectors(path, expected_format)
    assert loaded.index_to_key == _tiny_vectors().index_to_key


def test_a_format_flag_that_contradicts_the_file_names_the_file_and_reason(tmp_path):
    text_path, binary_path, glove_path = (tmp_path / "v.txt", tmp_path / "v.bin", tmp_path / "glove.txt")
    _tiny_vectors().save_word2vec_format(str(text_path), binary=False)
    _tiny_vectors().save_word2vec_format(str(binary_path), binary=True)
    glove_path.write_bytes(_glove_text(_lower_case_vectors()))
    cases = [
        (glove_path, word2vec.WORD2VEC_TEXT, "not a word2vec file: the first line must be 'vocab_size dim'"),
        (glove_path, word2vec.WORD2VEC_BINARY, "not a word2vec file: the first line must be 'vocab_size dim'"),
        (text_path, word2vec.WORD2VEC_BINARY, "not a binary word2vec file: its vectors are written as text"),
        (binary_path, word2vec.GLOVE, "not a GloVe file: the first line must be 'word v1 ... vD'"),
    ]
    for path, file_format, reason in cases:
        with pytest.raises(DataFormatError) as raised:
            word2vec.load_word_vectors(str(path), file_format)
        assert str(path) in str(raised.value) and reason in str(raised.value), (path, file_format)
    with pytest.raises(ValueError, match="format must be one of"):
        word2vec.load_word_vectors(str(text_path), "fasttext_bin")


def test_a_glove_line_with_a_missing_value_is_refused(tmp_path):
    lines = _glove_text(_lower_case_vectors()).split(b"\n")
    lines[2] = b"nasa 0.1 0.2 0.3"
    path = tmp_path / "glove.txt"
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataFormatError, match=r"glove.txt:3: expected a word and 4 values, got 3"):
        word2vec.load_word_vectors(str(path))


def test_shared_glove_file_loads_as_50d_lower_case_vectors():
    glove = shared_data.GLOVE_50D
    if not glove.is_file():
        pytest.skip(f"{glove} is not here")
    assert word2vec.detect_format(str(glove)) == word2vec.GLOVE
    vectors = word2vec.load_word_vectors(str(glove), limit=1000)
    assert vectors.vector_size == 50 and len(vectors) == 1000
    assert vectors.index_to_key[0] == "the" and all(word == word.lower() for word in vectors.index_to_key)


# --- the init matrix ----------------------------------------------------------------


def _caption_vocabulary() -> Vocabulary:
    # ids: 2 red, 3 dog, 4 nasa, 5 man's, 6 zebra, 7 new
    return Vocabulary(["red", "dog", "nasa", "man's", "zebra", "new"], [50, 30, 10, 6, 3, 1])


def test_init_matrix_copies_found_words_through_case_variants(tmp_path):
    path = str(tmp_path / "GoogleNews-like.bin")
    _tiny_vectors().save_word2vec_format(path, binary=True)
    vectors = word2vec.load_word_vectors(path)
    vocabulary = _caption_vocabulary()

    matrix, coverage = word2vec.init_matrix(vocabulary, vectors, seed=0)

    assert matrix.shape == (vocabulary.size, 4)
    assert matrix.dtype == np.float32
    np.testing.assert_array_equal(matrix[PAD_ID], np.zeros(4))
    for word, key in [("red", "red"), ("dog", "Dog"), ("nasa", "NASA"), ("man's", "Man's")]:
        np.testing.assert_array_equal(matrix[vocabulary.word_to_id(word)], vectors[key])
    for random_id in (UNK_ID, vocabulary.word_to_id("zebra"), vocabulary.word_to_id("new")):
        assert np.all(matrix[random_id] != 0)
        assert not any(np.allclose(matrix[random_id], row) for row in vectors.vectors)
    assert (coverage.found_words, coverage.total_words) == (4, 6)
    assert (coverage.found_tokens, coverage.total_tokens) == (96, 100)
    assert coverage.word_fraction == pytest.approx(4 / 6)
    assert coverage.token_fraction == pytest.approx(0.96)
    assert (coverage.found_words_as_is, coverage.found_tokens_as_is) == (1, 50)  # 'red' alone
    assert str(coverage) == "4/6 words (66.7%), 96/100 caption tokens (96.0%)"


def test_words_are_looked_up_as_they_are_then_lower_cased():
    vocabulary = Vocabulary(["red", "Dog", "NASA", "zebra"], [5, 4, 3, 2])  # a cased vocabulary
    vectors = _lower_case_vectors()
    matrix, coverage = word2vec.init_matrix(vocabulary, vectors)
    for word, key in [("red", "red"), ("Dog", "dog"), ("NASA", "nasa")]:
        np.testing.assert_array_equal(matrix[vocabulary.word_to_id(word)], vectors[key])
    assert (coverage.found_words, coverage.found_words_as_is) == (3, 1)
    assert (coverage.found_tokens, coverage.found_tokens_as_is) == (12, 5)


def test_random_rows_are_seeded_and_do_not_depend_on_other_words():
    vocabulary = _caption_vocabulary()
    all_found, _ = word2vec.init_matrix(vocabulary, _tiny_vectors(), seed=3)
    again, _ = word2vec.init_matrix(vocabulary, _tiny_vectors(), seed=3)
    other_seed, _ = word2vec.init_matrix(vocabulary, _tiny_vectors(), seed=4)
    fewer_vectors = KeyedVectors(4)
    fewer_vectors.add_vectors(["red"], _tiny_vectors()[["red"]])
    fewer_found, coverage = word2vec.init_matrix(vocabulary, fewer_vectors, seed=3)

    np.testing.assert_array_equal(again, all_found)
    assert not np.allclose(other_seed[UNK_ID], all_found[UNK_ID])
    assert coverage.found_words == 1
    zebra = vocabulary.word_to_id("zebra")
    # Scales differ (only 'red' sets fewer_found's), directions do not.
    np.testing.assert_allclose(
        fewer_found[zebra] / np.linalg.norm(fewer_found[zebra]),
        all_found[zebra] / np.linalg.norm(all_found[zebra]),
        rtol=1e-5,
    )


def test_random_rows_are_scaled_like_the_found_vectors():
    rng = np.random.default_rng(0)
    found_words = [f"word{index}" for index in range(200)]
    vectors = KeyedVectors(64)
    vectors.add_vectors(found_words, rng.normal(0.0, 0.2, size=(200, 64)).astype(np.float32))
    missing_words = [f"missing{index}" for index in range(200)]
    vocabulary = Vocabulary(found_words + missing_words, [1] * 400)

    matrix, coverage = word2vec.init_matrix(vocabulary, vectors)

    random_rows = matrix[[vocabulary.word_to_id(word) for word in missing_words]]
    assert coverage.word_fraction == 0.5
    assert np.std(random_rows) == pytest.approx(0.2, rel=0.05)
    assert abs(np.mean(random_rows)) < 0.01


def test_no_found_word_still_gives_random_rows_at_the_vectors_scale():
    vectors = _tiny_vectors()
    vocabulary = Vocabulary(["zebra", "giraffe"], [2, 1])
    matrix, coverage = word2vec.init_matrix(vocabulary, vectors)
    assert (coverage.found_words, coverage.word_fraction, coverage.token_fraction) == (0, 0.0, 0.0)
    np.testing.assert_array_equal(matrix[PAD_ID], np.zeros(4))
    assert 0.1 < np.std(matrix[1:]) / np.std(vectors.vectors) < 10


def test_vectors_trained_on_the_captions_cover_their_vocabulary(trained, caption_tokens):
    vocabulary = Vocabulary.build(caption_tokens)
    matrix, coverage = word2vec.init_matrix(vocabulary, trained)
    assert coverage.word_fraction == 1.0
    assert coverage.token_fraction == 1.0
    assert matrix.shape == (vocabulary.size, TRAIN_DIM)
    for word in ("man", "dog"):
        np.testing.assert_array_equal(matrix[vocabulary.word_to_id(word)], trained[word])
