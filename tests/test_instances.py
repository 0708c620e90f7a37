"""Tests for mlm.data.instances: chunking, BERT sentence pairs and grain packing."""

from collections import Counter

import grain
import numpy as np
import pytest

from mlm.data.instances import chunk_documents, pack_chunks, pair_instances
from mlm.errors import ConfigError

PAD, CLS, SEP = 0, 2, 3
READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def _docs(rng, num_docs, num_sentences, sentence_length):
    """Random documents; text ids are >= 5 so they never collide with special ids."""
    return [
        [
            rng.integers(5, 1000, rng.integers(*sentence_length)).astype(np.int32)
            for _ in range(rng.integers(*num_sentences))
        ]
        for _ in range(num_docs)
    ]


def _contains(haystack, needle):
    return needle.tobytes() in haystack.tobytes() and len(needle) > 0


def test_chunks_keep_every_token_once_in_order_within_seq_length():
    rng = np.random.default_rng(0)
    docs = _docs(rng, 30, (1, 12), (0, 40))
    docs[3].append(rng.integers(5, 1000, 75).astype(np.int32))  # Longer than two chunks.
    docs.append([])
    chunks = chunk_documents(docs, 32, CLS, SEP)
    assert all(c.dtype == np.int32 and 3 <= len(c) <= 32 for c in chunks)
    assert all(c[0] == CLS and c[-1] == SEP for c in chunks)
    assert not any(np.isin(c[1:-1], [CLS, SEP]).any() for c in chunks)
    text = np.concatenate([s for doc in docs for s in doc])
    np.testing.assert_array_equal(np.concatenate([c[1:-1] for c in chunks]), text)
    # Chunks never span two documents: each chunk's text is inside one document.
    for chunk in chunks:
        assert sum(_contains(np.concatenate(doc), chunk[1:-1]) for doc in docs if doc) >= 1


def test_chunks_fill_with_whole_sentences_and_split_only_long_ones():
    sentences = [np.full(n, 10 + i, np.int32) for i, n in enumerate([3, 4, 2, 9, 1, 20, 2])]
    chunks = chunk_documents([sentences], 10, CLS, SEP)  # 8 text tokens per chunk.
    bodies = [c[1:-1].tolist() for c in chunks]
    assert bodies == [
        [10] * 3 + [11] * 4,  # + the 2 of the next sentence would make 9 > 8
        [12] * 2,  # + 9 does not fit
        [13] * 8,  # the 9-token sentence alone is too long: split,
        [13] + [14],  # its rest starts the next chunk
        [15] * 8,
        [15] * 8,
        [15] * 4 + [16] * 2,
    ]


def test_chunks_reject_seq_length_without_room_for_text():
    with pytest.raises(ConfigError, match="seq_length=2"):
        chunk_documents([[np.ones(3, np.int32)]], 2, CLS, SEP)


def _split_pair(pair):
    ids = pair.input_word_ids
    first_sep = int(np.flatnonzero(ids == SEP)[0])
    return ids[1:first_sep], ids[first_sep + 1 : -1], first_sep


def test_pairs_have_bert_structure_and_balanced_labels():
    rng = np.random.default_rng(1)
    docs = _docs(rng, 400, (20, 60), (2, 5))
    pairs = pair_instances(docs, 32, 0.1, np.random.default_rng(2), cls_id=CLS, sep_id=SEP)
    assert len(pairs) > 2000
    for pair in pairs:
        ids, types = pair.input_word_ids, pair.input_type_ids
        assert ids.dtype == types.dtype == np.int32
        assert len(ids) == len(types) <= 32
        tokens_a, tokens_b, first_sep = _split_pair(pair)
        assert ids[0] == CLS and ids[-1] == SEP and (ids == SEP).sum() == 2
        assert len(tokens_a) >= 1 and len(tokens_b) >= 1
        assert (types[: first_sep + 1] == 0).all() and (types[first_sep + 1 :] == 1).all()
        assert pair.next_sentence_label in (0, 1)
    # BERT: 50% random B, plus always random when only one sentence was gathered.
    assert 0.47 < np.mean([p.next_sentence_label for p in pairs]) < 0.58


def test_is_next_pairs_are_consecutive_sentences_of_one_document():
    rng = np.random.default_rng(3)
    docs = _docs(rng, 50, (2, 10), (1, 8))  # Short: 512 never truncates.
    pairs = pair_instances(docs, 512, 0.0, np.random.default_rng(4), cls_id=CLS, sep_id=SEP)
    doc_texts = [np.concatenate(doc) for doc in docs]
    num_is_next = 0
    for pair in pairs:
        tokens_a, tokens_b, _ = _split_pair(pair)
        homes = [t for t in doc_texts if _contains(t, tokens_a)]
        assert homes  # A is always a contiguous span of one document.
        if pair.next_sentence_label == 0:
            num_is_next += 1
            assert any(_contains(t, np.concatenate([tokens_a, tokens_b])) for t in homes)
    assert num_is_next > 0.3 * len(pairs)


def test_single_sentence_chunks_always_get_a_random_next():
    rng = np.random.default_rng(5)
    docs = _docs(rng, 30, (3, 6), (40, 60))  # Every sentence alone exceeds the target length.
    pairs = pair_instances(docs, 32, 0.0, np.random.default_rng(6), cls_id=CLS, sep_id=SEP)
    assert len(pairs) == sum(len(doc) for doc in docs)
    assert all(p.next_sentence_label == 1 and len(p.input_word_ids) == 32 for p in pairs)


def test_sentence_order_pairs_are_in_order_or_swapped_never_random():
    rng = np.random.default_rng(7)
    docs = _docs(rng, 50, (2, 10), (1, 8))  # Short: 512 never truncates.
    pairs = pair_instances(
        docs, 512, 0.0, np.random.default_rng(8), cls_id=CLS, sep_id=SEP, sentence_order=True
    )
    doc_texts = [np.concatenate(doc) for doc in docs]
    labels = Counter()
    for pair in pairs:
        tokens_a, tokens_b, _ = _split_pair(pair)
        home = next(t for t in doc_texts if _contains(t, tokens_a))
        in_order = _contains(home, np.concatenate([tokens_a, tokens_b]))
        swapped = _contains(home, np.concatenate([tokens_b, tokens_a]))
        if pair.next_sentence_label == 0:
            assert in_order
        else:  # Swapped, or (a one-sentence chunk, as ALBERT) B from elsewhere.
            assert swapped or len(pair.input_word_ids) and not in_order
        labels[pair.next_sentence_label, swapped] += 1
    assert labels[0, False] > 0.3 * len(pairs) and labels[1, True] > 0.3 * len(pairs)


def test_truncation_drops_from_both_ends_of_the_longer_side():
    doc = [np.arange(100, 160, dtype=np.int32), np.arange(200, 230, dtype=np.int32)]
    other = [np.arange(300, 310, dtype=np.int32)]
    fronts, backs = 0, 0
    for seed in range(40):
        pairs = pair_instances(
            [doc, other], 20, 0.0, np.random.default_rng(seed), cls_id=2, sep_id=3
        )
        first = pairs[0]
        tokens_a, tokens_b, _ = _split_pair(first)
        assert len(tokens_a) + len(tokens_b) == 17
        # A is a contiguous piece of sentence 1: truncation removed its front and/or back.
        assert (np.diff(tokens_a) == 1).all() and tokens_a[0] >= 100 and tokens_a[-1] < 160
        fronts += tokens_a[0] > 100
        backs += tokens_a[-1] < 159
    assert fronts > 10 and backs > 10


def test_pairs_reject_tiny_seq_length():
    with pytest.raises(ConfigError, match="seq_length=4"):
        pair_instances(
            [[np.ones(3, np.int32)]], 4, 0.1, np.random.default_rng(0), cls_id=2, sep_id=3
        )


def _pack(chunks, seq_length, **kwargs):
    source = grain.MapDataset.source(chunks).to_iter_dataset(READ_OPTIONS)
    return list(pack_chunks(source, seq_length, PAD, **kwargs))


@pytest.mark.parametrize("shuffle_bins", [False, True])
def test_packing_places_every_chunk_once_with_consistent_segments(shuffle_bins):
    rng = np.random.default_rng(7)
    chunks = chunk_documents(_docs(rng, 200, (1, 4), (1, 30)), 64, CLS, SEP)
    rows = _pack(chunks, 64, num_packing_bins=16, seed=0, shuffle_bins=shuffle_bins)
    assert len(rows) < 0.6 * len(chunks)  # Several chunks per row.
    packed_chunks = []
    for row in rows:
        ids, segments, positions = (
            row["input_word_ids"],
            row["packed_segment_ids"],
            row["position_ids"],
        )
        assert ids.shape == segments.shape == positions.shape == (64,)
        assert ids.dtype == segments.dtype == positions.dtype == np.int32
        num_segments = int(segments.max())
        num_real = int((segments > 0).sum())
        # Segments 1..n back to back from the start, padding after.
        assert (segments[:num_real] > 0).all() and (segments[num_real:] == 0).all()
        assert (np.diff(segments[:num_real]) >= 0).all()
        assert set(segments[:num_real].tolist()) == set(range(1, num_segments + 1))
        assert (ids[num_real:] == PAD).all()
        for segment in range(1, num_segments + 1):
            where = np.flatnonzero(segments == segment)
            np.testing.assert_array_equal(positions[where], np.arange(len(where)))
            packed_chunks.append(ids[where].tobytes())
    assert Counter(packed_chunks) == Counter(c.tobytes() for c in chunks)
