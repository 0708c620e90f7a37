"""Convert BERT, ALBERT and ModernBERT checkpoints to and from mlm workdirs (`mlm.convert`).

Run:
  python -m mlm.convert --from hf --input bert-base-uncased/ --output runs/bert_base_uncased
  python -m mlm.convert --from tf-bert --input uncased_L-12_H-768_A-12/bert_model.ckpt \
      --output runs/bert_base_tf
  python -m mlm.convert --to hf --input runs/my_run --output exported/my_bert

`--from` writes an mlm workdir (config.json, vocab.txt, checkpoints/0) that `mlm.fill_mask`,
`mlm.train --mode eval` and `train.init_checkpoint` accept; `--from hf` reads BERT, ALBERT and
ModernBERT directories (config.json's model_type) with a WordPiece vocab. `--to hf` writes, by
`model.encoder`, a directory that `transformers.BertForMaskedLM` (`BertForPreTraining` with the
next-sentence head), `AlbertForMaskedLM` (`AlbertForPreTraining` with the sentence-order head)
or `ModernBertForMaskedLM` and `AutoTokenizer` load with `from_pretrained`. Weights move by
transpose and reshape only, so a round trip gives back every tensor bit for bit. The output is
written to a temporary sibling directory and renamed into place when complete; an existing
non-empty output is refused.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from mlm import checkpoint, kernels
from mlm import config as config_lib
from mlm import config_file as config_file_lib
from mlm import workdir as workdir_lib
from mlm.data.tokenizer import load_vocab, read_vocab_text, vocab_tokens
from mlm.errors import ConfigError, DataError, MlmError
from mlm.experiment import Experiment
from mlm.interop import albert_layout, hf, layout, modernbert_layout, tf_bert
from mlm.paths import CONFIG_FILENAME, VOCAB_FILENAME, write_text_atomically

if TYPE_CHECKING:
    from absl import flags

SOURCES = ("hf", "tf-bert")
TARGETS = ("hf",)


@dataclasses.dataclass(frozen=True)
class Converted:
    """What a conversion wrote.

    Attributes:
      output: the directory written.
      num_tensors: tensors converted.
      num_parameters: their total number of elements.
      next_sentence: the model has the next-sentence head.
      left_out: source tensors not converted (heads of other tasks and the like).
      ema: the exported weights are the run's EMA params (`optimizer.ema_decay` > 0).
    """

    output: str
    num_tensors: int
    num_parameters: int
    next_sentence: bool
    left_out: list[str]
    ema: bool = False

    def summary(self) -> str:
        """One line for the console."""
        head = "with" if self.next_sentence else "without"
        line = (
            f"wrote {self.output}: {self.num_tensors} tensors, {self.num_parameters:,} "
            f"parameters, {head} the next-sentence head"
        )
        line += " (the EMA params)" if self.ema else ""
        if self.left_out:
            line += f"; left out {len(self.left_out)}: {', '.join(self.left_out[:5])}"
            line += " ..." if len(self.left_out) > 5 else ""
        return line


def _write_into_place(output: str, write: Callable[[str], None]) -> None:
    """Runs `write(directory)` on a temporary sibling of `output`, then renames it to `output`.

    Raises:
      ConfigError: `output` exists and is not an empty directory, or cannot be created.
    """
    output = os.path.abspath(output)
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise ConfigError(f"--output '{output}' exists and is not empty; give a new directory")
    parent = os.path.dirname(output)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.tmp-", dir=parent)
    except OSError as error:
        raise ConfigError(
            f"--output '{output}' cannot be created ({error.strerror}); give a writable path"
        ) from None
    try:
        write(staging)
        if os.path.isdir(output):
            os.rmdir(output)
        os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def mlm_config(
    fields: Mapping[str, Any], next_sentence: bool, lowercase: bool, where: str = "the config"
) -> ml_collections.ConfigDict:
    """The config of a converted workdir: the defaults, with the checkpoint's model fields.

    Args:
      fields: `model_fields` of the checkpoint's layout (checked there); a section's fields
        (`albert`, `modernbert`) as a dict.
      next_sentence: the model has the next-sentence head.
      lowercase: the vocab is uncased.
      where: the BERT config file, for messages.

    Returns:
      A validated config.

    Raises:
      DataError: the model is one mlm cannot run (e.g. max_position_embeddings below the
        shortest data.seq_length).
    """
    config = config_lib.base_config()
    for name, value in fields.items():
        if isinstance(value, Mapping):
            for inner, inner_value in value.items():
                section = config.model[name]
                section[inner] = type(section[inner])(inner_value)
        else:
            config.model[name] = type(config.model[name])(value)
    config.data.lowercase = lowercase
    config.data.use_next_sentence_label = next_sentence
    config.data.seq_length = min(config.data.seq_length, config.model.max_position_embeddings)
    try:
        return config_lib.validate(config)
    except ConfigError as error:
        raise DataError(f"{where}: mlm cannot run this model ({error})") from None


def _check_vocab_size(vocab_text: str, fields: Mapping[str, Any], where: str) -> None:
    """Raises DataError when the vocab is not a BERT vocab.txt or is larger than vocab_size."""
    size = len(vocab_tokens(vocab_text, where))
    if size > fields["vocab_size"]:
        raise DataError(
            f"{where}: the vocab has {size} tokens, more than vocab_size {fields['vocab_size']} "
            "in the config; the vocab and the weights do not belong together: give the vocab "
            "saved with the model"
        )


def _check_shapes(params: Any, abstract_params: Any, where: str) -> None:
    expected = {k: leaf.shape for k, leaf in traverse_util.flatten_dict(abstract_params).items()}
    for path, array in traverse_util.flatten_dict(params).items():
        if array.shape != expected[path]:
            raise DataError(
                f"{where}: '{'/'.join(path)}' has shape {array.shape} but its config gives "
                f"{expected[path]}; the weights and the config belong to different models"
            )


def write_workdir(
    output: str,
    config: ml_collections.ConfigDict,
    params: Any,
    vocab_text: str,
    where: str,
) -> None:
    """Writes an mlm workdir at step 0: config.json, vocab.txt and a checkpoint of the state.

    The state is what `mlm.train` would create with these params: a fresh optimizer state (zero
    moments), step 0 and the config's seed.

    Args:
      output: the new workdir (must not exist, or be empty).
      config: from `mlm_config`.
      params: the params tree (numpy float32).
      vocab_text: vocab.txt's content.
      where: the source, for error messages.
    """
    experiment = Experiment.build(config)
    _check_shapes(params, experiment.abstract.params, where)
    state = experiment.state_from_params(params)

    def write(directory: str) -> None:
        vocab_path = os.path.join(directory, VOCAB_FILENAME)
        write_text_atomically(vocab_path, vocab_text)
        vocab = load_vocab(vocab_path, config.data.lowercase)
        if vocab.size > config.model.vocab_size:
            raise DataError(
                f"{where}: the vocab has {vocab.size} tokens, more than vocab_size "
                f"{config.model.vocab_size}; the vocab and the weights do not belong together"
            )
        manager = checkpoint.make_manager(checkpoint.checkpoint_dir(directory), keep=1)
        try:
            checkpoint.save(manager, 0, state, None, config.to_dict())
            manager.wait_until_finished()
        finally:
            manager.close()
        write_text_atomically(os.path.join(directory, CONFIG_FILENAME), config_lib.to_json(config))

    _write_into_place(output, write)


def _count(params: Any) -> tuple[int, int]:
    leaves = list(traverse_util.flatten_dict(params).values())
    return len(leaves), int(sum(np.size(leaf) for leaf in leaves))


def _hf_fields(hf_config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """mlm's model fields from a Hugging Face config.json, by its model_type."""
    model_type = hf_config.get("model_type")
    if model_type == "albert":
        return albert_layout.model_fields(hf_config, where)
    if model_type == "modernbert":
        return modernbert_layout.model_fields(hf_config, where)
    return layout.model_fields(hf_config, layout.HF_ACTIVATIONS, where)


def _params_from_hf(
    tensors: Mapping[str, np.ndarray], fields: Mapping[str, Any], where: str
) -> tuple[dict[str, Any], list[str]]:
    """mlm's params tree and the tensors left out, by the fields' encoder."""
    encoder = fields.get("encoder", "bert")
    if encoder == "albert":
        return albert_layout.params_from_hf(tensors, fields, where)
    if encoder == "modernbert":
        return modernbert_layout.params_from_hf(tensors, fields, where)
    return layout.params_from_hf(tensors, fields, where)


def from_hf(input_dir: str, output: str, lowercase: bool | None = None) -> Converted:
    """Converts a Hugging Face BERT, ALBERT or ModernBERT directory to an mlm workdir.

    BertForMaskedLM / BertForPreTraining, AlbertForMaskedLM / AlbertForPreTraining (the
    sentence-order head becomes the next-sentence head) and ModernBertForMaskedLM convert,
    chosen by config.json's model_type; the tokenizer must be WordPiece.

    Args:
      input_dir: holds config.json, model.safetensors (or pytorch_model.bin) and vocab.txt (or
        tokenizer.json).
      output: the new workdir.
      lowercase: the vocab is uncased; None reads tokenizer_config.json's do_lower_case.

    Returns:
      What was written.
    """
    if not os.path.isdir(input_dir):
        raise ConfigError(f"--input '{input_dir}' is not a directory; give a model directory")
    config_path = os.path.join(input_dir, hf.CONFIG_FILENAME)
    fields = _hf_fields(hf.read_json(config_path), config_path)
    vocab_text = hf.read_vocab(input_dir)
    _check_vocab_size(vocab_text, fields, input_dir)
    tensors = hf.read_tensors(input_dir)
    params, left_out = _params_from_hf(tensors, fields, input_dir)
    next_sentence = "nsp_head" in params
    if lowercase is None:
        lowercase = hf.read_lowercase(input_dir)
    config = mlm_config(fields, next_sentence, lowercase, config_path)
    write_workdir(output, config, params, vocab_text, input_dir)
    return Converted(os.path.abspath(output), *_count(params), next_sentence, left_out)


def from_tf_bert(
    prefix: str,
    output: str,
    bert_config: str = "",
    vocab: str = "",
    lowercase: bool | None = None,
) -> Converted:
    """Converts an original google-research/bert checkpoint to an mlm workdir.

    Args:
      prefix: the checkpoint prefix (`.../bert_model.ckpt`).
      output: the new workdir.
      bert_config: its bert_config.json; empty: the one next to the checkpoint.
      vocab: its vocab.txt; empty: the one next to the checkpoint.
      lowercase: the vocab is uncased; None: True (the release's `uncased_*` models), unless the
        directory name says `cased_`.

    Returns:
      What was written.
    """
    config_path = tf_bert.release_file(prefix, bert_config, tf_bert.CONFIG_FILENAME)
    vocab_path = tf_bert.release_file(prefix, vocab, tf_bert.VOCAB_FILENAME)
    fields = layout.model_fields(hf.read_json(config_path), layout.TF_BERT_ACTIVATIONS, config_path)
    if not os.path.isfile(vocab_path):
        raise ConfigError(f"vocab '{vocab_path}' not found; pass --vocab PATH/vocab.txt")
    vocab_text = read_vocab_text(vocab_path)
    _check_vocab_size(vocab_text, fields, vocab_path)
    variables = tf_bert.read_checkpoint(prefix)
    tensors, left_out = layout.hf_from_tf_bert(variables, fields["num_layers"], prefix)
    params, _ = layout.params_from_hf(tensors, fields, prefix)
    next_sentence = "nsp_head" in params
    if lowercase is None:
        release = os.path.basename(os.path.dirname(os.path.abspath(prefix)))
        lowercase = not release.startswith("cased_")
    config = mlm_config(fields, next_sentence, lowercase, config_path)
    write_workdir(output, config, params, vocab_text, prefix)
    return Converted(os.path.abspath(output), *_count(params), next_sentence, left_out)


def _check_exportable(config: ml_collections.ConfigDict) -> None:
    """Refuses, by `model.encoder`, a model Hugging Face's counterpart does not compute."""
    fields = config.model.to_dict()
    if fields["encoder"] == "albert":
        albert_layout.check_exportable(fields)
    elif fields["encoder"] == "modernbert":
        modernbert_layout.check_exportable(fields, config.data.use_next_sentence_label)
    else:
        layout.check_exportable(fields)


def _hf_export(
    params: Mapping[str, Any], fields: Mapping[str, Any], vocab: Any
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config.json content, state dict) of the Hugging Face model, by `model.encoder`."""
    next_sentence = "nsp_head" in params
    if fields["encoder"] == "albert":
        config = albert_layout.hf_config(fields, next_sentence, vocab.pad_id)
        return config, albert_layout.hf_from_params(params, fields)
    if fields["encoder"] == "modernbert":
        config = modernbert_layout.hf_config(fields, vocab.pad_id, vocab.cls_id, vocab.sep_id)
        return config, modernbert_layout.hf_from_params(params, fields)
    config = layout.hf_bert_config(fields, next_sentence, vocab.pad_id)
    return config, layout.hf_from_params(params, fields["num_layers"])


def to_hf(workdir: str, output: str) -> Converted:
    """Exports the latest checkpoint of an mlm workdir as a Hugging Face model directory.

    `model.encoder` picks the model: BertForMaskedLM / BertForPreTraining, AlbertForMaskedLM /
    AlbertForPreTraining or ModernBertForMaskedLM; the tokenizer is the run's WordPiece vocab
    (BertTokenizer).

    With `optimizer.ema_decay` > 0 the EMA params are exported, as eval and fill_mask use them.

    Args:
      workdir: written by `mlm.train` (or `--from`).
      output: the new directory.

    Returns:
      What was written.
    """
    from mlm.fill_mask import load_predictor  # The predictor loads exactly what eval uses.

    # A model Hugging Face does not compute is refused before its checkpoint is read.
    _check_exportable(workdir_lib.read_config(workdir))
    predictor = load_predictor(workdir)
    params = jax.device_get(predictor.params)
    hf_config, tensors = _hf_export(params, predictor.config.model.to_dict(), predictor.vocab)
    next_sentence = "nsp_head" in params
    with open(os.path.join(workdir, VOCAB_FILENAME), encoding="utf-8") as file:
        vocab_text = file.read()
    _write_into_place(
        output,
        lambda directory: hf.write_model_dir(
            directory, hf_config, tensors, vocab_text, predictor.config.data.lowercase
        ),
    )
    return Converted(os.path.abspath(output), *_count(params), next_sentence, [], ema=predictor.ema)


USAGE = (
    "python -m mlm.convert (--from hf|tf-bert | --to hf) --input PATH --output DIR "
    "[--bert_config FILE] [--vocab FILE] [--lowercase true|false]"
)
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _parse_bool(text: str | None) -> bool | None:
    """`--lowercase`'s value (any case of true/1/yes or false/0/no); None when not given."""
    return None if text is None else text.lower() in _TRUE


def _flag_values() -> flags.FlagValues:
    """The command line's absl flags, in a FlagValues of their own (see `parse_flags`)."""
    from absl import flags  # The command line only.

    values = flags.FlagValues()
    flags.DEFINE_enum(
        "from",
        None,
        list(SOURCES),
        "convert into an mlm workdir: a Hugging Face BERT directory (hf) or an original "
        "google-research/bert checkpoint (tf-bert)",
        flag_values=values,
    )
    flags.DEFINE_enum(
        "to",
        None,
        list(TARGETS),
        "export an mlm workdir (hf: a directory transformers loads)",
        flag_values=values,
    )
    flags.DEFINE_string(
        "input",
        None,
        "model dir (hf), checkpoint prefix (tf-bert) or workdir (--to)",
        flag_values=values,
    )
    flags.DEFINE_string("output", None, "the new directory", flag_values=values)
    flags.DEFINE_string(
        "bert_config",
        "",
        "tf-bert: bert_config.json (default: next to the checkpoint)",
        flag_values=values,
    )
    flags.DEFINE_string(
        "vocab", "", "tf-bert: vocab.txt (default: next to the checkpoint)", flag_values=values
    )
    flags.DEFINE_enum(
        "lowercase",
        None,
        [*_TRUE, *_FALSE],
        "the vocab is uncased (default: from the checkpoint)",
        flag_values=values,
        case_sensitive=False,
    )
    return values


def main(argv: list[str] | None = None) -> int:
    """The command line (absl flags); returns the exit status, 2 with one `error:` line.

    Args:
      argv: the arguments after the command name; None: `sys.argv[1:]`.
    """
    try:
        args = config_file_lib.parse_flags(
            _flag_values(), argv, USAGE, __doc__.splitlines()[0], required=("input", "output")
        )
        source, target = args["from"].value, args["to"].value
        if source is None and target is None:
            raise ConfigError(
                f"say which way to convert: --from {'|'.join(SOURCES)} (into mlm) or --to "
                f"{'|'.join(TARGETS)} (export a workdir); usage: {USAGE}"
            )
        if source is not None and target is not None:
            raise ConfigError(f"give --from or --to, not both; usage: {USAGE}")
        kernels.skip_absent_tpu()
        lowercase = _parse_bool(args.lowercase)
        if source == "hf":
            converted = from_hf(args.input, args.output, lowercase)
        elif source == "tf-bert":
            converted = from_tf_bert(
                args.input, args.output, args.bert_config, args.vocab, lowercase
            )
        else:
            converted = to_hf(args.input, args.output)
    except MlmError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(converted.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
