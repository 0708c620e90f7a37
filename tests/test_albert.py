"""Tests for ALBERT in mlm: cross-layer sharing in mlm.model and mlm.interop.albert_layout, with
numerical parity against transformers' AlbertForMaskedLM / AlbertForPreTraining (PyTorch, CPU)."""

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlm.errors import DataError
from mlm.interop import albert_layout
from mlm.kernels import KernelSet
from mlm.model import BertForPreTraining

VOCAB, EMBED, HIDDEN, LAYERS, HEADS, INTER, MAX_POS, SEQ = 101, 16, 32, 4, 4, 48, 24, 16
MAX_ABS_DIFF = 2e-6


def albert_config_dict(**overrides):
    """A tiny AlbertConfig as a config.json dict."""
    values = dict(
        model_type="albert",
        vocab_size=VOCAB,
        embedding_size=EMBED,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_hidden_groups=1,
        num_attention_heads=HEADS,
        intermediate_size=INTER,
        inner_group_num=1,
        hidden_act="gelu_new",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        max_position_embeddings=MAX_POS,
        type_vocab_size=2,
        initializer_range=0.02,
        layer_norm_eps=1e-12,
    )
    values.update(overrides)
    return values


@functools.cache
def hf_model(class_name, groups, seed=0):
    """A randomly initialised HF ALBERT in eval mode, perturbed so no parameter is trivial."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = albert_config_dict(num_hidden_groups=groups)
    del config["model_type"]
    config = transformers.AlbertConfig(**config, attn_implementation="eager")
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def saved_tensors(model):
    """The state dict as save_pretrained writes it: numpy, without the tied decoder."""
    return {
        name: tensor.detach().numpy().copy()
        for name, tensor in model.state_dict().items()
        if name not in albert_layout.HF_TIED
    }


def mlm_model(fields, next_sentence, kernels="standard"):
    """The mlm model of `model_fields` output."""
    kwargs = {k: v for k, v in fields.items() if k not in ("encoder", "albert")}
    return BertForPreTraining(
        **kwargs,
        num_hidden_groups=fields["albert"]["num_hidden_groups"],
        use_next_sentence=next_sentence,
        kernels=KernelSet(kernels),
    )


def batch(seed=0):
    """Three rows: two full, one with 7 real tokens; random token types."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(SEQ)[None] < np.array([SEQ, SEQ, 7])[:, None]).astype(np.int64)
    ids = rng.integers(5, VOCAB, mask.shape) * mask
    types = (np.arange(SEQ)[None] >= np.array([5, 9, 3])[:, None]) * mask
    return ids, mask, types


def model_inputs(ids, mask, types, predictions=SEQ):
    """mlm's batch; masked_lm_positions 0 .. predictions - 1 (all positions by default)."""
    inputs = {
        "input_word_ids": ids,
        "input_mask": mask,
        "input_type_ids": types,
        "masked_lm_positions": np.tile(np.arange(predictions), (len(ids), 1)),
    }
    return {k: jnp.asarray(v, jnp.int32) for k, v in inputs.items()}


def outputs(model, params, ids, mask, types):
    """mlm's logits at every position."""
    apply = functools.partial(model.apply, deterministic=True)  # Eager: no compile.
    return apply({"params": params}, model_inputs(ids, mask, types))


@pytest.mark.parametrize("class_name", ["AlbertForMaskedLM", "AlbertForPreTraining"])
@pytest.mark.parametrize("groups", [1, 2])
def test_logits_match_transformers_with_both_kernel_sets(class_name, groups):
    torch = pytest.importorskip("torch")
    model = hf_model(class_name, groups)
    fields = albert_layout.model_fields(model.config.to_dict(), "config.json")
    assert fields["albert"] == {"num_hidden_groups": groups}
    params, left_out = albert_layout.params_from_hf(saved_tensors(model), fields, "hf")
    assert left_out == []
    sop = class_name == "AlbertForPreTraining"
    ids, mask, types = batch()
    with torch.no_grad():
        theirs = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(types),
        )
    hf_logits = (theirs.prediction_logits if sop else theirs.logits).numpy()
    real = mask.astype(bool)
    for kernels in ("cpu", "standard"):
        ours_model = mlm_model(fields, sop, kernels)
        init = functools.partial(ours_model.init, deterministic=True)
        abstract = jax.eval_shape(init, jax.random.key(0), model_inputs(ids, mask, types))
        abstract = abstract["params"]
        assert jax.tree.map(np.shape, abstract) == jax.tree.map(np.shape, params)
        ours = outputs(ours_model, params, ids, mask, types)
        diff = np.abs(np.asarray(ours["mlm_logits"])[real] - hf_logits[real]).max()
        print(f"{class_name} G={groups} {kernels}: max abs MLM logit diff {diff:.3g}", end="")
        assert diff < MAX_ABS_DIFF
        if sop:
            sop_diff = np.abs(np.asarray(ours["nsp_logits"]) - theirs.sop_logits.numpy()).max()
            print(f", SOP {sop_diff:.3g}", end="")
            assert sop_diff < MAX_ABS_DIFF
        print()


@pytest.mark.parametrize("class_name", ["AlbertForMaskedLM", "AlbertForPreTraining"])
def test_round_trips_are_bit_identical_and_load_strictly(class_name, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    model = hf_model(class_name, 2)
    tensors = saved_tensors(model)
    fields = albert_layout.model_fields(model.config.to_dict(), "config.json")
    params, _ = albert_layout.params_from_hf(tensors, fields, "hf")
    back = albert_layout.hf_from_params(params, fields)
    assert back.keys() == tensors.keys()
    for name, array in tensors.items():
        assert back[name].dtype == array.dtype and back[name].tobytes() == array.tobytes(), name
    again, _ = albert_layout.params_from_hf(back, fields, "hf")
    assert jax.tree.all(jax.tree.map(lambda a, b: a.tobytes() == b.tobytes(), params, again))
    # load_state_dict wants the tied decoder too; it is the word embeddings and the MLM bias.
    fresh = getattr(transformers, class_name)(model.config).eval()
    state = {name: torch.from_numpy(array) for name, array in back.items()}
    state.update({tied: state[to] for tied, to in albert_layout.HF_TIED.items()})
    fresh.load_state_dict(state, strict=True)
    # A directory of hf_config + hf_from_params loads with nothing missing or unexpected.
    config = albert_layout.hf_config(
        fields, sentence_order=class_name == "AlbertForPreTraining", pad_id=0
    )
    (tmp_path / "config.json").write_text(json.dumps(config))
    safetensors_numpy.save_file(back, str(tmp_path / "model.safetensors"), {"format": "pt"})
    loaded, info = getattr(transformers, class_name).from_pretrained(
        str(tmp_path), output_loading_info=True
    )
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and info["error_msgs"] == []
    assert loaded.config.architectures == [class_name]
    loaded_config = loaded.config.to_dict()
    assert {k: loaded_config[k] for k in config} == config
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_checkpoints_with_buffers_and_tied_decoder_convert(tmp_path):
    model = hf_model("AlbertForMaskedLM", 1)
    fields = albert_layout.model_fields(model.config.to_dict(), "config.json")
    tensors = saved_tensors(model)
    tensors["predictions.decoder.weight"] = tensors[albert_layout.HF_WORD_EMBEDDINGS]
    tensors["predictions.decoder.bias"] = tensors[albert_layout.HF_MLM_BIAS]
    tensors["albert.embeddings.position_ids"] = np.arange(MAX_POS)[None]
    tensors["classifier.weight"] = np.zeros((2, HIDDEN), np.float32)
    _, left_out = albert_layout.params_from_hf(tensors, fields, "hf")
    assert left_out == ["classifier.weight"]
    tensors["predictions.decoder.bias"] = tensors[albert_layout.HF_MLM_BIAS] + 1
    with pytest.raises(DataError, match=r"'predictions\.decoder\.bias' differs"):
        albert_layout.params_from_hf(tensors, fields, "hf")
    del tensors["predictions.LayerNorm.weight"]
    with pytest.raises(DataError, match=r"hf: tensor 'predictions\.LayerNorm\.weight' missing"):
        albert_layout.params_from_hf(tensors, fields, "hf")


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"inner_group_num": 2}, r"c\.json: inner_group_num is 2"),
        ({"layer_norm_eps": 1e-5}, r"c\.json: layer_norm_eps is 1e-05"),
        ({"hidden_act": "quick_gelu"}, r"c\.json: hidden_act 'quick_gelu' is not computed"),
        ({"position_embedding_type": "relative_key"}, r"position_embedding_type 'relative_key'"),
        ({"model_type": "bert"}, r"c\.json: model_type is 'bert', not 'albert'"),
        ({"embedding_size": None}, r"c\.json: missing embedding_size"),
        ({"num_hidden_groups": 3}, r"num_hidden_groups 3 does not divide num_hidden_layers 4"),
        ({"embedding_size": HIDDEN}, r"embedding_size equals hidden_size"),
    ],
)
def test_model_fields_refuses_what_mlm_does_not_compute(overrides, message):
    config = albert_config_dict(**overrides)
    config = {k: v for k, v in config.items() if v is not None}
    with pytest.raises(DataError, match=message) as error:
        albert_layout.model_fields(config, "c.json")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("sentence_order", [False, True])
def test_hf_config_reads_back_as_the_same_fields(sentence_order):
    fields = albert_layout.model_fields(
        albert_config_dict(num_hidden_groups=2, hidden_act="gelu"), "c.json"
    )
    assert fields["activation"] == "gelu" and fields["encoder"] == "albert"
    config = albert_layout.hf_config(fields, sentence_order, pad_id=0)
    assert config["architectures"] == [
        "AlbertForPreTraining" if sentence_order else "AlbertForMaskedLM"
    ]
    assert albert_layout.model_fields(config, "c.json") == fields
    with pytest.raises(DataError, match=r"model\.norm_first=True"):
        albert_layout.hf_config({**fields, "norm_first": True}, sentence_order, pad_id=0)


def abstract_params(**overrides):
    """(model, param shapes, inputs) of a tiny mlm ALBERT (overrides: model fields)."""
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
        intermediate_size=INTER, max_position_embeddings=MAX_POS, type_vocab_size=2,
        embedding_size=EMBED, use_next_sentence=True, kernels=KernelSet("standard"),
    )  # fmt: skip
    kwargs.update(overrides)
    model = BertForPreTraining(**kwargs)
    inputs = model_inputs(*batch(), predictions=4)
    init = functools.partial(model.init, deterministic=True)
    return model, jax.eval_shape(init, jax.random.key(0), inputs)["params"], inputs


def test_num_hidden_groups_shares_blocks_and_zero_keeps_bert_params():
    shapes = functools.partial(jax.tree.map, lambda leaf: leaf.shape)
    _, bert, _ = abstract_params()
    _, unshared, _ = abstract_params(num_hidden_groups=LAYERS)
    assert shapes(unshared) == shapes(bert)
    _, shared, _ = abstract_params(num_hidden_groups=2)
    blocks = {f"layer_{i}": bert["encoder"][f"layer_{i}"] for i in range(2)}
    encoder = {k: v for k, v in bert["encoder"].items() if not k.startswith("layer_")}
    assert shapes(shared) == shapes({**bert, "encoder": {**encoder, **blocks}})
    with pytest.raises(ValueError, match=re.escape("num_hidden_groups (3) must be 0 or divide")):
        abstract_params(num_hidden_groups=3)


def test_remat_recomputes_shared_blocks_to_the_same_gradients():
    model, shapes, inputs = abstract_params(num_layers=2, num_hidden_groups=1)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), shapes)

    def loss(params, remat: str):
        out = model.clone(remat=remat).apply({"params": params}, inputs, deterministic=True)
        return out["mlm_logits"].sum() + out["nsp_logits"].sum()

    both = jax.jit(lambda p: [jax.value_and_grad(loss)(p, r) for r in ("none", "full")])
    plain, remat = both(params)  # One compile for both.
    np.testing.assert_allclose(plain[0], remat[0], rtol=1e-5, atol=1e-5)
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-5), plain[1], remat[1])
