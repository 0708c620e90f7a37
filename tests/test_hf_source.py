"""Tests for mlm.data.hf_source: tiny Hugging Face datasets written locally in every layout."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import grain
import numpy as np
import pytest

datasets = pytest.importorskip("datasets")

from mlm import config as config_lib  # noqa: E402
from mlm.data import hf_source  # noqa: E402
from mlm.data.inputs import build_inputs  # noqa: E402
from mlm.data.sentences import text_to_sentences  # noqa: E402
from mlm.data.tokenizer import encode_sentences, load_vocab, train_wordpiece  # noqa: E402
from mlm.errors import ConfigError, DataError  # noqa: E402
from mlm.train import train_and_evaluate  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["river", "stone", "light", "garden", "window", "paper", "music", "winter", "market"]
NUM_TRAIN, NUM_EVAL = 60, 12


def document_text(index: int) -> str:
    """A document of 3-5 sentences over two lines, different for every index."""
    rng = np.random.default_rng(index)
    sentences = [
        " ".join(rng.choice(WORDS, rng.integers(4, 9))).capitalize() + "."
        for _ in range(rng.integers(3, 6))
    ]
    return " ".join(sentences[:2]) + "\n" + " ".join(sentences[2:])


def columns(first: int, count: int) -> dict:
    indices = range(first, first + count)
    return {
        "text": [document_text(i) for i in indices],
        "title": [f"Doc {i}" for i in indices],
        "id": list(indices),
    }


TRAIN = columns(0, NUM_TRAIN)["text"]
EVAL = columns(1000, NUM_EVAL)["text"]


@pytest.fixture(scope="module", autouse=True)
def cache_dirs(tmp_path_factory):
    """Conversions and the Hub cache go to temporary directories for the whole module."""
    root = tmp_path_factory.mktemp("caches")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLM_CACHE_DIR", str(root / "mlm"))
        patch.setenv("HF_DATASETS_CACHE", str(root / "hub"))
        yield root


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """{layout: data.hf_dataset} for every layout, holding TRAIN (and EVAL where split)."""
    root = tmp_path_factory.mktemp("hf")
    train = datasets.Dataset.from_dict(columns(0, NUM_TRAIN))
    evaluation = datasets.Dataset.from_dict(columns(1000, NUM_EVAL))
    train.save_to_disk(str(root / "saved"))
    datasets.DatasetDict(train=train, validation=evaluation).save_to_disk(str(root / "dict"))
    (root / "parquet").mkdir()
    train.select(range(25)).to_parquet(str(root / "parquet" / "part-0.parquet"))
    train.select(range(25, NUM_TRAIN)).to_parquet(str(root / "parquet" / "part-1.parquet"))
    (root / "jsonl").mkdir()
    train.select(range(30)).to_json(str(root / "jsonl" / "a.jsonl"))
    train.select(range(30, NUM_TRAIN)).to_json(str(root / "jsonl" / "b.jsonl"))
    return {
        "saved": str(root / "saved"),
        "dict": str(root / "dict"),
        "parquet": str(root / "parquet"),
        "jsonl": str(root / "jsonl" / "*.jsonl"),
        "parquet_file": str(root / "parquet" / "part-1.parquet"),
    }


@pytest.fixture(scope="module")
def vocab_path(tmp_path_factory, paths):
    directory = tmp_path_factory.mktemp("vocab")
    sample = hf_source.write_vocab_sample(
        paths["saved"], "train", out_path=str(directory / "sample.txt"), max_documents=NUM_TRAIN
    )
    return train_wordpiece([sample], 120, True, str(directory / "vocab.txt"))


def texts(source):
    return [source[index] for index in range(len(source))]


def small_config(**data):
    config = config_lib.base_config()
    config.model.update(vocab_size=200, max_position_embeddings=32)
    config.data.update(seq_length=32, max_predictions_per_seq=4, use_next_sentence_label=False)
    config.data.update(**data)
    config.train.update(global_batch_size=4)
    return config_lib.validate(config)


# ----------------------------------------------------------------------------------- sources


@pytest.mark.parametrize("layout", ["saved", "dict", "parquet", "jsonl"])
def test_every_layout_reads_back_the_written_texts_in_order(paths, layout):
    source = hf_source.hf_text_source(paths[layout], "train")
    assert texts(source) == TRAIN
    assert source[NUM_TRAIN - 1] == TRAIN[-1]  # random access, not iteration
    with pytest.raises(IndexError):
        source[NUM_TRAIN]


def test_splits_files_and_split_expressions(paths):
    assert texts(hf_source.hf_text_source(paths["dict"], "validation")) == EVAL
    titles = hf_source.hf_text_source(paths["dict"], "validation", text_field="title")
    assert texts(titles) == [f"Doc {i}" for i in range(1000, 1000 + NUM_EVAL)]
    assert texts(hf_source.hf_text_source(paths["parquet_file"], "train")) == TRAIN[25:]
    assert texts(hf_source.hf_text_source(paths["dict"], "train[:10]")) == TRAIN[:10]
    assert texts(hf_source.hf_text_source(paths["saved"], "train[90%:]")) == TRAIN[54:]
    both = hf_source.hf_text_source(paths["dict"], "train[:5]+validation[-2:]")
    assert texts(both) == TRAIN[:5] + EVAL[-2:]


def test_source_pickles_for_grain_workers(paths):
    source = hf_source.hf_text_source(paths["parquet"], "train[3:9]")
    clone = pickle.loads(pickle.dumps(source))
    assert texts(clone) == TRAIN[3:9]
    assert "parquet" in repr(source) and "6 examples" in repr(source)


def test_files_are_converted_once_into_the_mlm_cache(paths, cache_dirs):
    hf_source.hf_text_source(paths["parquet"], "train")
    converted = os.path.join(str(cache_dirs / "mlm"), "hf_datasets")
    assert any(name.endswith(".arrow") for _, _, files in os.walk(converted) for name in files)
    assert not os.path.exists(cache_dirs / "hub")  # only a Hub name looks there


def test_a_hub_name_is_read_from_the_local_cache(paths, cache_dirs, tmp_path):
    # Lay out what load_dataset('mlm-test/tiny') leaves in the cache, from a conversion.
    built = datasets.load_dataset(
        "parquet", data_files={"train": [paths["parquet_file"]]}, cache_dir=str(tmp_path)
    )
    version_dir = os.path.dirname(built["train"].cache_files[0]["filename"])
    hub_dir = cache_dirs / "hub" / "mlm-test___tiny" / "default" / "0.0.0"
    target = hub_dir / os.path.basename(version_dir)
    shutil.copytree(version_dir, target)
    os.rename(target / "parquet-train.arrow", target / "tiny-train.arrow")
    try:
        assert texts(hf_source.hf_text_source("mlm-test/tiny", "train")) == TRAIN[25:]
    finally:
        shutil.rmtree(cache_dirs / "hub")


# --------------------------------------------------------------------------------- documents


def test_documents_are_the_encoded_sentences(paths, vocab_path):
    vocab = load_vocab(vocab_path, True)
    documents = hf_source.hf_documents(paths["saved"], "train", vocab=vocab)
    assert isinstance(documents, grain.MapDataset) and len(documents) == NUM_TRAIN
    for index in (0, 17, NUM_TRAIN - 1):
        want = encode_sentences(vocab, text_to_sentences(TRAIN[index]))
        got = documents[index]
        assert len(got) == len(want) >= 3
        for got_ids, want_ids in zip(got, want, strict=True):
            assert got_ids.dtype == np.int32
            np.testing.assert_array_equal(got_ids, want_ids)


def test_vocab_sample_spreads_over_the_split(paths, tmp_path):
    path = hf_source.write_vocab_sample(
        paths["dict"], "train", out_path=str(tmp_path / "sample.txt"), max_documents=3
    )
    from mlm.data.corpus import read_documents

    want = [text_to_sentences(TRAIN[index]) for index in (0, 30, NUM_TRAIN - 1)]
    assert read_documents([path]) == want


def test_hosts_read_disjoint_documents_by_index(paths, vocab_path, tmp_path, monkeypatch):
    read = []
    original = hf_source.HFTextSource.__getitem__

    def spy(self, index):
        read.append(int(index))
        return original(self, index)

    config = small_config(hf_dataset=paths["saved"], vocab_file=vocab_path)
    by_host = []
    for host in range(2):
        workdir = tmp_path / str(host)
        workdir.mkdir()
        inputs = build_inputs(
            config, str(workdir), need_eval=False, shard_index=host, shard_count=2
        )
        read.clear()
        monkeypatch.setattr(hf_source.HFTextSource, "__getitem__", spy)
        iterator = iter(inputs.train)
        for _ in range(3):
            next(iterator)
        monkeypatch.setattr(hf_source.HFTextSource, "__getitem__", original)
        by_host.append(set(read))
    assert by_host[0] and by_host[1] and not by_host[0] & by_host[1]


def test_batches_resume_exactly_from_the_iterator_state(paths, vocab_path, tmp_path):
    config = small_config(hf_dataset=paths["parquet"], vocab_file=vocab_path)
    iterator = iter(build_inputs(config, str(tmp_path), need_eval=False).train)
    for _ in range(20):  # Into the second epoch.
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(4)]
    resumed = iter(build_inputs(config, str(tmp_path), need_eval=False).train)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_trained_vocab_records_the_hf_fields_only_for_hf_runs(paths, tmp_path):
    workdir = tmp_path / "hf"
    workdir.mkdir()
    config = small_config(hf_dataset=paths["saved"])
    first = build_inputs(config, str(workdir), need_eval=False).vocab
    settings = json.loads((workdir / "vocab_settings.json").read_text())
    assert settings["data.hf_dataset"] == paths["saved"] and settings["data.hf_split"] == "train"
    (workdir / "vocab_sample.txt").unlink()
    assert build_inputs(config, str(workdir), need_eval=False).vocab.tokens == first.tokens
    assert not (workdir / "vocab_sample.txt").exists()  # reused, not trained again
    other = small_config(hf_dataset=paths["saved"], hf_split="train[:30]")
    build_inputs(other, str(workdir), need_eval=False)
    assert (workdir / "vocab_sample.txt").exists()  # another split: trained again
    text = tmp_path / "train.txt"
    text.write_text("\n\n".join(TRAIN) + "\n")
    plain = tmp_path / "plain"
    plain.mkdir()
    build_inputs(small_config(train_files=str(text)), str(plain), need_eval=False)
    recorded = json.loads((plain / "vocab_settings.json").read_text())
    assert not any(key.startswith("data.hf_") for key in recorded)


# ------------------------------------------------------------------------------------ errors


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_missing_datasets_package_names_the_extra(paths, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ConfigError, match=r"not installed; pip install 'mlm\[hf\]'") as error:
        hf_source.hf_text_source(paths["saved"], "train")
    one_line(error)


def test_missing_paths_and_empty_globs(tmp_path):
    with pytest.raises(DataError, match=r"'.*missing' does not exist; give a save_to_disk"):
        hf_source.hf_text_source(str(tmp_path / "missing"), "train")
    with pytest.raises(DataError, match=r"no file matches '.*\*\.parquet'; check the glob"):
        hf_source.hf_text_source(str(tmp_path / "*.parquet"), "train")
    (tmp_path / "notes.csv").write_text("text\nhello\n")
    with pytest.raises(ConfigError, match=r"'.*notes.csv', which is not Parquet, JSON lines"):
        hf_source.hf_text_source(str(tmp_path / "*.csv"), "train")


def test_unknown_split_lists_the_splits(paths):
    with pytest.raises(ConfigError, match=r"^data.hf_split='test' of .*\(train, validation\)"):
        hf_source.hf_text_source(paths["dict"], "test")
    with pytest.raises(ConfigError, match=r"^data.hf_eval_split='dev' of .*: no such split; .*"):
        hf_source.hf_text_source(paths["saved"], "dev", split_field="data.hf_eval_split")


def test_text_field_must_be_a_string_column(paths):
    for field in ("body", "id"):
        with pytest.raises(ConfigError, match=rf"data.text_field='{field}'.*: text, title$"):
            hf_source.hf_text_source(paths["dict"], "train", text_field=field)


def test_an_empty_split_is_refused(paths):
    with pytest.raises(ConfigError, match=r"'train\[5:5\]' selects no examples.*train \(60\)"):
        hf_source.hf_text_source(paths["dict"], "train[5:5]")


def test_uncached_hub_names_and_remote_paths_say_how_to_materialise():
    with pytest.raises(DataError) as error:
        hf_source.hf_text_source("mlm-test/not-cached", "train")
    assert "not in the local Hugging Face cache" in one_line(error)
    assert "datasets.load_dataset('mlm-test/not-cached').save_to_disk(DIR)" in str(error.value)
    with pytest.raises(ConfigError, match=r"is remote: .*save_to_disk\(DIR\)"):
        hf_source.hf_text_source("hf://datasets/org/name", "train")


def test_config_refuses_a_second_source_and_an_eval_split_alone(paths):
    with pytest.raises(ConfigError, match="data.train_files and data.hf_dataset are both set"):
        small_config(hf_dataset=paths["saved"], train_files="x.txt")
    with pytest.raises(ConfigError, match="data.hf_eval_split is set but data.hf_dataset is"):
        small_config(hf_eval_split="validation")


# -------------------------------------------------------------------------------- end to end


OVERRIDES = {
    "data.text_field": "text",
    "data.hf_eval_split": "validation",
    "model.vocab_size": 200,
    "model.hidden_size": 32,
    "model.intermediate_size": 64,
    "model.num_layers": 1,
    "data.seq_length": 32,
    "data.max_predictions_per_seq": 5,
    "train.global_batch_size": 8,
    "train.num_steps": 6,
    "train.log_every": 1,
    "train.eval_every": 6,
    "train.eval_steps": 1,
    "train.checkpoint_every": 3,
    "optimizer.warmup_steps": 1,
}


def read_metrics(workdir: str, name: str = "metrics.jsonl") -> dict:
    with open(os.path.join(workdir, name)) as file:
        return {record["step"]: record for record in map(json.loads, file)}


def test_cli_trains_from_a_save_to_disk_dir_and_resumes_batch_exactly(paths, tmp_path):
    from mlm.configs import quickstart

    workdir = str(tmp_path / "workdir")
    result = subprocess.run(
        [sys.executable, "-m", "mlm.train", "--config", "configs/quickstart.py"]
        + [f"--workdir={workdir}", f"--config.data.hf_dataset={paths['dict']}"]
        + [f"--config.{key}={value}" for key, value in OVERRIDES.items()],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    full = read_metrics(workdir)
    assert sorted(full) == [1, 2, 3, 4, 5, 6]
    assert read_metrics(workdir, "eval_metrics.jsonl")[6]["eval_examples"] == 8
    # Killed after step 4, a run restarts from checkpoint 3 and must repeat steps 4-6 exactly.
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))
    os.remove(os.path.join(resumed, "metrics.jsonl"))
    config = quickstart.get_config()
    config.data.hf_dataset = paths["dict"]
    for key, value in OVERRIDES.items():
        section, name = key.split(".")
        config[section][name] = value
    train_and_evaluate(config, resumed)
    again = read_metrics(resumed)
    assert sorted(again) == [4, 5, 6]
    for step in (4, 5, 6):
        for key in ("loss", "masked_lm_accuracy", "grad_norm"):
            assert again[step][key] == full[step][key], (step, key)
