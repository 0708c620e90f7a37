"""Tests for mlm.data.tfds_source: a tiny TFDS dataset built locally in both file formats."""

import os
import pickle
import subprocess
import sys

import grain
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from tfds_testing import (  # noqa: E402
    FORMATS,
    NAME,
    NUM_SHARDS,
    NUM_TEST,
    NUM_TRAIN,
    build_tiny_text,
    document_text,
)

from mlm.data import corpus, sentences, tfds_source  # noqa: E402
from mlm.data.tokenizer import encode_sentences, load_vocab, train_wordpiece  # noqa: E402
from mlm.errors import ConfigError, DataError  # noqa: E402


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    """The dataset prepared once per file format: {format: data_dir}."""
    dirs = {}
    for file_format in FORMATS:
        dirs[file_format] = build_tiny_text(str(tmp_path_factory.mktemp(file_format)), file_format)
    return dirs


@pytest.fixture(scope="module")
def vocab(tmp_path_factory, data_dirs):
    """A tiny WordPiece vocab trained on the train split's text."""
    directory = tmp_path_factory.mktemp("vocab")
    sample = tfds_source.write_vocab_sample(
        NAME,
        "train",
        data_dir=data_dirs["tfrecord"],
        out_path=str(directory / "sample.txt"),
        max_documents=NUM_TRAIN,
    )
    return load_vocab(train_wordpiece([sample], 120, True, str(directory / "vocab.txt")), True)


def texts(source):
    return [source[index] for index in range(len(source))]


# ----------------------------------------------------------------------------------- sources


@pytest.mark.parametrize("file_format", FORMATS)
def test_text_source_holds_exactly_the_generated_texts(data_dirs, file_format):
    source = tfds_source.tfds_text_source(NAME, "train", data_dir=data_dirs[file_format])
    assert len(source) == NUM_TRAIN
    assert sorted(texts(source)) == sorted(document_text(index) for index in range(NUM_TRAIN))
    assert all(isinstance(text, str) for text in texts(source))
    titles = tfds_source.tfds_text_source(
        NAME, "test", data_dir=data_dirs[file_format], text_field="title"
    )
    assert sorted(texts(titles)) == sorted(f"Doc {index}" for index in range(1000, 1007))
    with pytest.raises(IndexError):
        source[NUM_TRAIN]


def test_both_formats_give_the_same_order_across_shards(data_dirs):
    for file_format in FORMATS:
        files = os.listdir(os.path.join(data_dirs[file_format], NAME, "1.0.0"))
        assert sum(f"train.{file_format}-" in name for name in files) == NUM_SHARDS
    by_format = [
        texts(tfds_source.tfds_text_source(NAME, "train", data_dir=data_dirs[f])) for f in FORMATS
    ]
    assert by_format[0] == by_format[1]


@pytest.mark.parametrize("file_format", FORMATS)
@pytest.mark.parametrize(
    "split, selected",
    [
        ("train[5:31]", list(range(5, 31))),  # spans shard boundaries
        ("train[:25%]", list(range(10))),
        ("train[-3:]", list(range(NUM_TRAIN - 3, NUM_TRAIN))),
        ("test+train[:2]", [("test", i) for i in range(NUM_TEST)] + [0, 1]),
    ],
)
def test_split_slices_select_the_tfds_examples(data_dirs, file_format, split, selected):
    data_dir = data_dirs[file_format]
    full = {
        name: texts(tfds_source.tfds_text_source(NAME, name, data_dir=data_dir))
        for name in ("train", "test")
    }
    want = [full["test"][i[1]] if isinstance(i, tuple) else full["train"][i] for i in selected]
    source = tfds_source.tfds_text_source(NAME, split, data_dir=data_dir)
    assert texts(source) == want
    assert source[len(want) - 1] == want[-1]  # random access, not iteration
    assert tfds_source.num_examples(NAME, split, data_dir=data_dir) == len(want)


@pytest.mark.parametrize("file_format", FORMATS)
def test_source_pickles_for_grain_workers(data_dirs, file_format):
    source = tfds_source.tfds_text_source(NAME, "train[3:9]", data_dir=data_dirs[file_format])
    first = source[2]
    clone = pickle.loads(pickle.dumps(source))
    assert texts(clone) == texts(source)
    assert clone[2] == first
    assert "mlm_tiny_text" in repr(source)


@pytest.mark.parametrize("file_format", FORMATS)
def test_grain_shuffle_shard_and_resume(data_dirs, file_format):
    source = tfds_source.tfds_text_source(NAME, "train", data_dir=data_dirs[file_format])

    def host_stream(shard):
        dataset = grain.MapDataset.source(source).shuffle(seed=7)
        return dataset[shard::2].repeat(None).to_iter_dataset()

    hosts = [list(_take(iter(host_stream(shard)), NUM_TRAIN // 2)) for shard in range(2)]
    assert sorted(hosts[0] + hosts[1]) == sorted(texts(source))  # disjoint, complete shards
    assert hosts[0] != texts(source)[::2]  # shuffled

    iterator = iter(host_stream(1))
    _take(iterator, 27)  # into the second epoch
    state = iterator.get_state()
    expected = _take(iterator, 9)
    resumed = iter(host_stream(1))
    resumed.set_state(state)
    assert _take(resumed, 9) == expected


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


# --------------------------------------------------------------------------------- documents


def test_text_to_sentences_splits_lines_then_sentences():
    text = (
        "Title line\n\n  First one. Second one, e.g. this!  Third?\n \t\nLast paragraph\u2028End.\n"
    )
    assert sentences.text_to_sentences(text) == [
        "Title line",
        "First one.",
        "Second one, e.g. this!",
        "Third?",
        "Last paragraph",
        "End.",
    ]
    assert sentences.text_to_sentences(" \n\n") == []


@pytest.mark.parametrize("file_format", FORMATS)
def test_documents_are_the_encoded_sentences(data_dirs, vocab, file_format):
    data_dir = data_dirs[file_format]
    source = tfds_source.tfds_text_source(NAME, "train", data_dir=data_dir)
    documents = tfds_source.tfds_documents(NAME, "train", data_dir=data_dir, vocab=vocab)
    assert isinstance(documents, grain.MapDataset)
    assert len(documents) == NUM_TRAIN
    for index in (0, 17, NUM_TRAIN - 1):
        want = encode_sentences(vocab, sentences.text_to_sentences(source[index]))
        got = documents[index]
        assert len(got) == len(want) >= 2
        for got_ids, want_ids in zip(got, want, strict=True):
            assert got_ids.dtype == np.int32
            np.testing.assert_array_equal(got_ids, want_ids)
    assert vocab.unk_id not in np.concatenate(documents[3])


def test_documents_drop_sentences_without_tokens(vocab):
    tokenize = sentences.TokenizeText(vocab)
    assert [ids.size > 0 for ids in tokenize("River stone.\n\u200b\nStory.")] == [True, True]
    assert tokenize("\u200b") == []


def test_write_vocab_sample_writes_the_first_documents(data_dirs, tmp_path, capsys):
    data_dir = data_dirs["array_record"]
    source = tfds_source.tfds_text_source(NAME, "train", data_dir=data_dir)
    path = tfds_source.write_vocab_sample(
        NAME, "train", data_dir=data_dir, out_path=str(tmp_path / "sample.txt"), max_documents=5
    )
    assert path == str(tmp_path / "sample.txt")
    want = [sentences.text_to_sentences(source[index]) for index in range(5)]
    assert corpus.read_documents([path]) == want
    assert os.listdir(tmp_path) == ["sample.txt"]
    more = tfds_source.write_vocab_sample(
        NAME, "test", data_dir=data_dir, out_path=str(tmp_path / "all.txt"), max_documents=99
    )
    assert len(corpus.read_documents([more])) == NUM_TEST
    assert capsys.readouterr().err == ""  # every document split into sentences


def test_write_vocab_sample_reports_documents_that_did_not_split(monkeypatch, tmp_path, capsys):
    unsplit = "title\n" + "a run of words without sentence punctuation " * 30
    texts = ["First one. second one.", unsplit, "", unsplit]
    monkeypatch.setattr(tfds_source, "tfds_text_source", lambda *args, **kwargs: texts)
    path = tfds_source.write_vocab_sample(
        NAME, "train", out_path=str(tmp_path / "sample.txt"), max_documents=10
    )
    assert len(corpus.read_documents([path])) == 3  # reported, still written
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(
        f"warning: 2 of 4 documents sampled from data.tfds_name={NAME} split 'train' did not "
        "split into sentences"
    )


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("name", [NAME, "no_such_dataset_mlm"])
def test_unprepared_dataset_raises_the_build_hint(tmp_path, name):
    with pytest.raises(DataError, match=r"not prepared in .*run `tfds build") as error:
        tfds_source.tfds_text_source(name, "train", data_dir=str(tmp_path))
    assert str(tmp_path) in str(error.value)
    assert "\n" not in str(error.value)
    with pytest.raises(DataError, match="tfds build"):
        tfds_source.num_examples(name, "train", data_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []  # nothing downloaded or prepared


def test_wrong_text_field_names_the_text_features(data_dirs):
    for field in ("body", "id"):
        with pytest.raises(ConfigError, match=rf"data.text_field='{field}'.*: text, title$"):
            tfds_source.tfds_text_source(
                NAME, "train", data_dir=data_dirs["tfrecord"], text_field=field
            )


@pytest.mark.parametrize("split", ["trian", "train[5:2]", "train[:200%]"])
def test_bad_split_names_the_splits(data_dirs, split):
    with pytest.raises(ConfigError, match=r"^data.tfds_split=") as error:
        tfds_source.tfds_text_source(NAME, split, data_dir=data_dirs["tfrecord"])
    assert "(test, train)" in str(error.value) or "(splits: test, train)" in str(error.value)


def test_bad_config_is_a_config_error(data_dirs):
    with pytest.raises(ConfigError, match="data.tfds_name='mlm_tiny_text:9.0.0'"):
        tfds_source.tfds_text_source(NAME + ":9.0.0", "train", data_dir=data_dirs["tfrecord"])


def test_non_utf8_text_names_dataset_and_index(data_dirs):
    features = tfds.builder(NAME, data_dir=data_dirs["tfrecord"]).info.features
    record = features.serialize_example({"id": 0, "title": "t", "text": b"ok \xff bad"})
    source = tfds_source.TFDSTextSource([record, record], features, "text", "tiny split 'x'")
    with pytest.raises(DataError, match=r"tiny split 'x', example 1: 'text' is not valid UTF-8"):
        source[1]


def test_damaged_tfrecord_shard_raises_data_error(data_dirs, tmp_path):
    import shutil

    data_dir = str(tmp_path / "copy")
    shutil.copytree(data_dirs["tfrecord"], data_dir)
    version_dir = os.path.join(data_dir, NAME, "1.0.0")
    shard = sorted(f for f in os.listdir(version_dir) if "train.tfrecord" in f)[1]
    with open(os.path.join(version_dir, shard), "r+b") as file:
        file.truncate(os.path.getsize(file.name) - 5)
    with pytest.raises(DataError, match=shard):
        tfds_source.tfds_text_source(NAME, "train", data_dir=data_dir)


def test_fresh_process_reads_from_files_without_importing_tensorflow(data_dirs):
    # No builder code is registered there: TFDS reads the dataset's own info files.
    code = (
        "import sys, mlm.data.tfds_source as t; "
        "assert not {'tensorflow', 'tensorflow_datasets'} & set(sys.modules); "
        f"texts = [t.tfds_text_source({NAME!r}, 'train', data_dir=d)[0] for d in sys.argv[1:]]; "
        "assert len(set(texts)) == 1 and texts[0].startswith('Article '), texts; "
        "assert 'tensorflow' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code, *data_dirs.values()], check=True)
