"""Text to BERT pretraining TFRecords, streaming: `python -m mlm.data.create_pretraining_data`.

The options and the output are those of TF Model Garden's
`official/nlp/data/create_pretraining_data.py` (google-research/bert's, plus
`--use_v2_feature_names`): NSP sentence pairs `[CLS] A [SEP] B [SEP]` with a random B half of the
time, masks drawn once per instance (80% [MASK] / 10% random / 10% kept), `--dupe_factor` passes
over the text with different masks, records written round-robin to the output files.

Unlike the original, which holds the whole corpus and all its instances in memory, documents are
read in blocks of `--documents_per_block`: the random B of a pair is drawn from the block, and
the instances of each block and dupe pass are shuffled together and written before the next are
made, so memory is bounded by the block size for a corpus of any size. Readers (grain, tf.data)
shuffle globally anyway. The output depends only on the input, the options and the seed.

Run:
  python -m mlm.data.create_pretraining_data --input_file='corpus/*.txt' \
      --output_file=/data/train-0.tfrecord,/data/train-1.tfrecord --vocab_file=vocab.txt \
      --max_seq_length=128 --max_predictions_per_seq=20 --dupe_factor=10
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tqdm

from mlm.data.corpus import expand_globs, iter_file_documents
from mlm.data.instances import SentencePair, pair_instances
from mlm.data.masking import mask_sequence
from mlm.data.pretraining_records import RecordWriter, serialize_example
from mlm.data.tokenizer import Vocab, encode_documents, load_vocab
from mlm.errors import ConfigError, DataError, MlmError

DOCUMENTS_PER_BLOCK = 10_000


def _check_options(
    output_files: Sequence[str],
    max_seq_length: int,
    max_predictions_per_seq: int,
    masked_lm_prob: float,
    short_seq_prob: float,
    dupe_factor: int,
    documents_per_block: int,
) -> None:
    """Raises ConfigError naming the first flag with an invalid value."""
    checks = (
        (bool(output_files), "--output_file: no output file given; pass one or more paths"),
        (
            len(set(output_files)) == len(output_files),
            f"--output_file: {', '.join(output_files)} names a file twice; give distinct paths",
        ),
        (
            max_seq_length >= 5,
            f"--max_seq_length={max_seq_length} is too short for [CLS] A [SEP] B [SEP]; use 5 "
            "or more (BERT uses 128 or 512)",
        ),
        (
            1 <= max_predictions_per_seq <= max_seq_length,
            f"--max_predictions_per_seq={max_predictions_per_seq} must be between 1 and "
            f"--max_seq_length ({max_seq_length})",
        ),
        (
            0 < masked_lm_prob <= 1,
            f"--masked_lm_prob={masked_lm_prob} must be in (0, 1]; BERT uses 0.15",
        ),
        (
            0 <= short_seq_prob <= 1,
            f"--short_seq_prob={short_seq_prob} must be in [0, 1]; BERT uses 0.1",
        ),
        (dupe_factor >= 1, f"--dupe_factor={dupe_factor} must be at least 1"),
        (
            documents_per_block >= 1,
            f"--documents_per_block={documents_per_block} must be at least 1",
        ),
    )
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _document_blocks(files: Sequence[str], size: int) -> Iterator[list[list[str]]]:
    """Yields the documents of the files, in order, `size` at a time (the last block smaller)."""
    documents = itertools.chain.from_iterable(iter_file_documents(path) for path in files)
    while block := list(itertools.islice(documents, size)):
        yield block


def instance_row(
    pair: SentencePair,
    vocab: Vocab,
    rng: np.random.Generator,
    *,
    max_seq_length: int,
    max_predictions_per_seq: int,
    masked_lm_prob: float,
    do_whole_word_mask: bool,
) -> dict[str, np.ndarray]:
    """Masks one sentence pair and pads it into a batch row, as BERT's instance writer.

    Args:
      pair: the unpadded `[CLS] A [SEP] B [SEP]` instance.
      vocab: the vocabulary (special ids, size, `##` pieces).
      rng: source of the mask choices.
      max_seq_length: S, the padded length.
      max_predictions_per_seq: P, the padded number of predictions.
      masked_lm_prob: fraction of the tokens to predict.
      do_whole_word_mask: mask whole words (a token and its `##` pieces) together.

    Returns:
      `input_word_ids`, `input_mask`, `input_type_ids` [S] (0-padded), `masked_lm_positions`,
      `masked_lm_ids`, `masked_lm_weights` [P] and `next_sentence_labels`.
    """
    length = len(pair.input_word_ids)
    masked = mask_sequence(
        pair.input_word_ids,
        np.ones(length, np.int32),
        rng,
        masking_rate=masked_lm_prob,
        max_predictions=max_predictions_per_seq,
        mask_id=vocab.mask_id,
        special_ids=vocab.special_ids,
        vocab_size=vocab.size,
        is_continuation=vocab.is_continuation if do_whole_word_mask else None,
    )
    rows = np.zeros((3, max_seq_length), np.int32)  # Padding holds 0, as BERT writes it.
    rows[0, :length] = masked["input_word_ids"]
    rows[1, :length] = 1
    rows[2, :length] = pair.input_type_ids
    return {
        "input_word_ids": rows[0],
        "input_mask": rows[1],
        "input_type_ids": rows[2],
        "masked_lm_positions": masked["masked_lm_positions"],
        "masked_lm_ids": masked["masked_lm_ids"],
        "masked_lm_weights": masked["masked_lm_weights"],
        "next_sentence_labels": np.int32(pair.next_sentence_label),
    }


def _block_instances(
    block: Sequence[Sequence[np.ndarray]],
    vocab: Vocab,
    rng: np.random.Generator,
    *,
    dupe_factor: int,
    max_seq_length: int,
    short_seq_prob: float,
    **mask_options: Any,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields the masked instances of one block: per dupe pass, its NSP pairs shuffled."""
    for _ in range(dupe_factor):
        pairs = pair_instances(
            block, max_seq_length, short_seq_prob, rng, cls_id=vocab.cls_id, sep_id=vocab.sep_id
        )
        for index in rng.permutation(len(pairs)):
            yield instance_row(
                pairs[index], vocab, rng, max_seq_length=max_seq_length, **mask_options
            )


def create_pretraining_data(
    input_files: Sequence[str],
    output_files: Sequence[str],
    vocab: Vocab,
    *,
    max_seq_length: int = 128,
    max_predictions_per_seq: int = 20,
    masked_lm_prob: float = 0.15,
    short_seq_prob: float = 0.1,
    dupe_factor: int = 10,
    do_whole_word_mask: bool = False,
    random_seed: int = 12345,
    documents_per_block: int = DOCUMENTS_PER_BLOCK,
    use_v2_feature_names: bool = False,
    progress: bool = False,
) -> dict:
    """Writes BERT pretraining TFRecords from text in the BERT layout, streaming.

    Per block of `documents_per_block` documents and per dupe pass: make the NSP pairs of the
    block (BERT's algorithm; the random B comes from the block), shuffle them, mask each once,
    and append them round-robin to the output files. Block `k` draws from a generator seeded with
    `(random_seed, k)`. Files are written to `PATH.tmp` and renamed only when all succeed.

    Args:
      input_files: UTF-8 text files, one sentence per line, a blank line between documents.
      output_files: the TFRecord files to write.
      vocab: the WordPiece vocabulary (lowercasing as the model's).
      max_seq_length: S, the length of every instance.
      max_predictions_per_seq: P, the most masked tokens per instance.
      masked_lm_prob: fraction of the tokens to predict.
      short_seq_prob: probability of a shorter target length, as BERT.
      dupe_factor: passes over the text, each with new pairs and masks.
      do_whole_word_mask: mask whole words together.
      random_seed: the seed; the same seed gives the same bytes.
      documents_per_block: documents held in memory at once.
      use_v2_feature_names: write `input_word_ids` / `input_type_ids`.
      progress: show a progress bar of the documents read on stderr.

    Returns:
      Stats: `documents`, `instances`, `instances_per_file` ({path: count}), `seconds`.
    """
    output_files = list(output_files)
    _check_options(
        output_files,
        max_seq_length,
        max_predictions_per_seq,
        masked_lm_prob,
        short_seq_prob,
        dupe_factor,
        documents_per_block,
    )
    if not input_files:
        raise DataError("--input_file: no input files; pass globs of text files")
    writers: list[RecordWriter] = []
    documents = 0
    try:
        writers.extend(RecordWriter(path) for path in output_files)
        start_time = time.perf_counter()  # After TensorFlow's import, which takes seconds.
        next_writer = 0
        bar = tqdm.tqdm(unit=" docs", desc="documents", file=sys.stderr, disable=not progress)
        with bar:
            blocks = _document_blocks(input_files, documents_per_block)
            for block_index, texts in enumerate(blocks):
                block = encode_documents(vocab, texts)
                rng = np.random.default_rng([random_seed, block_index])
                instances = _block_instances(
                    block,
                    vocab,
                    rng,
                    dupe_factor=dupe_factor,
                    max_seq_length=max_seq_length,
                    max_predictions_per_seq=max_predictions_per_seq,
                    masked_lm_prob=masked_lm_prob,
                    short_seq_prob=short_seq_prob,
                    do_whole_word_mask=do_whole_word_mask,
                )
                for row in instances:
                    record = serialize_example(row, v2_feature_names=use_v2_feature_names)
                    writers[next_writer].write(record)
                    next_writer = (next_writer + 1) % len(writers)
                documents += len(block)
                bar.update(len(texts))
                bar.set_postfix(instances=sum(writer.count for writer in writers))
        if not any(writer.count for writer in writers):
            raise DataError(
                f"{', '.join(input_files)}: hold no text that encodes to tokens; give text in the "
                "BERT layout (one sentence per line, a blank line between documents)"
            )
        for writer in writers:
            writer.commit()
    except BaseException:
        for writer in writers:
            writer.discard()
        raise
    return {
        "documents": documents,
        "instances": sum(writer.count for writer in writers),
        "instances_per_file": {writer.path: writer.count for writer in writers},
        "seconds": time.perf_counter() - start_time,
    }


def summary_line(stats: dict) -> str:
    """Returns the one-line summary the command prints."""
    per_file = ", ".join(f"{path}: {count}" for path, count in stats["instances_per_file"].items())
    rate = stats["instances"] / max(stats["seconds"], 1e-9)
    return (
        f"wrote {stats['instances']} instances from {stats['documents']} documents in "
        f"{stats['seconds']:.1f} s ({rate:.0f}/s): {per_file}"
    )


def run() -> None:
    """The command line: parses flags and runs; user mistakes exit 2 with a one-line error."""
    from absl import app, flags

    flags.DEFINE_string("input_file", None, "Comma-separated globs of text files (BERT layout).")
    flags.DEFINE_string("output_file", None, "Comma-separated output TFRecord files.")
    flags.DEFINE_string("vocab_file", None, "The BERT vocab.txt of the model.")
    flags.DEFINE_bool("do_lower_case", True, "Lowercase the text (uncased models).")
    flags.DEFINE_bool("do_whole_word_mask", False, "Mask whole words (a token and its ## pieces).")
    flags.DEFINE_integer("max_seq_length", 128, "Tokens per instance.")
    flags.DEFINE_integer("max_predictions_per_seq", 20, "Most masked tokens per instance.")
    flags.DEFINE_integer("random_seed", 12345, "Random seed.")
    flags.DEFINE_integer("dupe_factor", 10, "Passes over the text, each with different masks.")
    flags.DEFINE_float("masked_lm_prob", 0.15, "Fraction of the tokens to mask.")
    flags.DEFINE_float("short_seq_prob", 0.1, "Probability of an instance shorter than maximum.")
    flags.DEFINE_bool("use_v2_feature_names", False, "Write input_word_ids / input_type_ids.")
    flags.DEFINE_integer(
        "documents_per_block",
        DOCUMENTS_PER_BLOCK,
        "Documents held in memory at once; random next sentences come from the same block.",
    )
    flags.mark_flags_as_required(["input_file", "output_file", "vocab_file"])
    values = flags.FLAGS

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        input_files = expand_globs(
            values.input_file,
            "--input_file",
            "the layout (one sentence per line, a blank line between documents)",
        )
        if not os.path.isfile(values.vocab_file):
            raise DataError(
                f"--vocab_file: {values.vocab_file} does not exist; give the BERT vocab.txt of "
                "the model"
            )
        vocab = load_vocab(values.vocab_file, values.do_lower_case)
        output_files = [path.strip() for path in values.output_file.split(",") if path.strip()]
        stats = create_pretraining_data(
            input_files,
            output_files,
            vocab,
            max_seq_length=values.max_seq_length,
            max_predictions_per_seq=values.max_predictions_per_seq,
            masked_lm_prob=values.masked_lm_prob,
            short_seq_prob=values.short_seq_prob,
            dupe_factor=values.dupe_factor,
            do_whole_word_mask=values.do_whole_word_mask,
            random_seed=values.random_seed,
            documents_per_block=values.documents_per_block,
            use_v2_feature_names=values.use_v2_feature_names,
            progress=True,
        )
        print(summary_line(stats))

    try:
        app.run(main)
    except MlmError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
