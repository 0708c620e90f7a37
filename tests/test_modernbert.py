"""ModernBERT: parity with Hugging Face's ModernBertForMaskedLM, layout round trip, config."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlm.errors import DataError
from mlm.interop import modernbert_layout as layout
from mlm.kernels import KernelSet
from mlm.modernbert import ModernBertForPreTraining

SEQ, VOCAB, PAD, CLS, SEP = 24, 100, 0, 1, 2
# Layers 0 and 3 global, 1 and 2 local; a window of 8 (4 each side) shorter than the rows.
HF_SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=64,
    local_attention=8,
    global_attn_every_n_layers=3,
    global_rope_theta=1000.0,
    local_rope_theta=100.0,
)


def _fields() -> dict:
    """The model fields of the HF_SIZES model (as `model_fields` reads them)."""
    return layout.model_fields(
        {"model_type": "modernbert", **HF_SIZES, "layer_types": None}, "test"
    )


def _model(fields: dict, kernels: KernelSet, **overrides) -> ModernBertForPreTraining:
    modern = fields["modernbert"]
    kwargs = dict(
        vocab_size=fields["vocab_size"],
        hidden_size=fields["hidden_size"],
        num_layers=fields["num_layers"],
        num_heads=fields["num_heads"],
        intermediate_size=fields["intermediate_size"],
        max_position_embeddings=fields["max_position_embeddings"],
        activation=fields["activation"],
        mlm_activation=fields["mlm_activation"],
        kernels=kernels,
        **modern,
    )
    return ModernBertForPreTraining(**{**kwargs, **overrides})


def _batch(word_ids: np.ndarray, mask: np.ndarray, **extra) -> dict:
    rows, seq = word_ids.shape
    return {
        "input_word_ids": jnp.asarray(word_ids, jnp.int32),
        "input_mask": jnp.asarray(mask, jnp.int32),
        "input_type_ids": jnp.zeros((rows, seq), jnp.int32),
        "masked_lm_positions": jnp.broadcast_to(jnp.arange(seq), (rows, seq)),
        **{name: jnp.asarray(value, jnp.int32) for name, value in extra.items()},
    }


def _apply(model: ModernBertForPreTraining, params: dict, batch: dict) -> np.ndarray:
    """The masked-LM logits of a deterministic forward pass (eager: tiny models run faster
    op by op than they compile on a loaded 2-core machine)."""
    return np.asarray(model.apply({"params": params}, batch, deterministic=True)["mlm_logits"])


@pytest.fixture(scope="module")
def hf_model():
    """A randomly initialised ModernBertForMaskedLM with random LayerNorm weights and decoder
    bias, and Wqkv 20 times larger than its init: sharp attention, so that positions, windows
    and rotary bases change the logits well above float32 rounding."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ModernBertConfig(
        **HF_SIZES, pad_token_id=PAD, cls_token_id=CLS, sep_token_id=SEP, bos_token_id=CLS,
        eos_token_id=SEP, attn_implementation="eager",
    )  # fmt: skip
    model = transformers.ModernBertForMaskedLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name == "decoder.bias":
                param.copy_(0.1 * torch.randn_like(param))
            elif "Wqkv" in name:
                param.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def hf_tensors(hf_model) -> dict[str, np.ndarray]:
    return {name: t.detach().numpy().copy() for name, t in hf_model.state_dict().items()}


@pytest.fixture(scope="module")
def inputs() -> tuple[np.ndarray, np.ndarray]:
    """Two rows, the second padded after 17 tokens."""
    rng = np.random.default_rng(0)
    word_ids = rng.integers(3, VOCAB, size=(2, SEQ))
    mask = np.ones((2, SEQ), np.int64)
    mask[1, 17:] = 0
    word_ids[1, 17:] = PAD
    return word_ids, mask


def test_model_fields_of_hf_config(hf_model):
    fields = layout.model_fields(hf_model.config.to_dict(), "config.json")
    assert fields == _fields()
    assert fields["modernbert"] == {
        "global_attn_every_n_layers": 3,
        "local_attention": 8,
        "global_rope_theta": 1000.0,
        "local_rope_theta": 100.0,
        "norm_eps": 1e-5,
    }
    assert fields["activation"] == "gelu" and fields["mlm_activation"] == ""
    assert layout.model_fields(layout.hf_config(fields, PAD, CLS, SEP), "x") == fields


@pytest.mark.parametrize("kernel_set", ["cpu", "standard"])
def test_logits_match_hugging_face(hf_model, hf_tensors, inputs, kernel_set):
    torch = pytest.importorskip("torch")
    word_ids, mask = inputs
    with torch.no_grad():
        expected = hf_model(torch.tensor(word_ids), attention_mask=torch.tensor(mask)).logits
    fields = _fields()
    params, left_out = layout.params_from_hf(hf_tensors, fields, "state dict")
    assert left_out == []
    model = _model(fields, KernelSet(kernel_set))
    batch = _batch(word_ids, mask)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), batch, deterministic=True))
    assert jax.tree.map(lambda s: s.shape, shapes["params"]) == jax.tree.map(np.shape, params)
    with jax.default_matmul_precision("highest"):
        logits = _apply(model, params, batch)
    real = mask.astype(bool)
    diff = np.abs(logits[real] - expected.numpy()[real]).max()
    print(f"max |logit difference| vs Hugging Face, {kernel_set} kernels: {diff:.3g}")
    assert diff < 2e-6


def test_round_trip_and_hugging_face_loads(hf_model, hf_tensors, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    fields = _fields()
    params, _ = layout.params_from_hf(hf_tensors, fields, "state dict")
    exported = layout.hf_from_params(params, fields)
    assert set(exported) == set(hf_tensors) - {layout.HF_DECODER_WEIGHT}
    for name, array in exported.items():
        assert array.dtype == np.float32 and array.flags.c_contiguous
        assert np.array_equal(array, hf_tensors[name]), name
    # A strict load needs the tied decoder weight, which save_pretrained leaves out.
    fresh = transformers.ModernBertForMaskedLM(hf_model.config)
    full = {**exported, layout.HF_DECODER_WEIGHT: exported[layout.HF_WORD_EMBEDDINGS]}
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in full.items()}, strict=True)
    safetensors_numpy.save_file(exported, str(tmp_path / "model.safetensors"))
    config = layout.hf_config(fields, PAD, CLS, SEP)
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded, info = transformers.ModernBertForMaskedLM.from_pretrained(
        str(tmp_path), output_loading_info=True
    )
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert loaded.config.layer_types == hf_model.config.layer_types
    assert loaded.config.rope_parameters == hf_model.config.rope_parameters
    assert loaded.config.sliding_window == hf_model.config.sliding_window
    for name, tensor in loaded.state_dict().items():
        assert np.array_equal(tensor.numpy(), hf_tensors[name]), name


def test_params_from_hf_refuses_missing_and_untied(hf_tensors):
    fields = _fields()
    partial = {k: v for k, v in hf_tensors.items() if ".attn.Wqkv." not in k}
    with pytest.raises(DataError, match=r"model.layers.0.attn.Wqkv.weight' and 3 more missing"):
        layout.params_from_hf(partial, fields, "ckpt")
    untied = {**hf_tensors, "decoder.weight": hf_tensors["decoder.weight"] + 1}
    with pytest.raises(DataError, match="untied"):
        layout.params_from_hf(untied, fields, "ckpt")
    extra = {**hf_tensors, "classifier.weight": np.zeros((2, 32), np.float32)}
    assert layout.params_from_hf(extra, fields, "ckpt")[1] == ["classifier.weight"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"norm_bias": True}, "norm_bias"),
        ({"decoder_bias": False}, "decoder_bias"),
        ({"hidden_activation": "quick_gelu"}, "hidden_activation 'quick_gelu'"),
        ({"model_type": "bert"}, "model_type is 'bert'"),
        ({"hidden_size": None}, "missing hidden_size"),
        ({"embedding_dropout": 0.1}, "embedding_dropout 0.1 differs from mlp_dropout"),
        ({"layer_types": ["full_attention"] * 3 + ["sliding_attention"]}, "layer_types"),
        ({"rope_parameters": {"full_attention": {"rope_type": "linear"}}}, "rope_type"),
    ],
)
def test_model_fields_refuses(change, message):
    config = {"model_type": "modernbert", **HF_SIZES, **change}
    config = {k: v for k, v in config.items() if v is not None}
    with pytest.raises(DataError, match=f"^my/config.json: .*{message}"):
        layout.model_fields(config, "my/config.json")


def test_model_fields_reads_both_config_generations():
    legacy = {"model_type": "modernbert", **HF_SIZES, "hidden_activation": "gelu_pytorch_tanh"}
    fields = layout.model_fields(legacy, "x")
    assert fields["activation"] == "gelu_tanh" and fields["mlm_activation"] == "gelu"
    assert layout.model_fields(layout.hf_config(fields, PAD, CLS, SEP), "x") == fields
    every_layer_global = {**legacy, "global_attn_every_n_layers": 1}
    assert (
        layout.model_fields(every_layer_global, "x")["modernbert"]["global_attn_every_n_layers"]
        == 1
    )


@pytest.fixture(scope="module")
def params(inputs) -> dict:
    """mlm's own initialisation of the tiny model (jitted: one compile instead of many ops)."""
    model = _model(_fields(), KernelSet("cpu"))
    init = jax.jit(lambda batch: model.init(jax.random.key(0), batch, deterministic=True))
    return init(_batch(*inputs))["params"]


def test_init_follows_hugging_face_stddevs(params):
    layer = params["encoder"]["layer_1"]
    assert "attention_layer_norm" not in params["encoder"]["layer_0"]
    assert np.all(np.asarray(layer["mlp_layer_norm"]["scale"]) == 1)
    qkv, out = (np.asarray(layer["attention"][k]["kernel"]) for k in ("qkv", "output"))
    assert qkv.shape == (32, 3, 4, 8) and out.shape == (4, 8, 32)
    # Truncated at 2 stddev: 0.02 for inputs, 0.02 / sqrt(2 * layers) for outputs.
    assert 0.03 < np.abs(qkv).max() <= 0.04 and 0.006 < np.abs(out).max() <= 0.02 / 2**0.5
    assert not np.any(np.asarray(params["mlm_head"]["output_bias"]))


def test_train_mode_and_remat(inputs, params):
    word_ids, mask = inputs
    fields = _fields()
    batch = _batch(word_ids, mask)
    model = _model(fields, KernelSet("cpu"))
    evaluated = _apply(model, params, batch)
    for kernel_set in ("cpu", "standard"):
        dropping = _model(
            fields, KernelSet(kernel_set), dropout_rate=0.2, attention_dropout_rate=0.1
        )
        logits = dropping.apply(
            {"params": params}, batch, deterministic=False, rngs={"dropout": jax.random.key(1)}
        )["mlm_logits"]
        assert logits.shape == (2, SEQ, VOCAB) and bool(jnp.isfinite(logits).all())
        assert not np.allclose(logits, evaluated, atol=1e-3)
    remat = _model(fields, KernelSet("standard"), remat="full")
    np.testing.assert_allclose(_apply(remat, params, batch), evaluated, atol=1e-6)


def test_packed_row_matches_its_sequences_alone(params):
    """Attention stays inside a packed sequence; positions restart; windows count within it."""
    rng = np.random.default_rng(1)
    first, second = rng.integers(3, VOCAB, size=11), rng.integers(3, VOCAB, size=9)
    packed = np.zeros((1, SEQ), np.int64)
    packed[0, :11], packed[0, 11:20] = first, second
    segments = np.zeros((1, SEQ), np.int64)
    segments[0, :11], segments[0, 11:20] = 1, 2
    positions = np.zeros((1, SEQ), np.int64)
    positions[0, :11], positions[0, 11:20] = np.arange(11), np.arange(9)
    alone = np.zeros((2, SEQ), np.int64)
    alone[0, :11], alone[1, :9] = first, second
    alone_mask = (np.arange(SEQ)[None] < np.array([[11], [9]])).astype(np.int64)
    model = _model(_fields(), KernelSet("cpu"))
    params = jax.tree_util.tree_map_with_path(  # Sharp attention, as in `hf_model`.
        lambda path, x: x * 20 if "qkv" in jax.tree_util.keystr(path) else x, params
    )
    packed_batch = _batch(packed, segments > 0, packed_segment_ids=segments, position_ids=positions)
    together = _apply(model, params, packed_batch)
    apart = _apply(model, params, _batch(alone, alone_mask))
    np.testing.assert_allclose(together[0, :11], apart[0, :11], atol=1e-6)
    np.testing.assert_allclose(together[0, 11:20], apart[1, :9], atol=1e-6)
