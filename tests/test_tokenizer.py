"""Tests for mlm.data.tokenizer: WordPiece training, vocab.txt loading, encoding and decoding."""

import os

import numpy as np
import pytest

from mlm.data import tokenizer
from mlm.errors import ConfigError, DataError

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A lazy dog sleeps in the warm sun all day long.",
    "Foxes are quick and clever animals that hunt at night.",
    "The reader parses each record and checks it against the schema.",
    "Records that fail the check are skipped and reported later.",
    "Parsing a file line by line keeps the memory use small.",
    "Jumping, running and sleeping are what animals do best.",
    "Checking the schema of every record takes a little time.",
    "Quickly reading large files needs buffered streams.",
    "The Café serves naïve tourists crêpes every morning.",
]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "train.txt"
    documents = [SENTENCES[i:] + SENTENCES[:i] for i in range(len(SENTENCES))]
    path.write_text("".join("\n".join(document) + "\n\n" for document in documents))
    return str(path)


@pytest.fixture(scope="module")
def uncased_vocab_file(text_file, tmp_path_factory):
    out_path = str(tmp_path_factory.mktemp("vocab") / "vocab.txt")
    return tokenizer.train_wordpiece([text_file], 200, True, out_path)


def read_lines(path):
    with open(path, encoding="utf-8") as file:
        return file.read().splitlines()


# ---------------------------------------------------------------------------------- training


def test_trained_vocab_has_specials_first_and_fits_the_size(uncased_vocab_file):
    tokens = read_lines(uncased_vocab_file)
    assert tokens[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert 100 < len(tokens) <= 200
    assert len(set(tokens)) == len(tokens)
    assert "##s" in tokens and "the" in tokens
    assert not [token for token in tokens[5:] if token != token.lower()]  # uncased
    assert "e" in tokens and "é" not in tokens  # accents stripped
    vocab = tokenizer.load_vocab(uncased_vocab_file, lowercase=True)
    assert (vocab.pad_id, vocab.unk_id, vocab.cls_id, vocab.sep_id, vocab.mask_id) == (
        0,
        1,
        2,
        3,
        4,
    )
    np.testing.assert_array_equal(vocab.special_ids, [0, 1, 2, 3, 4])
    assert vocab.size == len(tokens) == len(vocab.tokens)
    expected_continuation = [token.startswith("##") for token in tokens]
    np.testing.assert_array_equal(vocab.is_continuation, expected_continuation)


def test_training_is_deterministic(text_file, uncased_vocab_file, tmp_path):
    # The Rust trainer alone numbers tokens in hash order: several runs in one process differ.
    for run in range(3):
        path = tokenizer.train_wordpiece([text_file], 200, True, str(tmp_path / f"{run}.txt"))
        assert read_lines(path) == read_lines(uncased_vocab_file)
    assert sorted(os.listdir(tmp_path)) == ["0.txt", "1.txt", "2.txt"]  # no temp files left


def test_cased_training_keeps_case_and_accents(text_file, tmp_path):
    path = tokenizer.train_wordpiece([text_file], 300, False, str(tmp_path / "vocab.txt"))
    tokens = read_lines(path)
    assert "T" in tokens and "é" in tokens
    vocab = tokenizer.load_vocab(path, lowercase=False)
    ids = tokenizer.encode_sentences(vocab, ["The Café"])[0]
    assert tokenizer.decode(vocab, ids) == "The Café"


def test_small_vocab_size_drops_rare_characters(text_file, tmp_path):
    path = tokenizer.train_wordpiece([text_file], 40, True, str(tmp_path / "vocab.txt"))
    tokens = read_lines(path)
    assert len(tokens) == 40
    assert tokens[:5] == list(tokenizer.SPECIAL_TOKENS)
    assert "e" in tokens and "z" not in tokens  # "e" is the most frequent letter, "z" rare
    vocab = tokenizer.load_vocab(path, lowercase=True)
    assert vocab.unk_id in tokenizer.encode_sentences(vocab, ["lazy"])[0]


def test_training_errors_name_the_problem(text_file, tmp_path):
    with pytest.raises(DataError, match="missing.txt: no such file"):
        tokenizer.train_wordpiece([str(tmp_path / "missing.txt")], 100, True, str(tmp_path / "v"))
    with pytest.raises(ConfigError, match="model.vocab_size=5"):
        tokenizer.train_wordpiece([text_file], 5, True, str(tmp_path / "v"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(DataError, match="no text"):
        tokenizer.train_wordpiece([str(empty)], 100, True, str(tmp_path / "v"))
    assert not os.path.exists(tmp_path / "v")


# ---------------------------------------------------------------------------------- encoding


def test_encode_decode_round_trip(uncased_vocab_file):
    vocab = tokenizer.load_vocab(uncased_vocab_file, lowercase=True)
    [ids] = tokenizer.encode_sentences(vocab, [SENTENCES[0]])
    assert ids.dtype == np.int32
    assert not np.isin(ids, vocab.special_ids).any()  # no [CLS]/[SEP] added, nothing unknown
    assert tokenizer.decode(vocab, ids) == SENTENCES[0].lower()
    pieces = [vocab.tokens[i] for i in ids]
    assert pieces[-1] == "."
    np.testing.assert_array_equal(vocab.is_continuation[ids], [p.startswith("##") for p in pieces])


def test_mask_in_text_and_unknown_characters(uncased_vocab_file):
    vocab = tokenizer.load_vocab(uncased_vocab_file, lowercase=True)
    [ids] = tokenizer.encode_sentences(vocab, ["the [MASK] dog 日"])
    assert ids[1] == vocab.mask_id
    assert ids[-1] == vocab.unk_id
    assert tokenizer.decode(vocab, ids, skip_special_tokens=False).startswith("the [MASK] dog")
    assert tokenizer.decode(vocab, ids) == "the dog"


def test_encode_documents_drops_empty_sentences_and_documents(uncased_vocab_file):
    vocab = tokenizer.load_vocab(uncased_vocab_file, lowercase=True)
    documents = [["the dog", "   ", "a fox."], ["\t", ""], ["sun"]]
    encoded = tokenizer.encode_documents(vocab, documents)
    assert [len(document) for document in encoded] == [2, 1]
    expected = tokenizer.encode_sentences(vocab, ["the dog", "a fox.", "sun"])
    for got, want in zip([s for d in encoded for s in d], expected, strict=True):
        np.testing.assert_array_equal(got, want)
    many = tokenizer.encode_sentences(vocab, ["the dog"] * (tokenizer.ENCODE_CHUNK_SENTENCES + 3))
    assert len(many) == tokenizer.ENCODE_CHUNK_SENTENCES + 3
    np.testing.assert_array_equal(many[-1], expected[0])


# ------------------------------------------------------------------------------ vocab files


def write_google_vocab(path, drop=None):
    tokens = ["[PAD]", *[f"[unused{i}]" for i in range(99)], "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += ["[unused99]", "[unused100]", "!", ".", "a", "b", "the", "quick", "brown", "fox"]
    tokens += ["##es", "jump", "##s", "over", "lazy", "dog", "##g"]
    tokens = [token for token in tokens if token != drop]
    path.write_text("\n".join(tokens) + "\n\n")
    return str(path)


def test_google_layout_vocab_ids_come_from_the_file(tmp_path):
    vocab = tokenizer.load_vocab(write_google_vocab(tmp_path / "vocab.txt"), lowercase=True)
    assert vocab.size == 121
    assert (vocab.pad_id, vocab.unk_id, vocab.cls_id, vocab.sep_id, vocab.mask_id) == (
        0,
        100,
        101,
        102,
        103,
    )
    np.testing.assert_array_equal(vocab.special_ids, np.arange(106))
    assert vocab.special_ids.dtype == np.int32
    assert np.flatnonzero(vocab.is_continuation).tolist() == [114, 116, 120]
    [ids] = tokenizer.encode_sentences(vocab, ["The quick brown foxes JUMPS over a cat!"])
    assert [vocab.tokens[i] for i in ids] == [
        "the",
        "quick",
        "brown",
        "fox",
        "##es",
        "jump",
        "##s",
        "over",
        "a",
        "[UNK]",
        "!",
    ]
    assert tokenizer.decode(vocab, ids, skip_special_tokens=False) == (
        "the quick brown foxes jumps over a [UNK]!"
    )


def test_vocab_file_errors(tmp_path):
    with pytest.raises(DataError, match="missing.txt does not exist"):
        tokenizer.load_vocab(str(tmp_path / "missing.txt"), lowercase=True)
    no_mask = write_google_vocab(tmp_path / "no_mask.txt", drop="[MASK]")
    with pytest.raises(DataError, match=r"special token \[MASK\] is missing"):
        tokenizer.load_vocab(no_mask, lowercase=True)
    duplicate = tmp_path / "duplicate.txt"
    duplicate.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\nfox\nthe\n")
    with pytest.raises(
        DataError, match=r"duplicate.txt:8: duplicate token 'the' \(first on line 6"
    ):
        tokenizer.load_vocab(str(duplicate), lowercase=True)
    blank = tmp_path / "blank.txt"
    blank.write_text("[PAD]\n[UNK]\n\n[CLS]\n[SEP]\n[MASK]\n")
    with pytest.raises(DataError, match="blank.txt:3: empty token"):
        tokenizer.load_vocab(str(blank), lowercase=True)


def test_vocab_file_that_is_not_a_vocab_is_named_with_its_line(tmp_path):
    good = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\n"
    latin = tmp_path / "latin.txt"
    latin.write_bytes(good.encode() + "café\n".encode("latin-1"))
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\x00\x01\x02\n\x89PNG\r\n")
    nul = tmp_path / "nul.txt"
    nul.write_bytes(good.encode() + b"ab\x00cd\n")
    counts = tmp_path / "counts.txt"
    counts.write_text(good + "dog 12\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cases = [
        (latin, r"latin.txt:7: not valid UTF-8 \(invalid continuation byte at byte 3 of the "
         r"line\); re-encode the file as UTF-8"),
        (binary, r"model.bin:2: not valid UTF-8 \(invalid start byte at byte 0 of the line\)"),
        (nul, r"nul.txt:7: a NUL byte; this is a binary file, not a BERT vocab.txt"),
        (counts, r"counts.txt:7: token 'dog 12' holds whitespace"),
        (empty, r"vocab file '.*empty.txt' is empty; give a BERT vocab.txt"),
    ]  # fmt: skip
    for path, message in cases:
        with pytest.raises(DataError, match=message) as caught:
            tokenizer.load_vocab(str(path), lowercase=True)
        assert "\n" not in str(caught.value)
    specials = tmp_path / "specials.txt"
    specials.write_text("[PAD]\n[UNK]\n[SEP]\nthe\n")
    with pytest.raises(DataError, match=r"special tokens \[CLS\] \[MASK\] are missing"):
        tokenizer.load_vocab(str(specials), lowercase=True)


def test_vocab_with_a_byte_order_mark_and_crlf_loads(tmp_path):
    path = tmp_path / "windows.txt"
    path.write_bytes(b"\xef\xbb\xbf[PAD]\r\n[UNK]\r\n[CLS]\r\n[SEP]\r\n[MASK]\r\nthe\r\n")
    vocab = tokenizer.load_vocab(str(path), lowercase=True)
    assert vocab.tokens == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the"]
    assert vocab.pad_id == 0
