"""Tests for mlm.convert: Hugging Face and original-BERT checkpoints in and out, with numerical
parity against transformers (PyTorch, CPU) as the independent implementation."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mlm import config as config_lib  # noqa: E402
from mlm import convert  # noqa: E402
from mlm.errors import ConfigError, DataError  # noqa: E402
from mlm.fill_mask import fill_mask, load_predictor  # noqa: E402
from mlm.train import train_and_evaluate  # noqa: E402

WORDS = [
    "the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "tree", "big", "small", "red",
    "blue", "and", "is", "was", "house", "river", "bird", "sang", "song", "green", "old", "new",
]  # fmt: skip
TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]", ".", ","] + WORDS
TOKENS += [f"##{c}" for c in "sdegnr"] + list("bcdefghijklmnopqrstuvwxyz")  # "a" is a word
MAX_ABS_LOGIT_DIFF = 1e-4


def hf_config(**overrides):
    values = dict(
        vocab_size=len(TOKENS) + 3,  # Rows beyond the vocab, as padded vocabs have.
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        type_vocab_size=2,
    )
    values.update(overrides)
    return transformers.BertConfig(**values)


def random_hf_model(model_class, config, seed=0):
    """A randomly initialised model, perturbed so that LayerNorms and biases are not trivial."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def save_hf(model, directory, tmp_path):
    vocab_path = tmp_path / "vocab.txt"
    vocab_path.write_text("\n".join(TOKENS) + "\n")
    model.save_pretrained(directory)
    # transformers 5 saves tokenizer.json only (no vocab.txt): the converter reads either.
    transformers.BertTokenizer(vocab=str(vocab_path)).save_pretrained(directory)
    return str(directory)


def random_batch(seed=0, batch=3, length=16):
    """Random ids with padding (rows of 16, 9 and 4 tokens) and random token types."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((batch, length), np.int64)
    for row, real in enumerate([16, 9, 4][:batch]):
        mask[row, :real] = 1
    ids = rng.integers(5, len(TOKENS), (batch, length)) * mask
    types = rng.integers(0, 2, (batch, length)) * mask
    return ids, mask, types


def our_outputs(predictor, ids, mask, types):
    batch = {
        "input_word_ids": ids.astype(np.int32),
        "input_mask": mask.astype(np.int32),
        "input_type_ids": types.astype(np.int32),
        "masked_lm_positions": np.tile(np.arange(ids.shape[1], dtype=np.int32), (len(ids), 1)),
    }
    return {k: np.asarray(v) for k, v in predictor.infer(predictor.params, batch).items()}


def hf_outputs(model, ids, mask, types):
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(types),
        )


def max_real_diff(ours, theirs, mask):
    real = mask.astype(bool)
    return float(np.abs(ours[real] - theirs[real]).max())


def pretraining_diffs(predictor, model, seed, label):
    """Max abs MLM and NSP logit differences between mlm and a transformers BertForPreTraining."""
    ids, mask, types = random_batch(seed=seed)
    ours, theirs = our_outputs(predictor, ids, mask, types), hf_outputs(model, ids, mask, types)
    mlm_diff = max_real_diff(ours["mlm_logits"], theirs.prediction_logits.numpy(), mask)
    nsp_diff = float(np.abs(ours["nsp_logits"] - theirs.seq_relationship_logits.numpy()).max())
    print(f"{label} max abs difference: MLM {mlm_diff:.3g}, NSP {nsp_diff:.3g}")
    return mlm_diff, nsp_diff


def assert_state_dicts_identical(expected, loaded):
    assert set(expected) == set(loaded)
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert torch.equal(loaded[name], tensor), name


@pytest.fixture(scope="module")
def masked_lm(tmp_path_factory):
    """A BertForMaskedLM (exact GELU, as Hugging Face's "gelu") saved and converted to mlm."""
    tmp = tmp_path_factory.mktemp("hf_mlm")
    model = random_hf_model(transformers.BertForMaskedLM, hf_config(hidden_act="gelu"))
    hf_dir = save_hf(model, tmp / "hf", tmp)
    converted = convert.from_hf(hf_dir, str(tmp / "mlm"))
    return model, hf_dir, converted, tmp


def test_from_hf_logits_match_transformers(masked_lm):
    model, _, converted, _ = masked_lm
    assert not converted.next_sentence and converted.left_out == []
    predictor = load_predictor(converted.output)
    assert predictor.config.model.activation == "gelu" and predictor.step == 0
    ids, mask, types = random_batch()
    diff = max_real_diff(
        our_outputs(predictor, ids, mask, types)["mlm_logits"],
        hf_outputs(model, ids, mask, types).logits.numpy(),
        mask,
    )
    print(f"hf -> mlm max abs MLM logit difference: {diff:.3g}")
    assert diff < MAX_ABS_LOGIT_DIFF


def test_to_hf_round_trip_is_bit_identical_and_loads_cleanly(masked_lm):
    model, _, converted, tmp = masked_lm
    exported = convert.to_hf(converted.output, str(tmp / "back"))
    loaded, info = transformers.BertForMaskedLM.from_pretrained(
        exported.output, output_loading_info=True
    )
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and info["error_msgs"] == []
    assert loaded.config.hidden_act == "gelu"
    assert_state_dicts_identical(model.state_dict(), loaded.state_dict())
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported.output)
    predictor = load_predictor(converted.output)
    text = "The red cat sat on the mat, and the bird sang."
    ours = predictor.vocab.tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ours
    assert 1 not in ours  # No [UNK]: the text really was tokenized by both.


@pytest.mark.parametrize("hidden_act", ["relu", "silu"])
def test_relu_and_silu_models_and_initializer_range_convert_both_ways(hidden_act, tmp_path):
    config = hf_config(hidden_act=hidden_act, initializer_range=0.03)
    model = random_hf_model(transformers.BertForMaskedLM, config)
    converted = convert.from_hf(save_hf(model, tmp_path / "hf", tmp_path), str(tmp_path / "mlm"))
    predictor = load_predictor(converted.output)
    fields = predictor.config.model
    assert (fields.activation, fields.mlm_activation) == (hidden_act, "")
    assert fields.initializer_range == fields.mlm_initializer_range == 0.03
    ids, mask, types = random_batch()
    diff = max_real_diff(
        our_outputs(predictor, ids, mask, types)["mlm_logits"],
        hf_outputs(model, ids, mask, types).logits.numpy(),
        mask,
    )
    print(f"{hidden_act}: hf -> mlm max abs MLM logit difference: {diff:.3g}")
    assert diff < MAX_ABS_LOGIT_DIFF
    exported = convert.to_hf(converted.output, str(tmp_path / "back"))
    loaded = transformers.BertForMaskedLM.from_pretrained(exported.output)
    assert (loaded.config.hidden_act, loaded.config.initializer_range) == (hidden_act, 0.03)
    assert_state_dicts_identical(model.state_dict(), loaded.state_dict())


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("norm_first", True, r"model\.norm_first=True has no Hugging Face BERT counterpart"),
        ("embedding_size", 8, r"model\.embedding_size=8 has no Hugging Face BERT counterpart"),
        ("mlm_activation", "relu", r"model\.mlm_activation='relu' differs from model\.activ"),
    ],
)
def test_models_hugging_face_bert_cannot_compute_do_not_export(
    masked_lm, tmp_path, capsys, field, value, message
):
    workdir = shutil.copytree(masked_lm[2].output, tmp_path / "mlm")
    config_path = workdir / "config.json"
    config = json.loads(config_path.read_text())
    config["model"][field] = value
    config_path.write_text(json.dumps(config))
    line = convert_cli_error(
        ["--to", "hf", "--input", str(workdir), "--output", str(tmp_path / "out")], capsys
    )
    assert re.search(message, line), line
    assert not (tmp_path / "out").exists()


def test_fill_mask_matches_transformers_pipeline(masked_lm):
    _, hf_dir, converted, _ = masked_lm
    predictor = load_predictor(converted.output)
    pipeline = transformers.pipeline("fill-mask", model=hf_dir, tokenizer=hf_dir, device="cpu")
    for text in ("the cat sat on the [MASK] .", "a [MASK] bird sang under the tree"):
        ours = fill_mask(predictor, text, top_k=5)[0]
        # The pipeline ranks every token; mlm does not offer special tokens ([PAD], [unused0]...).
        theirs = [
            (row["token_str"], row["score"])
            for row in pipeline(text, top_k=20)
            if not (row["token_str"].startswith("[") and row["token_str"].endswith("]"))
        ][:5]
        assert [token for token, _ in ours] == [token for token, _ in theirs]
        np.testing.assert_allclose([p for _, p in ours], [p for _, p in theirs], rtol=1e-5)


def test_pretraining_model_keeps_its_next_sentence_head(tmp_path):
    model = random_hf_model(
        transformers.BertForPreTraining, hf_config(hidden_act="gelu_new"), seed=1
    )
    hf_dir = save_hf(model, tmp_path / "hf", tmp_path)
    converted = convert.from_hf(hf_dir, str(tmp_path / "mlm"))
    assert converted.next_sentence
    predictor = load_predictor(converted.output)
    assert predictor.config.model.activation == "gelu_tanh"
    assert predictor.config.data.use_next_sentence_label
    mlm_diff, nsp_diff = pretraining_diffs(predictor, model, 1, "BertForPreTraining -> mlm")
    assert mlm_diff < MAX_ABS_LOGIT_DIFF and nsp_diff < MAX_ABS_LOGIT_DIFF
    exported = convert.to_hf(converted.output, str(tmp_path / "back"))
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == [
        "BertForPreTraining"
    ]
    loaded, info = transformers.BertForPreTraining.from_pretrained(
        exported.output, output_loading_info=True
    )
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert_state_dicts_identical(model.state_dict(), loaded.state_dict())


def test_pytorch_bin_with_old_layer_norm_names(tmp_path):
    """bert-base-uncased's pytorch_model.bin names LayerNorm parameters gamma/beta."""
    model = random_hf_model(transformers.BertForMaskedLM, hf_config(), seed=2)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    old_names = {"LayerNorm.weight": "LayerNorm.gamma", "LayerNorm.bias": "LayerNorm.beta"}
    state = {}
    for name, tensor in model.state_dict().items():
        for new, old in old_names.items():
            name = name.replace(new, old)
        state[name] = tensor
    state["bert.embeddings.position_ids"] = torch.arange(64)[None]
    state["classifier.weight"] = torch.zeros(2, 32)  # Another task's head: left out, and said.
    torch.save(state, hf_dir / "pytorch_model.bin")
    model.config.save_pretrained(hf_dir)
    (hf_dir / "vocab.txt").write_text("\n".join(TOKENS) + "\n")
    converted = convert.from_hf(str(hf_dir), str(tmp_path / "mlm"))
    assert converted.left_out == ["classifier.weight"]
    assert "left out 1: classifier.weight" in converted.summary()
    ids, mask, types = random_batch(seed=2)
    diff = max_real_diff(
        our_outputs(load_predictor(converted.output), ids, mask, types)["mlm_logits"],
        hf_outputs(model, ids, mask, types).logits.numpy(),
        mask,
    )
    assert diff < MAX_ABS_LOGIT_DIFF


# The original release's variable names, written out here independently of mlm.interop.layout.
def tf1_variables(state_dict, num_layers):
    """Hugging Face state dict -> google-research/bert TF1 variables ([in, out] kernels)."""
    out = {}

    def dense(hf, tf):
        out[f"{tf}/kernel"] = state_dict[f"{hf}.weight"].numpy().T
        out[f"{tf}/bias"] = state_dict[f"{hf}.bias"].numpy()

    def norm(hf, tf):
        out[f"{tf}/gamma"] = state_dict[f"{hf}.weight"].numpy()
        out[f"{tf}/beta"] = state_dict[f"{hf}.bias"].numpy()

    for name in ("word", "position", "token_type"):
        out[f"bert/embeddings/{name}_embeddings"] = state_dict[
            f"bert.embeddings.{name}_embeddings.weight"
        ].numpy()
    norm("bert.embeddings.LayerNorm", "bert/embeddings/LayerNorm")
    for i in range(num_layers):
        hf, tf = f"bert.encoder.layer.{i}", f"bert/encoder/layer_{i}"
        for name in ("query", "key", "value"):
            dense(f"{hf}.attention.self.{name}", f"{tf}/attention/self/{name}")
        dense(f"{hf}.attention.output.dense", f"{tf}/attention/output/dense")
        norm(f"{hf}.attention.output.LayerNorm", f"{tf}/attention/output/LayerNorm")
        dense(f"{hf}.intermediate.dense", f"{tf}/intermediate/dense")
        dense(f"{hf}.output.dense", f"{tf}/output/dense")
        norm(f"{hf}.output.LayerNorm", f"{tf}/output/LayerNorm")
    dense("bert.pooler.dense", "bert/pooler/dense")
    dense("cls.predictions.transform.dense", "cls/predictions/transform/dense")
    norm("cls.predictions.transform.LayerNorm", "cls/predictions/transform/LayerNorm")
    out["cls/predictions/output_bias"] = state_dict["cls.predictions.bias"].numpy()
    out["cls/seq_relationship/output_weights"] = state_dict["cls.seq_relationship.weight"].numpy()
    out["cls/seq_relationship/output_bias"] = state_dict["cls.seq_relationship.bias"].numpy()
    return out


def write_tf1_checkpoint(variables, prefix):
    """Writes a TF1 (name-based) checkpoint with a Saver, plus Adam slots and global_step."""
    tf = pytest.importorskip("tensorflow")
    with tf.Graph().as_default():
        created = [tf.compat.v1.Variable(value, name=name) for name, value in variables.items()]
        created += [
            tf.compat.v1.Variable(np.zeros_like(variables[name]), name=f"{name}/adam_m")
            for name in list(variables)[:3]
        ]
        created.append(tf.compat.v1.Variable(np.int64(1000), name="global_step"))
        saver = tf.compat.v1.train.Saver(created)
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, prefix)


def test_tf_bert_checkpoint_parity_and_round_trip(tmp_path):
    config = hf_config(hidden_act="gelu_new")  # The release's "gelu" is the tanh approximation.
    model = random_hf_model(transformers.BertForPreTraining, config, seed=3)
    release = tmp_path / "uncased_L-2_H-32_A-4"
    release.mkdir()
    variables = tf1_variables(model.state_dict(), config.num_hidden_layers)
    write_tf1_checkpoint(variables, str(release / "bert_model.ckpt"))
    bert_config = {
        key: getattr(config, key)
        for key in (
            "attention_probs_dropout_prob", "hidden_dropout_prob", "hidden_size",
            "initializer_range", "intermediate_size", "max_position_embeddings",
            "num_attention_heads", "num_hidden_layers", "type_vocab_size", "vocab_size",
        )
    }  # fmt: skip
    bert_config["hidden_act"] = "gelu"
    (release / "bert_config.json").write_text(json.dumps(bert_config))
    (release / "vocab.txt").write_text("\n".join(TOKENS) + "\n")
    out = tmp_path / "mlm"
    argv = ["--from", "tf-bert", "--input", str(release / "bert_model.ckpt"), "--output", str(out)]
    assert convert.main(argv) == 0
    predictor = load_predictor(str(out))
    assert predictor.config.model.activation == "gelu_tanh" and predictor.config.data.lowercase
    diff, nsp_diff = pretraining_diffs(predictor, model, 3, "tf-bert -> mlm")
    assert diff < MAX_ABS_LOGIT_DIFF and nsp_diff < MAX_ABS_LOGIT_DIFF
    assert convert.main(["--to", "hf", "--input", str(out), "--output", str(tmp_path / "hf")]) == 0
    exported = transformers.BertForPreTraining.from_pretrained(str(tmp_path / "hf"))
    back = tf1_variables(exported.state_dict(), config.num_hidden_layers)
    for name, value in variables.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name


def test_converted_workdir_starts_training_and_evaluates(masked_lm, tmp_path):
    """train.init_checkpoint loads every parameter; --mode eval runs on the converted workdir."""
    _, _, converted, _ = masked_lm
    text = tmp_path / "train.txt"
    rng = np.random.default_rng(0)
    documents = [
        "\n".join(" ".join(rng.choice(WORDS, 8)) + " ." for _ in range(4)) for _ in range(40)
    ]
    text.write_text("\n\n".join(documents) + "\n")
    with open(os.path.join(converted.output, "config.json")) as file:
        config = config_lib.from_json(file.read())
    config.data.update(
        train_files=str(text),
        eval_files=str(text),
        vocab_file=os.path.join(converted.output, "vocab.txt"),
        seq_length=32,
        max_predictions_per_seq=5,
    )
    config.train.update(
        global_batch_size=4, num_steps=2, log_every=1, eval_every=0, eval_steps=2,
        checkpoint_every=2, init_checkpoint=converted.output,
    )  # fmt: skip
    config.optimizer.warmup_steps = 1
    workdir = tmp_path / "continued"
    results = train_and_evaluate(config, str(workdir))
    report = (workdir / "init_report.txt").read_text()
    assert " 0 initialized, 0 unused parameters" in report.splitlines()[0], report
    assert results["train"]["step"] == 2 and np.isfinite(results["train"]["lm_example_loss"])
    assert 0.0 <= results["eval"]["masked_lm_accuracy"] <= 1.0
    # Evaluate the converted workdir itself on other data: data fields may differ for --mode eval.
    config_path = os.path.join(converted.output, "config.json")
    with open(config_path) as file:
        before = file.read()
    config.train.init_checkpoint = ""
    config.data.vocab_file = ""
    metrics = train_and_evaluate(config, converted.output, mode="eval")["eval"]
    assert metrics["step"] == 0 and 0.0 <= metrics["masked_lm_accuracy"] <= 1.0
    with open(config_path) as file:
        assert file.read() == before  # The workdir's config.json is unchanged.


def test_bad_inputs_get_one_line_errors(masked_lm, tmp_path, capsys):
    _, hf_dir, converted, _ = masked_lm
    before = sorted(os.listdir(converted.output))
    argv = ["--from", "hf", "--input", hf_dir, "--output", converted.output]
    assert convert.main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --output") and "not empty" in error and "\n" not in error
    assert sorted(os.listdir(converted.output)) == before
    with pytest.raises(ConfigError, match="not a directory"):
        convert.from_hf(str(tmp_path / "nothing"), str(tmp_path / "out"))
    broken = tmp_path / "roberta"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    with pytest.raises(DataError, match="model_type is 'roberta'"):
        convert.from_hf(str(broken), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_missing_tensor_and_untied_decoder_are_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    model = random_hf_model(transformers.BertForMaskedLM, hf_config(), seed=4)
    hf_dir = save_hf(model, tmp_path / "hf", tmp_path)
    weights = os.path.join(hf_dir, "model.safetensors")
    tensors = load_file(weights)
    untied = dict(tensors, **{"cls.predictions.decoder.weight": tensors[
        "bert.embeddings.word_embeddings.weight"] + 1})  # fmt: skip
    save_file(untied, weights, metadata={"format": "pt"})
    with pytest.raises(DataError, match="cls.predictions.decoder.weight' differs"):
        convert.from_hf(hf_dir, str(tmp_path / "out"))
    del tensors["bert.encoder.layer.1.output.dense.bias"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(DataError, match="'bert.encoder.layer.1.output.dense.bias' missing"):
        convert.from_hf(hf_dir, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert jax.devices()  # The failed conversions left nothing behind and the process is fine.


def test_sharded_safetensors_convert_like_a_single_file(masked_lm, tmp_path):
    model, _, converted, _ = masked_lm
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    (sharded / "vocab.txt").write_text("\n".join(TOKENS) + "\n")
    again = convert.from_hf(str(sharded), str(tmp_path / "mlm"))
    params, expected = load_predictor(again.output).params, load_predictor(converted.output).params
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), params, expected))


def test_bfloat16_weights_are_read_as_float32(tmp_path):
    model = random_hf_model(transformers.BertForMaskedLM, hf_config(), seed=5)
    hf_dir = save_hf(model.to(torch.bfloat16), tmp_path / "hf", tmp_path)
    converted = convert.from_hf(hf_dir, str(tmp_path / "mlm"))
    params = load_predictor(converted.output).params
    embeddings = np.asarray(params["encoder"]["word_embeddings"]["embedding"])
    expected = model.bert.embeddings.word_embeddings.weight.float().detach().numpy()
    assert embeddings.dtype == np.float32 and np.array_equal(embeddings, expected)


DELETE = object()
BAD_HF_CONFIGS = {
    "not_json": ('{"hidden_size": 32', r"config\.json' cannot be read as JSON \(Expecting"),
    "a_list": ("[1, 2]", r"config\.json' is not a JSON object; give the file written with"),
    "missing_key": (
        {"num_attention_heads": DELETE},
        r"config\.json: missing num_attention_heads; is it a BERT config\? Give the config",
    ),
    "null_size": ({"hidden_size": None}, r"hidden_size is None; it must be a whole number of at"),
    "text_size": ({"intermediate_size": "64"}, r"intermediate_size is '64'; it must be a whole"),
    "fractional": ({"num_hidden_layers": 2.5}, r"num_hidden_layers is 2\.5; it must be a whole"),
    "zero": ({"num_attention_heads": 0}, r"num_attention_heads is 0; it must be a whole number"),
    "negative": ({"vocab_size": -67}, r"vocab_size is -67; it must be a whole number of at least"),
    "boolean": ({"type_vocab_size": True}, r"type_vocab_size is True; it must be a whole number"),
    "heads_not_dividing": (
        {"num_attention_heads": 5},
        r"hidden_size 32 is not divisible by num_attention_heads 5; set the values the weights",
    ),
    "dropout": ({"hidden_dropout_prob": 1.5}, r"hidden_dropout_prob is 1\.5; it must be a number"),
    "null_dropout": ({"attention_probs_dropout_prob": None}, r"attention_probs_dropout_prob is N"),
    "activation": (
        {"hidden_act": "tanh"},
        r"hidden_act 'tanh' is not computed by mlm; only models with hidden_act gelu, gelu_fast, "
        r"gelu_new, gelu_pytorch_tanh, relu, silu, swish convert",
    ),
    "initializer_range": (
        {"initializer_range": -0.02},
        r"initializer_range is -0\.02; it must be a positive number",
    ),
    "null_activation": ({"hidden_act": None}, r"hidden_act None is not computed by mlm"),
    "null_epsilon": ({"layer_norm_eps": None}, r"layer_norm_eps is None, not a number"),
    "another_size": (
        {"intermediate_size": 48},
        r"tensor 'bert\.encoder\.layer\.0\.intermediate\.dense\.weight' has shape \(64, 32\) but "
        r"the config gives \(48, 32\) \(intermediate_size, hidden_size\); the weights and the "
        r"config belong to different models",
    ),
    "short_positions": (
        {"max_position_embeddings": 4},
        r"'bert\.embeddings\.position_embeddings\.weight' has shape \(64, 32\) but the config "
        r"gives \(4, 32\)",
    ),
    "vocab_size_below_the_vocab": (
        {"vocab_size": len(TOKENS) - 1},
        rf"the vocab has {len(TOKENS)} tokens, more than vocab_size {len(TOKENS) - 1} in the "
        "config",
    ),
}


def copy_hf_dir(hf_dir, tmp_path):
    return shutil.copytree(hf_dir, tmp_path / "hf")


def convert_cli_error(argv, capsys):
    """Runs `mlm.convert` main; returns its one `error:` line (asserting exit status 2)."""
    assert convert.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


@pytest.mark.parametrize("case", list(BAD_HF_CONFIGS))
def test_bad_hf_config_is_one_line_error_before_any_output(masked_lm, tmp_path, capsys, case):
    content, message = BAD_HF_CONFIGS[case]
    hf_dir = copy_hf_dir(masked_lm[1], tmp_path)
    config_path = hf_dir / "config.json"
    if isinstance(content, str):
        config_path.write_text(content)
    else:
        config = json.loads(config_path.read_text())
        for key, value in content.items():
            if value is DELETE:
                del config[key]
            else:
                config[key] = value
        config_path.write_text(json.dumps(config))
    argv = ["--from", "hf", "--input", str(hf_dir), "--output", str(tmp_path / "out" / "mlm")]
    line = convert_cli_error(argv, capsys)
    assert re.search(message, line), line
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # No output, no staging directory.


def test_tensors_of_another_shape_and_bad_tokenizer_files_are_one_line_errors(
    masked_lm, tmp_path, capsys
):
    from safetensors.numpy import load_file, save_file

    hf_dir = copy_hf_dir(masked_lm[1], tmp_path)
    argv = ["--from", "hf", "--input", str(hf_dir), "--output", str(tmp_path / "out")]
    weights = str(hf_dir / "model.safetensors")
    tensors = load_file(weights)
    query = "bert.encoder.layer.1.attention.self.query.weight"
    save_file(dict(tensors, **{query: np.zeros((30, 32), np.float32)}), weights)
    assert convert_cli_error(argv, capsys) == (
        f"error: {hf_dir}: tensor '{query}' has shape (30, 32) but the config gives (32, 32) "
        "(hidden_size, hidden_size); the weights and the config belong to different models: "
        "give the config the weights were saved with"
    )
    save_file(tensors, weights)
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": "yes"}))
    assert "do_lower_case is 'yes', not true or false" in convert_cli_error(argv, capsys)
    (hf_dir / "vocab.txt").write_bytes(("\n".join(TOKENS) + "\nnaïve\n").encode("latin-1"))
    assert convert_cli_error(argv, capsys) == (
        f"error: {hf_dir}/vocab.txt:{len(TOKENS) + 1}: not valid UTF-8 (invalid continuation "
        "byte at byte 2 of the line); re-encode the file as UTF-8 or give a BERT vocab.txt"
    )
    (hf_dir / "vocab.txt").write_text("\n".join(TOKENS[1:]) + "\n")
    assert convert_cli_error(argv, capsys).endswith(
        "vocab.txt: the special token [PAD] is missing; a BERT vocab.txt needs all of [PAD] "
        "[UNK] [CLS] [SEP] [MASK]"
    )
    (hf_dir / "vocab.txt").unlink()
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["x"]}))
    assert "weight_map is not an object of tensor name -> file name" in convert_cli_error(
        argv, capsys
    )
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_bpe_and_sentencepiece_tokenizers_are_refused_naming_them(masked_lm, tmp_path, capsys):
    hf_dir = copy_hf_dir(masked_lm[1], tmp_path)
    argv = ["--from", "hf", "--input", str(hf_dir), "--output", str(tmp_path / "out")]
    for name in ("vocab.txt", "tokenizer.json"):
        if (hf_dir / name).exists():
            (hf_dir / name).unlink()
    bpe = {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}  # ModernBERT's kind
    (hf_dir / "tokenizer.json").write_text(json.dumps(bpe))
    assert convert_cli_error(argv, capsys) == (
        f"error: '{hf_dir}/tokenizer.json' is a BPE tokenizer, not WordPiece; mlm's vocabs are "
        "WordPiece, so models with BPE, Unigram or SentencePiece tokenizers do not convert"
    )
    (hf_dir / "tokenizer.json").unlink()
    (hf_dir / "spiece.model").write_bytes(b"\x0a\x01")  # ALBERT's; read by name only
    assert convert_cli_error(argv, capsys) == (
        f"error: '{hf_dir}' has a SentencePiece tokenizer (spiece.model); mlm's vocabs are "
        "WordPiece, so only models with a WordPiece vocab.txt or tokenizer.json convert"
    )
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_convert_command_line_prints_one_line_for_a_config_that_is_not_json(masked_lm, tmp_path):
    hf_dir = copy_hf_dir(masked_lm[1], tmp_path)
    (hf_dir / "config.json").write_text("not json")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-m", "mlm.convert", "--from", "hf", "--input", "hf", "--output", "out"],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=root),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: 'hf/config.json' cannot be read as JSON (Expecting value: line 1 column 1 "
        "(char 0)); give the file written with the model (save_pretrained writes it)"
    ]
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_usage_names_the_command_a_user_types(capsys):
    with pytest.raises(SystemExit) as caught:
        convert.main(["--help"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.startswith("usage: python -m mlm.convert ")


CONVERT_USAGE = (
    "python -m mlm.convert (--from hf|tf-bert | --to hf) --input PATH --output DIR "
    "[--bert_config FILE] [--vocab FILE] [--lowercase true|false]"
)


IN_OUT = ["--input", "in", "--output", "out"]
FLAG_MISTAKES = {
    "no_direction": (
        IN_OUT,
        "say which way to convert: --from hf|tf-bert (into mlm) or --to hf (export a workdir)",
    ),
    "both": (["--from", "hf", "--to", "hf", *IN_OUT], "give --from or --to, not both"),
    "bad_source": (
        ["--from", "tf_bert", *IN_OUT],
        "flag --from=tf_bert: value should be one of <hf|tf-bert>",
    ),
    "bad_target": (["--to", "tf-bert", *IN_OUT], "flag --to=tf-bert: value should be one of <hf>"),
    "no_output": (["--from", "hf", "--input", "in"], "--output is required"),
    "bad_bool": (
        ["--from", "hf", *IN_OUT, "--lowercase", "maybe"],
        "flag --lowercase=maybe: value should be one of <true|1|yes|false|0|no>",
    ),
    "no_bool": (["--from", "hf", *IN_OUT, "--lowercase"], "Missing value for flag --lowercase"),
    "typo": (["--from", "hf", *IN_OUT, "--vocb", "v.txt"], "Unknown command line flag 'vocb'"),
}


@pytest.mark.parametrize("case", list(FLAG_MISTAKES))
def test_flag_mistakes_are_one_line_with_the_usage(tmp_path, monkeypatch, capsys, case):
    argv, message = FLAG_MISTAKES[case]
    monkeypatch.chdir(tmp_path)
    line = convert_cli_error(argv, capsys)
    assert line.startswith(f"error: {message}") and line.endswith(f"; usage: {CONVERT_USAGE}"), line
    assert os.listdir(tmp_path) == []


def test_lowercase_takes_a_separate_value_in_any_case(masked_lm, tmp_path, capsys):
    _, hf_dir, converted, _ = masked_lm
    assert load_predictor(converted.output).config.data.lowercase  # tokenizer_config's.
    out = str(tmp_path / "cased")
    assert (
        convert.main(["--from", "hf", "--input", hf_dir, "--output", out, "--lowercase", "No"]) == 0
    )
    assert capsys.readouterr().out.startswith(f"wrote {out}: ")
    assert not load_predictor(out).config.data.lowercase


def test_real_command_line_help_names_the_command_and_every_flag():
    result = subprocess.run(
        [sys.executable, "-m", "mlm.convert", "--help"],
        env=dict(
            os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert result.stdout.startswith(f"usage: {CONVERT_USAGE}\n")
    assert "convert.py" not in result.stdout
    for flag in ("from", "to", "input", "output", "bert_config", "vocab", "lowercase"):
        assert f"\n  --{flag}: " in result.stdout


# ---------------------------------------------------------------- ALBERT and ModernBERT, end to end


def random_albert(seed=0):
    config = transformers.AlbertConfig(
        vocab_size=len(TOKENS) + 3, embedding_size=16, hidden_size=32, num_hidden_layers=3,
        num_hidden_groups=1, num_attention_heads=4, intermediate_size=64, hidden_act="gelu",
        max_position_embeddings=64, pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    return random_hf_model(transformers.AlbertForMaskedLM, config, seed)


def random_modernbert(seed=0):
    config = transformers.ModernBertConfig(
        vocab_size=len(TOKENS) + 3, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=64, local_attention=4,
        global_attn_every_n_layers=2, pad_token_id=0, cls_token_id=2, sep_token_id=3,
        bos_token_id=2, eos_token_id=3, attn_implementation="eager",
    )  # fmt: skip
    return random_hf_model(transformers.ModernBertForMaskedLM, config, seed)


@pytest.mark.parametrize(
    "make_model, encoder", [(random_albert, "albert"), (random_modernbert, "modernbert")]
)
def test_albert_and_modernbert_fill_masks_like_transformers_and_export_bit_for_bit(
    make_model, encoder, tmp_path
):
    model = make_model()
    hf_dir = save_hf(model, tmp_path / "hf", tmp_path)
    converted = convert.from_hf(hf_dir, str(tmp_path / "mlm"))
    assert not converted.next_sentence and converted.left_out == []
    predictor = load_predictor(converted.output)
    assert predictor.config.model.encoder == encoder
    pipeline = transformers.pipeline("fill-mask", model=hf_dir, tokenizer=hf_dir, device="cpu")
    # Longer than ModernBERT's local window of 4, so that its sliding layers matter.
    for text in ("the big red cat sat on the old [MASK] under the green tree .", "a [MASK] sang"):
        ours = fill_mask(predictor, text, top_k=5)[0]
        theirs = [
            (row["token_str"], row["score"])
            for row in pipeline(text, top_k=20)
            if not (row["token_str"].startswith("[") and row["token_str"].endswith("]"))
        ][:5]
        assert [token for token, _ in ours] == [token for token, _ in theirs]
        np.testing.assert_allclose([p for _, p in ours], [p for _, p in theirs], atol=1e-4)
    exported = convert.to_hf(converted.output, str(tmp_path / "back"))
    loaded, info = type(model).from_pretrained(exported.output, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and info["error_msgs"] == []
    assert_state_dicts_identical(model.state_dict(), loaded.state_dict())
    # The export alone (its own tokenizer files) fills masks as mlm does.
    text = "the big red cat sat on the old [MASK] under the green tree ."
    exported_pipeline = transformers.pipeline(
        "fill-mask", model=exported.output, tokenizer=exported.output, device="cpu"
    )
    theirs = [(row["token_str"], row["score"]) for row in exported_pipeline(text, top_k=20)]
    theirs = [(token, p) for token, p in theirs if not token.startswith("[")][:5]
    ours = fill_mask(predictor, text, top_k=5)[0]
    assert [token for token, _ in ours] == [token for token, _ in theirs]
    np.testing.assert_allclose([p for _, p in ours], [p for _, p in theirs], atol=1e-4)
    again = convert.from_hf(exported.output, str(tmp_path / "again"))
    first, second = load_predictor(converted.output), load_predictor(again.output)
    for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(second.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert first.config.to_dict() == second.config.to_dict()


def test_albert_sentence_order_head_converts_both_ways(tmp_path):
    config = transformers.AlbertConfig(
        vocab_size=len(TOKENS), embedding_size=16, hidden_size=32, num_hidden_layers=2,
        num_hidden_groups=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    model = random_hf_model(transformers.AlbertForPreTraining, config, seed=2)
    hf_dir = save_hf(model, tmp_path / "hf", tmp_path)
    converted = convert.from_hf(hf_dir, str(tmp_path / "mlm"))
    assert converted.next_sentence
    predictor = load_predictor(converted.output)
    assert predictor.config.data.use_next_sentence_label
    assert predictor.config.model.albert.num_hidden_groups == 2
    ids, mask, types = random_batch(seed=2)
    ours, theirs = our_outputs(predictor, ids, mask, types), hf_outputs(model, ids, mask, types)
    assert max_real_diff(ours["mlm_logits"], theirs.prediction_logits.numpy(), mask) < 1e-4
    assert np.abs(ours["nsp_logits"] - theirs.sop_logits.numpy()).max() < 1e-4
    exported = convert.to_hf(converted.output, str(tmp_path / "back"))
    loaded, info = transformers.AlbertForPreTraining.from_pretrained(
        exported.output, output_loading_info=True
    )
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert_state_dicts_identical(model.state_dict(), loaded.state_dict())


def test_a_modernbert_with_a_next_sentence_head_is_refused_before_its_checkpoint_is_read(
    tmp_path, capsys
):
    workdir = tmp_path / "run"
    workdir.mkdir()
    config = config_lib.base_config()
    config.model.encoder = "modernbert"
    config.data.use_next_sentence_label = True
    (workdir / "config.json").write_text(config_lib.to_json(config_lib.validate(config)))
    line = convert_cli_error(
        ["--to", "hf", "--input", str(workdir), "--output", str(tmp_path / "out")], capsys
    )
    assert "ModernBertForMaskedLM has no place for" in line, line
    assert not (tmp_path / "out").exists()
