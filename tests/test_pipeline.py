"""Tests for mlm.data.pipeline: batch format, determinism, resumption, epochs, shards, errors."""

import dataclasses
import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mlm.data.instances import chunk_documents
from mlm.data.pipeline import build_dataset, first_batch
from mlm.errors import ConfigError, DataError

SEQ_LENGTH = 32
MAX_PREDICTIONS = 5
BATCH_KEYS = {
    "input_word_ids": (np.int32, (SEQ_LENGTH,)),
    "input_mask": (np.int32, (SEQ_LENGTH,)),
    "input_type_ids": (np.int32, (SEQ_LENGTH,)),
    "packed_segment_ids": (np.int32, (SEQ_LENGTH,)),
    "position_ids": (np.int32, (SEQ_LENGTH,)),
    "masked_lm_positions": (np.int32, (MAX_PREDICTIONS,)),
    "masked_lm_ids": (np.int32, (MAX_PREDICTIONS,)),
    "masked_lm_weights": (np.float32, (MAX_PREDICTIONS,)),
    "next_sentence_labels": (np.int32, ()),
}


@dataclasses.dataclass(frozen=True)
class FakeVocab:
    size: int = 1000
    pad_id: int = 0
    unk_id: int = 1
    cls_id: int = 2
    sep_id: int = 3
    mask_id: int = 4
    special_ids: np.ndarray = dataclasses.field(default_factory=lambda: np.arange(5))
    is_continuation: np.ndarray = dataclasses.field(default_factory=lambda: np.arange(1000) >= 600)


VOCAB = FakeVocab()


def _docs(num_docs=40, seed=0):
    rng = np.random.default_rng(seed)
    return [
        [
            rng.integers(5, 1000, rng.integers(1, 12)).astype(np.int32)
            for _ in range(rng.integers(1, 8))
        ]
        for _ in range(num_docs)
    ]


def _dataset(docs=None, **overrides):
    kwargs = dict(
        seq_length=SEQ_LENGTH,
        max_predictions=MAX_PREDICTIONS,
        masking_rate=0.15,
        whole_word_masking=False,
        use_next_sentence_label=False,
        short_seq_prob=0.1,
        batch_size=4,
        seed=0,
        train=True,
    )
    kwargs.update(overrides)
    return build_dataset(_docs() if docs is None else docs, VOCAB, **kwargs)


def _take(iterator, num_batches):
    return [next(iterator) for _ in range(num_batches)]


def _assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _unmasked_rows(batches):
    """Returns the rows' token ids with the original ids put back at the predicted slots."""
    rows = []
    for batch in batches:
        for i, ids in enumerate(batch["input_word_ids"].copy()):
            used = batch["masked_lm_weights"][i] > 0
            ids[batch["masked_lm_positions"][i][used]] = batch["masked_lm_ids"][i][used]
            rows.append((ids, batch["packed_segment_ids"][i]))
    return rows


def _packed_chunks(batches):
    """Returns the (unmasked) chunks of packed rows, as bytes."""
    chunks = []
    for ids, segments in _unmasked_rows(batches):
        for segment in range(1, int(segments.max()) + 1):
            chunks.append(ids[segments == segment].tobytes())
    return chunks


@pytest.mark.parametrize("use_next_sentence_label", [False, True])
@pytest.mark.parametrize("whole_word_masking", [False, True])
def test_batches_follow_the_contract(use_next_sentence_label, whole_word_masking):
    dataset = _dataset(
        use_next_sentence_label=use_next_sentence_label, whole_word_masking=whole_word_masking
    )
    for batch in _take(iter(dataset), 5):
        assert batch.keys() == BATCH_KEYS.keys()
        for key, (dtype, shape) in BATCH_KEYS.items():
            assert batch[key].dtype == dtype and batch[key].shape == (4, *shape), key
        input_mask, segments = batch["input_mask"], batch["packed_segment_ids"]
        np.testing.assert_array_equal(input_mask, (segments > 0).astype(np.int32))
        for i in range(4):
            ids, real = batch["input_word_ids"][i], input_mask[i].astype(bool)
            assert (ids[~real] == VOCAB.pad_id).all()
            for segment in range(1, int(segments[i].max()) + 1):
                where = np.flatnonzero(segments[i] == segment)
                assert ids[where[0]] == VOCAB.cls_id and ids[where[-1]] == VOCAB.sep_id
                np.testing.assert_array_equal(
                    batch["position_ids"][i][where], np.arange(len(where))
                )
            used = batch["masked_lm_weights"][i] > 0
            positions = batch["masked_lm_positions"][i][used]
            expected = min(MAX_PREDICTIONS, max(1, round(real.sum() * 0.15)))
            assert used.sum() == expected if not whole_word_masking else used.sum() <= expected
            assert real[positions].all() and (np.diff(positions) > 0).all()
            assert not np.isin(batch["masked_lm_ids"][i][used], VOCAB.special_ids).any()
        if use_next_sentence_label:
            np.testing.assert_array_equal(segments, input_mask)  # One sequence per row.
            assert set(np.unique(batch["next_sentence_labels"])) <= {0, 1}
            assert (batch["input_type_ids"][input_mask == 0] == 0).all()
        else:
            assert (batch["input_type_ids"] == 0).all()
            assert (batch["next_sentence_labels"] == 0).all()
            assert (segments.max(axis=1) > 1).any()  # Rows hold several chunks.


@pytest.mark.parametrize("use_next_sentence_label", [False, True])
def test_same_seed_gives_same_batches_and_another_seed_differs(use_next_sentence_label):
    first = _take(iter(_dataset(use_next_sentence_label=use_next_sentence_label)), 6)
    second = _take(iter(_dataset(use_next_sentence_label=use_next_sentence_label)), 6)
    _assert_same_batches(first, second)
    other = _take(iter(_dataset(use_next_sentence_label=use_next_sentence_label, seed=1)), 6)
    assert not all(
        np.array_equal(a["input_word_ids"], b["input_word_ids"])
        for a, b in zip(first, other, strict=True)
    )


def batches_digest(use_next_sentence_label: bool) -> str:
    """sha256 of the first batches; also called from a fresh interpreter below."""
    digest = hashlib.sha256()
    for batch in _take(iter(_dataset(use_next_sentence_label=use_next_sentence_label)), 4):
        for key in sorted(batch):
            digest.update(batch[key].tobytes())
    return digest.hexdigest()


def test_fresh_process_gives_same_batches():
    script = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "from test_pipeline import batches_digest; "
        "print(batches_digest(False), batches_digest(True))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == [batches_digest(False), batches_digest(True)]


@pytest.mark.parametrize("use_next_sentence_label", [False, True])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("num_before", [3, 11])
def test_restored_state_continues_exactly(use_next_sentence_label, train, num_before):
    docs = _docs(num_docs=120)  # Evaluation has more than 15 batches.
    options = dict(use_next_sentence_label=use_next_sentence_label, train=train)
    iterator = iter(_dataset(docs, **options))
    _take(iterator, num_before)
    state = json.loads(json.dumps(iterator.get_state()))  # Checkpointable as JSON.
    expected = _take(iterator, 4)

    restored = iter(_dataset(docs, **options))
    restored.set_state(state)
    _assert_same_batches(_take(restored, 4), expected)


def test_training_repeats_with_new_order_pairs_and_masks_each_epoch():
    dataset = _dataset(use_next_sentence_label=True, batch_size=1)
    eval_rows = [
        ids.tobytes()
        for ids, _ in _unmasked_rows(
            list(_dataset(use_next_sentence_label=True, batch_size=1, train=False))
        )
    ]
    num_pairs = len(eval_rows)
    batches = _take(iter(dataset), 3 * num_pairs)
    rows = [ids.tobytes() for ids, _ in _unmasked_rows(batches)]
    epoch_1, later = rows[:num_pairs], rows[num_pairs:]
    assert Counter(epoch_1) == Counter(eval_rows)  # The first epoch is the eval pass, shuffled.
    assert epoch_1 != eval_rows
    # Later epochs draw new random-next segments (and keep the IsNext pairs).
    assert set(later) - set(epoch_1)
    masks = {}
    for row, batch in zip(rows, batches, strict=True):
        masks.setdefault(row, []).append(batch["masked_lm_positions"].tobytes())
    repeated = [positions for positions in masks.values() if len(positions) > 1]
    assert repeated and any(len(set(positions)) > 1 for positions in repeated)  # New masks.


@pytest.mark.parametrize("use_next_sentence_label", [False, True])
def test_evaluation_is_one_fixed_pass(use_next_sentence_label):
    dataset = _dataset(use_next_sentence_label=use_next_sentence_label, train=False)
    first, second = list(dataset), list(dataset)
    assert 3 <= len(first) < 40
    _assert_same_batches(first, second)
    other_seed = list(
        _dataset(use_next_sentence_label=use_next_sentence_label, train=False, seed=3)
    )
    assert not all(
        np.array_equal(a["masked_lm_positions"], b["masked_lm_positions"])
        for a, b in zip(first[:3], other_seed[:3], strict=True)
    )


def test_evaluation_packs_every_chunk_exactly_once():
    docs = _docs()
    batches = list(_dataset(docs, train=False, batch_size=1))
    expected = chunk_documents(docs, SEQ_LENGTH, VOCAB.cls_id, VOCAB.sep_id)
    assert Counter(_packed_chunks(batches)) == Counter(c.tobytes() for c in expected)
    real_fraction = np.mean([b["input_mask"].mean() for b in batches])
    assert real_fraction > 0.8


@pytest.mark.parametrize("use_next_sentence_label", [False, True])
def test_shards_are_disjoint_and_cover_the_data(use_next_sentence_label):
    docs = _docs(num_docs=60)
    options = dict(use_next_sentence_label=use_next_sentence_label, train=False, batch_size=1)
    everything = Counter(_shard_items(_dataset(docs, **options), use_next_sentence_label))
    shards = [
        Counter(
            _shard_items(
                _dataset(docs, shard_index=i, shard_count=3, **options), use_next_sentence_label
            )
        )
        for i in range(3)
    ]
    assert all(len(shard) > 0 for shard in shards)
    for i in range(3):
        for j in range(i + 1, 3):
            assert not shards[i].keys() & shards[j].keys()
    assert shards[0] + shards[1] + shards[2] == everything


def _shard_items(dataset, use_next_sentence_label):
    batches = list(dataset)
    if use_next_sentence_label:
        return [ids.tobytes() for ids, _ in _unmasked_rows(batches)]
    return _packed_chunks(batches)


def test_too_little_text_is_a_data_error():
    empty = [[], [np.zeros(0, np.int32)]]
    for use_next_sentence_label in (False, True):
        with pytest.raises(DataError, match="all 2 documents hold no text"):
            next(iter(_dataset(empty, use_next_sentence_label=use_next_sentence_label)))
    short_docs = [[np.arange(5, 25, dtype=np.int32)]] * 3  # 3 chunks, 66 tokens: 3 rows at most.
    for use_next_sentence_label in (False, True):
        dataset = _dataset(short_docs, use_next_sentence_label=use_next_sentence_label, train=False)
        with pytest.raises(DataError, match="data.eval_files: fewer examples than one batch of 4"):
            first_batch(dataset, "data.eval_files", 4)
    # Training repeats the data, so even a little text fills batches.
    assert first_batch(_dataset(short_docs), "data.train_files", 4)["input_word_ids"].shape == (
        4,
        SEQ_LENGTH,
    )
    with pytest.raises(DataError, match="shard 5 of 6 holds no documents"):
        _dataset(_docs(num_docs=3), shard_index=5, shard_count=6)


def test_invalid_shard_or_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="shard_index=2"):
        _dataset(shard_index=2, shard_count=2)
    with pytest.raises(ConfigError, match="max_predictions_per_seq"):
        _dataset(max_predictions=0)
    with pytest.raises(ConfigError, match="seed=-1"):
        _dataset(seed=-1)
