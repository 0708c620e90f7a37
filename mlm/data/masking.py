"""Dynamic masking for masked-language modelling, following the original BERT rules.

The rules are those of google-research/bert `create_pretraining_data.py` (also used by the TF Model
Garden): real, non-special tokens are candidates; `round(num_tokens * masking_rate)` of them (at
least 1, at most `max_predictions`) are predicted; each predicted token becomes [MASK] 80% of the
time, a random token 10% and stays unchanged 10%. With whole-word masking a word (a token and the
`##` continuation tokens after it) is chosen whole or not at all.
"""

from __future__ import annotations

import numpy as np

MASK_PROB = 0.8
RANDOM_TOKEN_PROB = 0.1  # The remaining 1 - MASK_PROB - RANDOM_TOKEN_PROB keeps the token.


def num_to_predict(num_real_tokens: int, masking_rate: float, max_predictions: int) -> int:
    """Returns how many tokens BERT predicts in a sequence, before capping by the candidates.

    Args:
      num_real_tokens: non-padding tokens in the sequence, [CLS] and [SEP] included (BERT's
        `len(tokens)`).
      masking_rate: fraction of tokens to predict (BERT's `masked_lm_prob`).
      max_predictions: upper bound (BERT's `max_predictions_per_seq`).

    Returns:
      `min(max_predictions, max(1, round(num_real_tokens * masking_rate)))`, with Python's
      round-half-to-even as in BERT.
    """
    return min(max_predictions, max(1, int(round(num_real_tokens * masking_rate))))


def mask_sequence(
    input_word_ids: np.ndarray,
    input_mask: np.ndarray,
    rng: np.random.Generator,
    *,
    masking_rate: float,
    max_predictions: int,
    mask_id: int,
    special_ids: np.ndarray,
    vocab_size: int,
    is_continuation: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Chooses the tokens to predict in one sequence and corrupts them.

    Args:
      input_word_ids: int [S] token ids, padding included.
      input_mask: int [S], 1 for real tokens and 0 for padding.
      rng: source of randomness; the same generator state gives the same result.
      masking_rate: fraction of the real tokens to predict.
      max_predictions: P, the most tokens predicted and the length of the outputs below.
      mask_id: id of [MASK].
      special_ids: ids that are never predicted ([CLS], [SEP], [PAD], [MASK], [UNK], ...) and
        never drawn as random replacements.
      vocab_size: random replacements are drawn uniformly from the non-special ids below it.
      is_continuation: bool [vocab_size], True for `##` continuation pieces; enables
        whole-word masking when given.

    Returns:
      A dict with `input_word_ids` (int32 [S], corrupted copy), `masked_lm_positions`
      (int32 [P], ascending), `masked_lm_ids` (int32 [P], the original ids) and
      `masked_lm_weights` (float32 [P], 1.0 where used); unused slots are 0 / 0 / 0.0.
    """
    input_word_ids = np.asarray(input_word_ids)
    special_ids = _sorted_unique(np.asarray(special_ids))
    is_candidate = (np.asarray(input_mask) != 0) & ~_is_special(input_word_ids, special_ids)
    count = num_to_predict(int(np.count_nonzero(input_mask)), masking_rate, max_predictions)
    if is_continuation is None:
        positions = _choose_tokens(is_candidate, count, rng)
    else:
        continues_word = np.asarray(is_continuation)[input_word_ids]
        positions = _choose_whole_words(is_candidate, continues_word, count, rng)

    original_ids = input_word_ids[positions]
    draw = rng.random(len(positions))
    random_ids = _draw_non_special_ids(rng, len(positions), special_ids, vocab_size)
    new_ids = np.where(
        draw < MASK_PROB,
        mask_id,
        np.where(draw < MASK_PROB + RANDOM_TOKEN_PROB, random_ids, original_ids),
    )
    masked_word_ids = input_word_ids.astype(np.int32, copy=True)
    masked_word_ids[positions] = new_ids

    num_predicted = len(positions)
    masked_lm_positions = np.zeros(max_predictions, np.int32)
    masked_lm_ids = np.zeros(max_predictions, np.int32)
    masked_lm_weights = np.zeros(max_predictions, np.float32)
    masked_lm_positions[:num_predicted] = positions
    masked_lm_ids[:num_predicted] = original_ids
    masked_lm_weights[:num_predicted] = 1.0
    return {
        "input_word_ids": masked_word_ids,
        "masked_lm_positions": masked_lm_positions,
        "masked_lm_ids": masked_lm_ids,
        "masked_lm_weights": masked_lm_weights,
    }


def _sorted_unique(ids: np.ndarray) -> np.ndarray:
    """Returns `ids` sorted without repeats; cheap when they already are (the usual case)."""
    if len(ids) < 2 or (ids[1:] > ids[:-1]).all():
        return ids
    return np.unique(ids)


def _is_special(token_ids: np.ndarray, special_ids: np.ndarray) -> np.ndarray:
    """Returns bool [S]: whether each token id is in `special_ids` (sorted, unique)."""
    if len(special_ids) == 0:
        return np.zeros(len(token_ids), bool)
    index = np.minimum(np.searchsorted(special_ids, token_ids), len(special_ids) - 1)
    return special_ids[index] == token_ids


def _choose_tokens(is_candidate: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Returns up to `count` distinct candidate positions chosen uniformly, ascending."""
    candidates = np.flatnonzero(is_candidate)
    count = min(count, len(candidates))
    chosen = candidates[rng.permutation(len(candidates))[:count]]
    chosen.sort()
    return chosen


def _choose_whole_words(
    is_candidate: np.ndarray, continues_word: np.ndarray, count: int, rng: np.random.Generator
) -> np.ndarray:
    """Returns the positions of whole words chosen in random order, ascending.

    Words are taken in a random order while they fit into `count`; a word that would overflow it
    is skipped and the next one tried, as in BERT.
    """
    previous_is_candidate = np.concatenate(([False], is_candidate[:-1]))
    starts_word = is_candidate & ~(continues_word & previous_is_candidate)
    word_index = np.cumsum(starts_word) - 1  # Word of each candidate position.
    num_words = int(np.count_nonzero(starts_word))
    if num_words == 0:
        return np.zeros(0, np.int64)
    word_lengths = np.bincount(word_index[is_candidate], minlength=num_words)

    order = rng.permutation(num_words)
    total_lengths = np.cumsum(word_lengths[order])
    num_fitting = int(np.searchsorted(total_lengths, count, side="right"))
    is_chosen_word = np.zeros(num_words, bool)
    is_chosen_word[order[:num_fitting]] = True
    # Words after the first that overflows: BERT keeps trying smaller ones until full.
    total = int(total_lengths[num_fitting - 1]) if num_fitting else 0
    for word in order[num_fitting:]:
        if total >= count:
            break
        if total + word_lengths[word] <= count:
            is_chosen_word[word] = True
            total += int(word_lengths[word])
    return np.flatnonzero(is_candidate & is_chosen_word[word_index])


def _draw_non_special_ids(
    rng: np.random.Generator, count: int, special_ids: np.ndarray, vocab_size: int
) -> np.ndarray:
    """Returns `count` ids drawn uniformly from the non-special ids in [0, vocab_size).

    `special_ids` must be sorted and unique.
    """
    specials = special_ids[(special_ids >= 0) & (special_ids < vocab_size)]
    # The r-th non-special id is r plus the number of specials s_k with s_k - k <= r.
    non_special_below = specials - np.arange(len(specials))
    ranks = rng.integers(0, vocab_size - len(specials), size=count)
    return ranks + np.searchsorted(non_special_below, ranks, side="right")
