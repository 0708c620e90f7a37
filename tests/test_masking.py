"""Tests for mlm.data.masking: BERT's count rule, 80/10/10 split, whole-word masking."""

import numpy as np
import pytest

from mlm.data.masking import mask_sequence, num_to_predict

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIAL_IDS = np.array([PAD, UNK, CLS, SEP, MASK])
VOCAB_SIZE = 1000
SEQ_LENGTH = 64
MAX_PREDICTIONS = 10


def _sequence(rng, num_real, seq_length=SEQ_LENGTH, vocab_size=VOCAB_SIZE):
    """Returns ids `[CLS] text [SEP] pad...` with `num_real` real tokens, and the input mask."""
    ids = np.full(seq_length, PAD, np.int32)
    ids[:num_real] = rng.integers(5, vocab_size, num_real)
    ids[0], ids[num_real - 1] = CLS, SEP
    return ids, (np.arange(seq_length) < num_real).astype(np.int32)


def _mask(ids, input_mask, rng, **overrides):
    kwargs = dict(
        masking_rate=0.15,
        max_predictions=MAX_PREDICTIONS,
        mask_id=MASK,
        special_ids=SPECIAL_IDS,
        vocab_size=VOCAB_SIZE,
    )
    kwargs.update(overrides)
    return mask_sequence(ids, input_mask, rng, **kwargs)


def test_num_to_predict_rounds_like_bert():
    assert num_to_predict(128, 0.15, 20) == 19  # round(19.2)
    assert num_to_predict(10, 0.25, 20) == 2  # round(2.5) is 2: half to even, as Python 3 BERT
    assert num_to_predict(30, 0.15, 20) == 4  # round(4.5) is 4
    assert num_to_predict(3, 0.15, 20) == 1  # never fewer than one
    assert num_to_predict(512, 0.15, 20) == 20  # capped


def test_count_rule_is_exact_and_capped_by_candidates():
    rng = np.random.default_rng(0)
    for num_real in range(3, SEQ_LENGTH + 1):
        ids, input_mask = _sequence(rng, num_real)
        out = _mask(ids, input_mask, rng)
        expected = min(MAX_PREDICTIONS, max(1, round(num_real * 0.15)), num_real - 2)
        assert out["masked_lm_weights"].sum() == expected
    # Only one candidate among many special tokens: one prediction, not round(13 * 0.15) = 2.
    ids = np.array([CLS] + [UNK] * 10 + [77, SEP] + [PAD] * 3, np.int32)
    out = _mask(ids, (ids != PAD).astype(np.int32), rng, max_predictions=4)
    np.testing.assert_array_equal(out["masked_lm_positions"], [11, 0, 0, 0])
    np.testing.assert_array_equal(out["masked_lm_ids"], [77, 0, 0, 0])
    np.testing.assert_array_equal(out["masked_lm_weights"], [1, 0, 0, 0])


def test_output_layout_and_dtypes():
    rng = np.random.default_rng(1)
    ids, input_mask = _sequence(rng, 40)
    out = _mask(ids, input_mask, rng)
    assert out["input_word_ids"].dtype == np.int32 and out["input_word_ids"].shape == (64,)
    for key, dtype in [
        ("masked_lm_positions", np.int32),
        ("masked_lm_ids", np.int32),
        ("masked_lm_weights", np.float32),
    ]:
        assert out[key].dtype == dtype and out[key].shape == (MAX_PREDICTIONS,), key
    used = int(out["masked_lm_weights"].sum())
    assert used == 6  # round(40 * 0.15)
    assert not np.shares_memory(out["input_word_ids"], ids)
    assert (ids == _sequence(np.random.default_rng(1), 40)[0]).all()  # input untouched


def test_predictions_are_real_non_special_sorted_and_only_they_change():
    rng = np.random.default_rng(2)
    for _ in range(300):
        num_real = int(rng.integers(3, SEQ_LENGTH + 1))
        ids, input_mask = _sequence(rng, num_real)
        ids[rng.integers(1, num_real - 1, 3)] = UNK  # Specials inside the text too.
        out = _mask(ids, input_mask, rng)
        used = out["masked_lm_weights"] > 0
        positions = out["masked_lm_positions"][used]
        assert (np.diff(positions) > 0).all()
        assert input_mask[positions].all()
        assert not np.isin(ids[positions], SPECIAL_IDS).any()
        np.testing.assert_array_equal(out["masked_lm_ids"][used], ids[positions])
        assert (out["masked_lm_positions"][~used] == 0).all()
        assert (out["masked_lm_ids"][~used] == 0).all()
        unchanged = np.ones(SEQ_LENGTH, bool)
        unchanged[positions] = False
        np.testing.assert_array_equal(out["input_word_ids"][unchanged], ids[unchanged])


def test_replacement_split_is_80_10_10_and_positions_uniform():
    rng = np.random.default_rng(3)
    num_mask = num_kept = num_random = 0
    picks = np.zeros(SEQ_LENGTH, np.int64)
    for _ in range(2000):
        ids, input_mask = _sequence(rng, SEQ_LENGTH)
        out = _mask(ids, input_mask, rng)
        positions = out["masked_lm_positions"][out["masked_lm_weights"] > 0]
        new_ids = out["input_word_ids"][positions]
        num_mask += int((new_ids == MASK).sum())
        num_kept += int((new_ids == ids[positions]).sum())
        num_random += int(((new_ids != MASK) & (new_ids != ids[positions])).sum())
        picks[positions] += 1
    total = num_mask + num_kept + num_random
    assert total == 2000 * MAX_PREDICTIONS
    assert abs(num_mask / total - 0.8) < 0.02
    assert abs(num_kept / total - 0.1) < 0.02
    assert abs(num_random / total - 0.1) < 0.02
    assert picks[0] == picks[-1] == 0  # [CLS] and [SEP]
    inner = picks[1:-1]
    assert inner.min() > 0.8 * inner.mean() and inner.max() < 1.2 * inner.mean()


def test_random_replacements_cover_exactly_the_non_special_ids():
    vocab_size = 12
    special_ids = np.array([11, 3, 0, 4, 3])  # Unsorted, repeated, gaps, the last id included.
    rng = np.random.default_rng(4)
    ids = np.array([0, 5, 6, 7, 8, 9, 10, 1, 2, 0], np.int32)
    input_mask = np.ones(10, np.int32)
    seen = set()
    for _ in range(2000):
        out = mask_sequence(
            ids,
            input_mask,
            rng,
            masking_rate=1.0,
            max_predictions=8,
            mask_id=4,
            special_ids=special_ids,
            vocab_size=vocab_size,
        )
        positions = out["masked_lm_positions"][out["masked_lm_weights"] > 0]
        assert not np.isin(positions, [0, 9]).any()
        new_ids = out["input_word_ids"][positions]
        seen.update(new_ids[(new_ids != 4) & (new_ids != ids[positions])].tolist())
    assert seen == {1, 2, 5, 6, 7, 8, 9, 10}


def _whole_word_case(rng):
    """Returns ids of `[CLS] words [SEP] pad` (words of 1-4 pieces) and each token's word index."""
    num_words = int(rng.integers(3, 20))
    word_lengths = rng.integers(1, 5, num_words)
    pieces = []
    for length in word_lengths:
        pieces.append(rng.integers(5, 500))  # Word start: ids below 500.
        pieces.extend(rng.integers(500, VOCAB_SIZE, length - 1))  # "##" pieces: 500 and up.
    ids = np.array([CLS, *pieces, SEP], np.int32)
    word_of_token = np.concatenate([[-1], np.repeat(np.arange(num_words), word_lengths), [-1]])
    num_real = len(ids)
    padded = np.concatenate([ids, np.full(SEQ_LENGTH - num_real, PAD, np.int32)])
    padded_words = np.concatenate([word_of_token, np.full(SEQ_LENGTH - num_real, -1)])
    return padded, (np.arange(SEQ_LENGTH) < num_real).astype(np.int32), padded_words


def test_whole_word_masking_never_masks_part_of_a_word():
    is_continuation = np.arange(VOCAB_SIZE) >= 500
    rng = np.random.default_rng(5)
    for _ in range(500):
        ids, input_mask, word_of_token = _whole_word_case(rng)
        out = _mask(ids, input_mask, rng, masking_rate=0.3, is_continuation=is_continuation)
        used = out["masked_lm_weights"] > 0
        positions = out["masked_lm_positions"][used]
        assert (np.diff(positions) > 0).all()
        chosen_words = np.unique(word_of_token[positions])
        assert (chosen_words >= 0).all()
        whole_words = np.flatnonzero(np.isin(word_of_token, chosen_words))
        np.testing.assert_array_equal(positions, whole_words)
        count = num_to_predict(int(input_mask.sum()), 0.3, MAX_PREDICTIONS)
        assert len(positions) <= count
        # BERT's greedy skips a word that overflows and tries the rest: when it stops short,
        # no word left out would still have fitted.
        word_lengths = np.bincount(word_of_token[word_of_token >= 0])
        left_out = np.setdiff1d(np.arange(len(word_lengths)), chosen_words)
        assert (word_lengths[left_out] > count - len(positions)).all()


def test_same_generator_state_gives_same_masks():
    ids, input_mask = _sequence(np.random.default_rng(6), 50)
    first = _mask(ids, input_mask, np.random.default_rng(7))
    second = _mask(ids, input_mask, np.random.default_rng(7))
    third = _mask(ids, input_mask, np.random.default_rng(8))
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    assert not np.array_equal(first["masked_lm_positions"], third["masked_lm_positions"])


@pytest.mark.parametrize("num_real", [0, 2])
def test_no_candidates_gives_no_predictions(num_real):
    ids = np.array([CLS, SEP, PAD, PAD], np.int32)[: max(num_real, 0)]
    ids = np.concatenate([ids, np.full(4 - len(ids), PAD, np.int32)])
    out = _mask(ids, (np.arange(4) < num_real).astype(np.int32), np.random.default_rng(0))
    assert out["masked_lm_weights"].sum() == 0
    np.testing.assert_array_equal(out["input_word_ids"], ids)
