"""Tests for mlm.input_bench: input-pipeline records and the per-length config."""

import pytest

from mlm import config as config_lib
from mlm import input_bench

SEQ_LENGTHS = (32, 64)


def tiny_config(bench_corpus: str, **data):
    config = config_lib.base_config()
    config.model.update(vocab_size=200, max_position_embeddings=32)
    config.data.update(train_files=bench_corpus, use_next_sentence_label=False)
    config.data.update(**data)
    config.train.update(global_batch_size=4)
    return config


@pytest.mark.parametrize("next_sentence", [False, True])
def test_bench_input_gives_one_record_per_length(bench_corpus, tmp_path, next_sentence):
    config = tiny_config(bench_corpus, use_next_sentence_label=next_sentence)
    records = input_bench.bench_input(
        config, str(tmp_path), seq_lengths=SEQ_LENGTHS, num_batches=3, warmup_batches=1
    )
    assert [r["seq_length"] for r in records] == list(SEQ_LENGTHS)
    assert [r["max_predictions_per_seq"] for r in records] == [5, 10]  # round(0.15 * S)
    assert [r["vocab_built"] for r in records] == [True, False]  # the workdir is reused
    for record in records:
        assert record["source"] == "data.train_files"
        assert record["next_sentence"] is next_sentence
        assert record["batch_size"] == 4
        assert record["setup_s"] > 0 and record["ms_per_batch"] > 0
        assert record["cpu_ms_per_batch"] >= 0
        assert record["examples_per_s"] > 0 and record["real_tokens_per_s"] > 0
        expected = record["examples_per_s"] * record["seq_length"]
        assert record["tokens_per_s"] == pytest.approx(expected, rel=1e-9)
        assert 0 < record["real_token_fraction"] <= 1
        assert record["real_tokens_per_s"] == pytest.approx(
            record["tokens_per_s"] * record["real_token_fraction"], rel=1e-9
        )
        assert 0 < record["masked_per_example"] <= record["max_predictions_per_seq"]
        assert record["vocab_size"] <= 200
    assert config.data.seq_length == 128  # the caller's config is left alone
    table = input_bench.format_table(records)
    assert "examples/s" in table and len(table.splitlines()) == 2 + len(SEQ_LENGTHS)


def test_bench_input_without_lengths_uses_the_config(bench_corpus, tmp_path):
    config = tiny_config(bench_corpus, seq_length=32, max_predictions_per_seq=3)
    (record,) = input_bench.bench_input(config, str(tmp_path), num_batches=2, warmup_batches=0)
    assert (record["seq_length"], record["max_predictions_per_seq"]) == (32, 3)


def test_bench_input_with_worker_processes(bench_corpus, tmp_path):
    config = tiny_config(bench_corpus, num_workers=2, prefetch_batches=1)
    (record,) = input_bench.bench_input(
        config, str(tmp_path), seq_lengths=(32,), num_batches=3, warmup_batches=2
    )
    assert record["num_workers"] == 2 and record["thread_prefetch"] == 1
    assert record["examples_per_s"] > 0


def test_bert_max_predictions_and_positions():
    assert input_bench.max_predictions_for(128, 0.15) == 20
    assert input_bench.max_predictions_for(512, 0.15) == 76
    assert input_bench.max_predictions_for(256, 0.15) == 38
    config = input_bench.config_for_seq_length(config_lib.base_config(), 1024)
    assert config.model.max_position_embeddings == 1024
    assert config.data.max_predictions_per_seq == 154


def test_bad_arguments_are_config_errors(bench_corpus, tmp_path):
    with pytest.raises(config_lib.ConfigError, match="--num_batches"):
        input_bench.bench_input(tiny_config(bench_corpus), str(tmp_path), num_batches=0)
