"""Model inputs from tokenized documents: chunks for packing, or sentence pairs for NSP.

A document is a list of sentences, each an int32 array of WordPiece ids without special tokens.
Without next-sentence prediction each document is cut into `[CLS] tokens [SEP]` chunks that grain's
first-fit packer then places several to a row; with it, sentence pairs `[CLS] A [SEP] B [SEP]` are
built as in google-research/bert `create_pretraining_data.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import grain
import numpy as np

from mlm.errors import ConfigError

Document = Sequence[np.ndarray]

# Keys grain's packer writes for a packed feature named "input_word_ids".
_PACKED_SEGMENT_KEY = "input_word_ids_segment_ids"
_PACKED_POSITION_KEY = "input_word_ids_positions"


class SentencePair(NamedTuple):
    """One NSP instance, unpadded.

    Attributes:
      input_word_ids: int32 [L], `[CLS] A [SEP] B [SEP]`.
      input_type_ids: int32 [L], 0 for `[CLS] A [SEP]` and 1 for `B [SEP]`.
      next_sentence_label: 0 when B follows A in the document (IsNext), 1 when B is random.
    """

    input_word_ids: np.ndarray
    input_type_ids: np.ndarray
    next_sentence_label: int


def chunk_documents(
    docs: Sequence[Document], seq_length: int, cls_id: int, sep_id: int
) -> list[np.ndarray]:
    """Cuts each document into `[CLS] tokens [SEP]` chunks of at most `seq_length` tokens.

    Whole sentences fill a chunk while they fit; a sentence is split only when it alone is longer
    than `seq_length - 2`, and its last piece starts the next chunk. Every token of every document
    appears in exactly one chunk, in order; chunks never span two documents.

    Args:
      docs: tokenized documents.
      seq_length: the longest chunk, special tokens included; at least 3.
      cls_id: id of [CLS].
      sep_id: id of [SEP].

    Returns:
      int32 arrays, one per chunk, in document order.
    """
    if seq_length < 3:
        raise ConfigError(
            f"data.seq_length={seq_length} leaves no room for text next to [CLS] and [SEP]; "
            "use at least 3"
        )
    body_length = seq_length - 2
    chunks: list[np.ndarray] = []

    def emit(pieces: list[np.ndarray]) -> None:
        chunks.append(np.concatenate([[cls_id], *pieces, [sep_id]]).astype(np.int32))

    for doc in docs:
        pending: list[np.ndarray] = []
        pending_length = 0
        for sentence in doc:
            if pending_length + len(sentence) <= body_length:
                if len(sentence):
                    pending.append(sentence)
                    pending_length += len(sentence)
                continue
            if pending:
                emit(pending)
            pieces = [sentence[i : i + body_length] for i in range(0, len(sentence), body_length)]
            for piece in pieces[:-1]:
                emit([piece])
            pending, pending_length = [pieces[-1]], len(pieces[-1])
        if pending:
            emit(pending)
    return chunks


def pair_instances(
    docs: Sequence[Document],
    seq_length: int,
    short_seq_prob: float,
    rng: np.random.Generator,
    *,
    cls_id: int,
    sep_id: int,
    sentence_order: bool = False,
) -> list[SentencePair]:
    """Builds NSP sentence pairs from every document, as BERT's `create_instances_from_document`.

    Args:
      docs: tokenized documents; empty sentences and documents are ignored.
      seq_length: the longest instance, special tokens included; at least 5.
      short_seq_prob: probability of a target length shorter than `seq_length - 3`.
      rng: source of all random choices.
      cls_id: id of [CLS].
      sep_id: id of [SEP].
      sentence_order: ALBERT's sentence-order pairs instead (see `document_pairs`).

    Returns:
      The instances, document by document (see `document_pairs`).
    """
    _check_pair_length(seq_length)
    pairs: list[SentencePair] = []
    for document_index in range(len(docs)):
        pairs.extend(
            document_pairs(
                docs,
                document_index,
                seq_length,
                short_seq_prob,
                rng,
                cls_id=cls_id,
                sep_id=sep_id,
                sentence_order=sentence_order,
            )
        )
    return pairs


def document_pairs(
    docs: Sequence[Document],
    document_index: int,
    seq_length: int,
    short_seq_prob: float,
    rng: np.random.Generator,
    *,
    cls_id: int,
    sep_id: int,
    sentence_order: bool = False,
) -> list[SentencePair]:
    """Builds the NSP sentence pairs of one document, as BERT's `create_instances_from_document`.

    Pick a target length (`seq_length - 3`, or with probability `short_seq_prob` a random length
    from 2), gather sentences up to it and split them at a random sentence boundary into A and B.
    Half of the time (always when only one sentence was gathered) B is instead a span from a
    random other document and the unused sentences are put back. The pair is cut to
    `seq_length - 3` tokens by dropping tokens from the front or back (at random) of the longer
    side. Documents are only indexed (`docs[i]`), so `docs` may be a random-access dataset.

    With `sentence_order` the pairs are ALBERT's sentence-order pairs instead (its
    `create_instances_from_document_albert` without random_next_sentence): half of the time A and
    B, consecutive in the document, are swapped (label 1); a chunk of a single sentence still
    takes a random B (label 1), as ALBERT does.

    Args:
      docs: tokenized documents; empty sentences and documents are ignored.
      document_index: the document to pair.
      seq_length: the longest instance, special tokens included; at least 5.
      short_seq_prob: probability of a target length shorter than `seq_length - 3`.
      rng: source of all random choices.
      cls_id: id of [CLS].
      sep_id: id of [SEP].
      sentence_order: ALBERT's sentence-order pairs instead of next-sentence pairs.

    Returns:
      The document's instances, in order (none for an empty document).
    """
    _check_pair_length(seq_length)
    document = _sentences(docs[document_index])
    if not document:
        return []
    return [
        _sentence_pair(tokens_a, tokens_b, label, cls_id, sep_id)
        for tokens_a, tokens_b, label in _segment_pairs(
            docs, document, document_index, seq_length - 3, short_seq_prob, rng, sentence_order
        )
    ]


def _check_pair_length(seq_length: int) -> None:
    if seq_length < 5:
        raise ConfigError(
            f"data.seq_length={seq_length} is too short for [CLS] A [SEP] B [SEP]; use at least 5"
        )


def _sentences(document: Document) -> list[np.ndarray]:
    return [sentence for sentence in document if len(sentence)]


def _segment_pairs(
    docs: Sequence[Document],
    document: list[np.ndarray],
    document_index: int,
    max_num_tokens: int,
    short_seq_prob: float,
    rng: np.random.Generator,
    sentence_order: bool = False,
) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """Returns (tokens A, tokens B, label) for one document, BERT's (or ALBERT's) algorithm.

    The label is 1 when B is random (or, with `sentence_order`, swapped with A), else 0.
    """
    target_seq_length = max_num_tokens
    if rng.random() < short_seq_prob:
        target_seq_length = int(rng.integers(2, max_num_tokens + 1))

    segment_pairs = []
    current_chunk: list[np.ndarray] = []
    current_length = 0
    i = 0
    while i < len(document):
        current_chunk.append(document[i])
        current_length += len(document[i])
        if i == len(document) - 1 or current_length >= target_seq_length:
            a_end = int(rng.integers(1, len(current_chunk))) if len(current_chunk) >= 2 else 1
            tokens_a = np.concatenate(current_chunk[:a_end])
            is_random_next = len(current_chunk) == 1 or (not sentence_order and rng.random() < 0.5)
            swapped = False
            if is_random_next:
                target_b_length = target_seq_length - len(tokens_a)
                tokens_b = _random_span(docs, document, document_index, target_b_length, rng)
                i -= len(current_chunk) - a_end  # Put the unused sentences back.
            else:
                tokens_b = np.concatenate(current_chunk[a_end:])
                if sentence_order and rng.random() < 0.5:
                    tokens_a, tokens_b, swapped = tokens_b, tokens_a, True
            tokens_a, tokens_b = _truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng)
            segment_pairs.append((tokens_a, tokens_b, is_random_next or swapped))
            current_chunk, current_length = [], 0
        i += 1
    return segment_pairs


def _random_span(
    docs: Sequence[Document],
    document: list[np.ndarray],
    document_index: int,
    target_length: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Returns sentences from a random start in another document, up to `target_length`.

    As BERT, gives up after 10 draws (a corpus of a single document) and then uses `document`;
    empty documents are drawn again the same way.
    """
    random_document = document
    for _ in range(10):
        random_document_index = int(rng.integers(0, len(docs)))
        if random_document_index != document_index:
            candidate = _sentences(docs[random_document_index])
            if candidate:
                random_document = candidate
                break
    span: list[np.ndarray] = []
    span_length = 0
    for sentence in random_document[int(rng.integers(0, len(random_document))) :]:
        span.append(sentence)
        span_length += len(sentence)
        if span_length >= target_length:
            break
    return np.concatenate(span)


def _truncate_seq_pair(
    tokens_a: np.ndarray, tokens_b: np.ndarray, max_num_tokens: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Drops tokens from the longer side (B on ties), front or back at random, until they fit."""
    length_a, length_b = len(tokens_a), len(tokens_b)
    front_a = front_b = 0
    while length_a + length_b > max_num_tokens:
        from_front = rng.random() < 0.5
        if length_a > length_b:
            length_a -= 1
            front_a += from_front
        else:
            length_b -= 1
            front_b += from_front
    return tokens_a[front_a : front_a + length_a], tokens_b[front_b : front_b + length_b]


def _sentence_pair(
    tokens_a: np.ndarray, tokens_b: np.ndarray, is_random_next: bool, cls_id: int, sep_id: int
) -> SentencePair:
    input_word_ids = np.concatenate([[cls_id], tokens_a, [sep_id], tokens_b, [sep_id]])
    input_type_ids = np.repeat(np.array([0, 1], np.int32), [len(tokens_a) + 2, len(tokens_b) + 1])
    return SentencePair(input_word_ids.astype(np.int32), input_type_ids, int(is_random_next))


def pack_chunks(
    chunks: grain.IterDataset,
    seq_length: int,
    pad_id: int,
    *,
    num_packing_bins: int,
    seed: int,
    shuffle_bins: bool,
) -> grain.IterDataset:
    """Packs chunks several per row with grain's first-fit packer.

    Args:
      chunks: dataset of int32 [L] arrays with L <= seq_length.
      seq_length: length of every packed row.
      pad_id: id written at padding.
      num_packing_bins: rows filled at once; more rows pack tighter but mix more of the input
        order.
      seed: seed of the row shuffle.
      shuffle_bins: whether to emit the rows of one packing round in a shuffled order.

    Returns:
      Dataset of dicts with int32 [seq_length] `input_word_ids`, `packed_segment_ids`
      (1, 2, ... per chunk, 0 at padding) and `position_ids` (restarting at 0 per chunk).
    """
    packed = grain.experimental.FirstFitPackIterDataset(
        chunks.map(_as_packable),
        length_struct={"input_word_ids": seq_length},
        num_packing_bins=num_packing_bins,
        seed=seed,
        shuffle_bins=shuffle_bins,
        padding_struct={"input_word_ids": pad_id},
    )
    return packed.map(_rename_packed_features)


def _as_packable(chunk: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_word_ids": chunk}


def _rename_packed_features(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "input_word_ids": row["input_word_ids"],
        "packed_segment_ids": row[_PACKED_SEGMENT_KEY],
        "position_ids": row[_PACKED_POSITION_KEY],
    }
