"""Fill in `[MASK]` tokens with a trained model: `python -m mlm.fill_mask`.

Run:
  python -m mlm.fill_mask --workdir /tmp/mlm_quickstart --text "Return the [MASK] of the list." \
      --top_k 5
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from mlm import checkpoint, kernels
from mlm import config_file as config_file_lib
from mlm import workdir as workdir_lib
from mlm.data.tokenizer import Vocab, encode_sentences, load_vocab
from mlm.errors import ConfigError, DataError, MlmError, WorkdirError
from mlm.experiment import Experiment
from mlm.paths import CONFIG_FILENAME, VOCAB_FILENAME

if TYPE_CHECKING:
    from absl import flags


@dataclasses.dataclass(frozen=True)
class Predictor:
    """A trained model ready for inference.

    Attributes:
      config: the run's config (from WORKDIR/config.json).
      vocab: the run's vocab.
      params: the model parameters of the latest checkpoint: the EMA params when the run kept
        them (`optimizer.ema_decay` > 0), else the trained params.
      step: the checkpoint's step.
      infer: jitted `task.inference_step` bound to the model.
      ema: whether `params` are the EMA params.
    """

    config: Any
    vocab: Vocab
    params: Any
    step: int
    infer: Any
    ema: bool = False


def load_predictor(workdir: str) -> Predictor:
    """Loads the config, vocab and latest checkpoint's params (EMA params when kept) of a workdir.

    Args:
      workdir: a directory written by `mlm.train`.

    Returns:
      The Predictor.

    Raises:
      WorkdirError: the workdir has no config.json, vocab.txt or checkpoint.
    """
    config_path = os.path.join(workdir, CONFIG_FILENAME)
    vocab_path = os.path.join(workdir, VOCAB_FILENAME)
    for path in (config_path, vocab_path):
        if not os.path.isfile(path):
            raise WorkdirError(
                f"'{path}' not found; is '{workdir}' a workdir written by mlm.train?"
            )
    config = workdir_lib.read_config(workdir)
    vocab = load_vocab(vocab_path, config.data.lowercase)
    experiment = Experiment.build(config)  # One device, whatever mesh the run trained on.
    if not checkpoint.has_checkpoint(workdir):
        raise WorkdirError(f"workdir '{workdir}' has no checkpoint yet; train first")
    # Read only, and past damaged steps as a resume would (leaving them in place).
    manager = checkpoint.open_reader(checkpoint.checkpoint_dir(workdir))
    try:
        restored = checkpoint.restore_latest_intact(
            manager, experiment.restore_target(), report=_report
        )
    finally:
        manager.close()
    if restored is None:
        raise WorkdirError(f"workdir '{workdir}' has no checkpoint yet; train first")
    state, step = restored
    infer = experiment.inference_step
    ema = state.ema_params is not None
    params = state.ema_params if ema else state.params
    return Predictor(config=config, vocab=vocab, params=params, step=step, infer=infer, ema=ema)


def _report(message: str) -> None:
    print(message, file=sys.stderr)


def check_top_k(top_k: int) -> None:
    """Raises ConfigError unless `top_k` (candidates per mask) is at least 1."""
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
        raise ConfigError(
            f"--top_k must be a whole number of at least 1, got {top_k!r}; e.g. --top_k 5 "
            "(values above the vocab show every candidate)"
        )


def encode_masked_text(text: str, vocab: Vocab, seq_length: int) -> dict[str, np.ndarray]:
    """Turns text with `[MASK]` markers into a one-row model batch.

    Args:
      text: e.g. "The capital of France is [MASK]."
      vocab: the run's vocab.
      seq_length: the longest row the model was trained on.

    Returns:
      A batch with `input_word_ids`, `input_mask`, `input_type_ids`, `packed_segment_ids`,
      `position_ids` [1, S] and `masked_lm_positions` [1, number of masks].

    Raises:
      DataError: no `[MASK]` in the text, or the text is longer than seq_length tokens.
    """
    ids = np.concatenate(
        [[vocab.cls_id], encode_sentences(vocab, [text])[0], [vocab.sep_id]]
    ).astype(np.int32)
    if len(ids) > seq_length:
        raise DataError(
            f"the text is {len(ids)} tokens, longer than data.seq_length ({seq_length}); shorten it"
        )
    positions = np.flatnonzero(ids == vocab.mask_id).astype(np.int32)
    if positions.size == 0:
        raise DataError("the text has no [MASK] token; write [MASK] where a word should go")
    length = len(ids)
    padded = np.full((1, seq_length), vocab.pad_id, np.int32)
    padded[0, :length] = ids
    mask = np.zeros((1, seq_length), np.int32)
    mask[0, :length] = 1
    return {
        "input_word_ids": padded,
        "input_mask": mask,
        "input_type_ids": np.zeros((1, seq_length), np.int32),
        "packed_segment_ids": mask,
        "position_ids": np.arange(seq_length, dtype=np.int32)[None],
        "masked_lm_positions": positions[None],
    }


def fill_mask(predictor: Predictor, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """Predicts the `[MASK]` tokens of a text.

    Args:
      predictor: from `load_predictor`.
      text: text with one or more `[MASK]` markers.
      top_k: candidates per mask, at least 1; more than the vocab offers gives all of them.

    Returns:
      For each mask, in order, the top_k (token, probability) pairs, most likely first. The
      probability is the model's softmax over its whole vocabulary, as transformers' fill-mask
      pipeline reports it; special tokens ([PAD], [CLS], [unused0], ...) are not offered.

    Raises:
      ConfigError: top_k is below 1.
      DataError: the text has no `[MASK]` or is too long.
    """
    check_top_k(top_k)
    batch = encode_masked_text(text, predictor.vocab, predictor.config.data.seq_length)
    logits = np.asarray(predictor.infer(predictor.params, batch)["mlm_logits"][0], np.float64)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    candidates = probs[:, : predictor.vocab.size].copy()
    candidates[:, predictor.vocab.special_ids] = -1.0
    results = []
    offered = candidates.shape[1] - predictor.vocab.special_ids.size  # Non-special tokens.
    for row in candidates:
        best = np.argsort(-row, kind="stable")[: min(top_k, offered)]
        results.append([(predictor.vocab.tokens[i], float(row[i])) for i in best])
    return results


def format_predictions(text: str, predictions: list[list[tuple[str, float]]]) -> str:
    """Renders predictions as the filled-in sentence and a table per mask."""
    filled = text
    for candidates in predictions:
        filled = filled.replace("[MASK]", candidates[0][0], 1)
    lines = [f"input:  {text}", f"filled: {filled}"]
    for index, candidates in enumerate(predictions, 1):
        lines.append(f"[MASK] {index}:")
        lines.extend(f"  {probability:7.4f}  {token}" for token, probability in candidates)
    return "\n".join(lines)


USAGE = "python -m mlm.fill_mask --workdir DIR --text TEXT [--top_k K]"


def _flag_values() -> flags.FlagValues:
    """The command line's absl flags, in a FlagValues of their own (see `parse_flags`)."""
    from absl import flags  # The command line only.

    values = flags.FlagValues()
    flags.DEFINE_string(
        "workdir", None, "a workdir written by mlm.train or mlm.convert --from", flag_values=values
    )
    flags.DEFINE_string(
        "text", None, 'text with one or more [MASK], e.g. "A [MASK] day."', flag_values=values
    )
    flags.DEFINE_integer(
        "top_k",
        5,
        "candidates per mask, at least 1 (values above the vocab show every candidate)",
        flag_values=values,
    )
    return values


def main(argv: list[str] | None = None) -> int:
    """The command line (absl flags); returns the exit status, 2 with one `error:` line.

    Args:
      argv: the arguments after the command name; None: `sys.argv[1:]`.
    """
    try:
        args = config_file_lib.parse_flags(
            _flag_values(), argv, USAGE, __doc__.splitlines()[0], required=("workdir", "text")
        )
        kernels.skip_absent_tpu()
        check_top_k(args.top_k)  # Before the checkpoint is read.
        predictor = load_predictor(args.workdir)
        predictions = fill_mask(predictor, args.text, args.top_k)
    except MlmError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"checkpoint step {predictor.step}" + (" (EMA params)" if predictor.ema else ""))
    print(format_predictions(args.text, predictions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
