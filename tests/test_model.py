"""Tests for mlm.model: param layout, masking and packing, tied head, dropout, dtypes, init."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mlm.model import BertForPreTraining, attention_mask

VOCAB, HIDDEN, LAYERS, HEADS, INTER, MAX_POS, TYPES = 64, 32, 2, 4, 48, 16, 2
SEQ, PREDS, BATCH = 16, 4, 3


def make_model(**overrides) -> BertForPreTraining:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_layers=LAYERS,
        num_heads=HEADS,
        intermediate_size=INTER,
        max_position_embeddings=MAX_POS,
        type_vocab_size=TYPES,
        dropout_rate=0.1,
        attention_dropout_rate=0.1,
        use_next_sentence=False,
    )
    kwargs.update(overrides)
    return BertForPreTraining(**kwargs)


def make_batch(lengths=(SEQ, 10, 5), seed=0):
    """Unpacked rows with the given real lengths; masked slots inside the real tokens.

    All keys are always present (and the row count fixed) so tests share compiled functions.
    """
    rng = np.random.default_rng(seed)
    rows = len(lengths)
    mask = (np.arange(SEQ)[None, :] < np.array(lengths)[:, None]).astype(np.int32)
    word_ids = rng.integers(5, VOCAB, size=(rows, SEQ)).astype(np.int32) * mask
    type_ids = ((np.arange(SEQ)[None, :] >= np.array(lengths)[:, None] // 2) * mask).astype(
        np.int32
    )
    positions = np.zeros((rows, PREDS), np.int32)
    for row, length in enumerate(lengths):
        chosen = np.sort(rng.choice(np.arange(1, length), min(PREDS, length - 1), replace=False))
        positions[row, : len(chosen)] = chosen
    return {
        "input_word_ids": word_ids,
        "input_mask": mask,
        "input_type_ids": type_ids,
        "masked_lm_positions": positions,
        "packed_segment_ids": mask.copy(),
        "position_ids": np.tile(np.arange(SEQ, dtype=np.int32), (rows, 1)),
    }


@functools.cache
def jitted(model: BertForPreTraining):
    """Jitted init and apply per (hashable) model config: one compile per config and input shape is
    much faster than eager op-by-op dispatch at new shapes."""
    return (
        jax.jit(model.init, static_argnames=("deterministic",)),
        jax.jit(model.apply, static_argnames=("deterministic", "method")),
    )


def init(model, batch, seed=0):
    return jitted(model)[0](jax.random.key(seed), batch, deterministic=True)


def apply(model, variables, batch, **kwargs):
    return jitted(model)[1](variables, batch, **kwargs)


@pytest.fixture(scope="module")
def f32_model_and_vars():
    model = make_model(use_next_sentence=True)
    return model, init(model, make_batch())


def expected_shapes(use_next_sentence: bool) -> dict[str, tuple[int, ...]]:
    head_dim = HIDDEN // HEADS
    shapes = {
        "encoder/word_embeddings/embedding": (VOCAB, HIDDEN),
        "encoder/position_embeddings/embedding": (MAX_POS, HIDDEN),
        "encoder/type_embeddings/embedding": (TYPES, HIDDEN),
        "encoder/embeddings_layer_norm/scale": (HIDDEN,),
        "encoder/embeddings_layer_norm/bias": (HIDDEN,),
        "mlm_head/dense/kernel": (HIDDEN, HIDDEN),
        "mlm_head/dense/bias": (HIDDEN,),
        "mlm_head/layer_norm/scale": (HIDDEN,),
        "mlm_head/layer_norm/bias": (HIDDEN,),
        "mlm_head/output_bias": (VOCAB,),
    }
    for i in range(LAYERS):
        layer = f"encoder/layer_{i}"
        for name in ("query", "key", "value"):
            shapes[f"{layer}/attention/{name}/kernel"] = (HIDDEN, HEADS, head_dim)
            shapes[f"{layer}/attention/{name}/bias"] = (HEADS, head_dim)
        shapes[f"{layer}/attention/output/kernel"] = (HEADS, head_dim, HIDDEN)
        shapes[f"{layer}/attention/output/bias"] = (HIDDEN,)
        shapes[f"{layer}/intermediate/kernel"] = (HIDDEN, INTER)
        shapes[f"{layer}/intermediate/bias"] = (INTER,)
        shapes[f"{layer}/output/kernel"] = (INTER, HIDDEN)
        shapes[f"{layer}/output/bias"] = (HIDDEN,)
        for norm in ("attention_layer_norm", "output_layer_norm"):
            shapes[f"{layer}/{norm}/scale"] = (HIDDEN,)
            shapes[f"{layer}/{norm}/bias"] = (HIDDEN,)
    if use_next_sentence:
        shapes["nsp_head/pooler/kernel"] = (HIDDEN, HIDDEN)
        shapes["nsp_head/pooler/bias"] = (HIDDEN,)
        shapes["nsp_head/classifier/kernel"] = (HIDDEN, 2)
        shapes["nsp_head/classifier/bias"] = (2,)
    return shapes


def flat_params(variables) -> dict[str, jax.Array]:
    return traverse_util.flatten_dict(variables["params"], sep="/")


@pytest.mark.parametrize("use_next_sentence", [False, True])
def test_param_tree_names_shapes_and_outputs(use_next_sentence):
    model = make_model(use_next_sentence=use_next_sentence)
    batch = make_batch()
    # Shapes and dtypes only: abstract evaluation, no compile.
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), batch, deterministic=True))
    params = flat_params(variables)
    assert {k: v.shape for k, v in params.items()} == expected_shapes(use_next_sentence)
    assert set(variables) == {"params"}

    outputs = jax.eval_shape(functools.partial(model.apply, deterministic=True), variables, batch)
    expected_keys = {"mlm_logits", "nsp_logits"} if use_next_sentence else {"mlm_logits"}
    assert set(outputs) == expected_keys
    assert outputs["mlm_logits"].shape == (BATCH, PREDS, VOCAB)
    assert outputs["mlm_logits"].dtype == jnp.float32
    if use_next_sentence:
        assert outputs["nsp_logits"].shape == (BATCH, 2)
        assert outputs["nsp_logits"].dtype == jnp.float32
    encode = functools.partial(model.apply, deterministic=True, method=BertForPreTraining.encode)
    sequence = jax.eval_shape(encode, variables, batch)
    assert sequence.shape == (BATCH, SEQ, HIDDEN)
    assert sequence.dtype == jnp.float32


def test_hidden_size_not_divisible_by_heads_raises():
    model = make_model(hidden_size=30)
    with pytest.raises(ValueError, match="divisible by model.num_heads"):
        init(model, make_batch())


def test_sequence_longer_than_position_table_raises():
    model = make_model(max_position_embeddings=SEQ - 1)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        init(model, make_batch())


def test_default_segments_and_positions_match_explicit_ones(f32_model_and_vars):
    model, variables = f32_model_and_vars
    explicit = make_batch()
    implicit = {
        k: v for k, v in explicit.items() if k not in ("packed_segment_ids", "position_ids")
    }
    default_out = apply(model, variables, implicit, deterministic=True)
    explicit_out = apply(model, variables, explicit, deterministic=True)
    for key in default_out:
        np.testing.assert_allclose(default_out[key], explicit_out[key], atol=1e-6)


def test_padding_does_not_change_logits(f32_model_and_vars):
    model, variables = f32_model_and_vars
    batch = make_batch()
    changed = dict(batch)
    padding = batch["input_mask"] == 0
    changed["input_word_ids"] = np.where(padding, 7, batch["input_word_ids"]).astype(np.int32)
    changed["input_type_ids"] = np.where(padding, 1, batch["input_type_ids"]).astype(np.int32)
    # Padding position ids may hold any value, even out of the table's range.
    changed["position_ids"] = np.where(padding, 10_000, np.arange(SEQ)).astype(np.int32)
    base = apply(model, variables, batch, deterministic=True)
    moved = apply(model, variables, changed, deterministic=True)
    for key in base:
        assert np.all(np.isfinite(moved[key]))
        assert np.max(np.abs(base[key] - moved[key])) < 1e-6, key


def test_packed_row_matches_rows_run_alone(f32_model_and_vars):
    model, variables = f32_model_and_vars
    # Row 0 packs sequences A (5 tokens) and B (6 tokens); rows 1 and 2 hold A and B alone.
    batch = make_batch([11, 5, 6], seed=3)
    batch["input_word_ids"][1, :5] = batch["input_word_ids"][0, :5]
    batch["input_word_ids"][2, :6] = batch["input_word_ids"][0, 5:11]
    batch["input_type_ids"][:] = 0
    batch["packed_segment_ids"][0, :11] = [1] * 5 + [2] * 6
    batch["position_ids"][0, :11] = list(range(5)) + list(range(6))
    batch["masked_lm_positions"][:] = [[1, 3, 5 + 1, 5 + 4], [1, 3, 0, 0], [1, 4, 0, 0]]
    logits = apply(model, variables, batch, deterministic=True)["mlm_logits"]
    np.testing.assert_allclose(logits[0, :2], logits[1, :2], atol=1e-5)
    np.testing.assert_allclose(logits[0, 2:], logits[2, :2], atol=1e-5)
    # Sanity: without the segment mask the packed row differs (the check above can fail).
    unmasked = dict(batch, packed_segment_ids=batch["input_mask"])
    leaked = apply(model, variables, unmasked, deterministic=True)["mlm_logits"]
    assert np.max(np.abs(leaked[0, :2] - logits[1, :2])) > 1e-4


def layer_norm(x, scale, bias):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-12) * scale + bias


def test_heads_match_hand_computation_with_tied_embeddings(f32_model_and_vars):
    model, variables = f32_model_and_vars
    batch = make_batch()
    params = flat_params(variables)
    sequence = apply(model, variables, batch, deterministic=True, method=BertForPreTraining.encode)
    outputs = apply(model, variables, batch, deterministic=True)

    gathered = np.take_along_axis(np.asarray(sequence), batch["masked_lm_positions"][..., None], 1)
    hidden = gathered @ params["mlm_head/dense/kernel"] + params["mlm_head/dense/bias"]
    hidden = layer_norm(
        jax.nn.gelu(hidden, approximate=True),
        params["mlm_head/layer_norm/scale"],
        params["mlm_head/layer_norm/bias"],
    )
    word_embeddings = params["encoder/word_embeddings/embedding"]
    expected = hidden @ word_embeddings.T + params["mlm_head/output_bias"]
    np.testing.assert_allclose(outputs["mlm_logits"], expected, atol=1e-5)
    # The only [V, H] or [H, V] parameter is the word-embedding table: the projection is tied.
    vocab_matrices = [k for k, v in params.items() if v.shape in ((VOCAB, HIDDEN), (HIDDEN, VOCAB))]
    assert vocab_matrices == ["encoder/word_embeddings/embedding"]

    pooled = np.tanh(
        sequence[:, 0] @ params["nsp_head/pooler/kernel"] + params["nsp_head/pooler/bias"]
    )
    nsp = pooled @ params["nsp_head/classifier/kernel"] + params["nsp_head/classifier/bias"]
    np.testing.assert_allclose(outputs["nsp_logits"], nsp, atol=1e-5)


def test_attention_mask_semantics():
    segments = jnp.array([[1, 1, 2, 2, 0]])
    mask = np.asarray(attention_mask(segments))[0, 0]
    expected = np.array(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 0, 0, 1],  # padding query sees only itself: never an empty softmax row
        ],
        bool,
    )
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("dropout_rate, attention_dropout_rate", [(0.1, 0.1), (0.0, 0.5)])
def test_dropout_changes_outputs_and_is_reproducible(
    f32_model_and_vars, dropout_rate, attention_dropout_rate
):
    eval_model, variables = f32_model_and_vars
    model = make_model(
        use_next_sentence=True,
        dropout_rate=dropout_rate,
        attention_dropout_rate=attention_dropout_rate,
    )
    batch = make_batch()

    def train_logits(seed):
        rngs = {"dropout": jax.random.key(seed)}
        return apply(model, variables, batch, deterministic=False, rngs=rngs)["mlm_logits"]

    eval_logits = apply(eval_model, variables, batch, deterministic=True)["mlm_logits"]
    first, again, other = train_logits(1), train_logits(1), train_logits(2)
    np.testing.assert_array_equal(first, again)
    assert np.max(np.abs(first - eval_logits)) > 1e-3
    assert np.max(np.abs(first - other)) > 1e-3


def test_rows_of_only_cls_stay_finite_with_finite_gradients(f32_model_and_vars):
    model, variables = f32_model_and_vars
    batch = make_batch([SEQ, 2, 2])
    batch["input_mask"][1:, 1:] = 0
    batch["packed_segment_ids"][1:, 1:] = 0
    batch["input_word_ids"][1:, 1:] = 0
    batch["masked_lm_positions"][1:] = 0

    def total(params):
        outputs = model.apply({"params": params}, batch, deterministic=True)
        return outputs["mlm_logits"].sum() + outputs["nsp_logits"].sum(), outputs

    grads, outputs = jax.jit(jax.grad(total, has_aux=True))(variables["params"])
    assert all(np.all(np.isfinite(v)) for v in outputs.values())
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
    # The dropout (flax) attention path too.
    rngs = {"dropout": jax.random.key(0)}
    train_outputs = apply(model, variables, batch, deterministic=False, rngs=rngs)
    assert all(np.all(np.isfinite(v)) for v in train_outputs.values())


def test_bfloat16_compute_keeps_float32_params_and_is_close_to_float32(f32_model_and_vars):
    f32_model, f32_vars = f32_model_and_vars
    bf16_model = make_model(use_next_sentence=True, dtype=jnp.bfloat16)
    batch = make_batch()
    bf16_vars = jax.eval_shape(
        lambda: bf16_model.init(jax.random.key(0), batch, deterministic=True)
    )
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(bf16_vars))

    reference = apply(f32_model, f32_vars, batch, deterministic=True)
    outputs = apply(bf16_model, f32_vars, batch, deterministic=True)
    for key, logits in outputs.items():
        assert logits.dtype == jnp.float32
        assert np.all(np.isfinite(logits))
        diff = np.max(np.abs(logits - reference[key]))
        scale = np.max(np.abs(reference[key]))
        assert 0 < diff < 0.05 * scale, (key, diff, scale)


def test_init_is_truncated_normal_and_biases_zero():
    model = make_model(hidden_size=128, intermediate_size=512, num_heads=4, num_layers=1)
    params = flat_params(init(model, make_batch()))
    kernel = np.asarray(params["encoder/layer_0/intermediate/kernel"])  # 65536 values
    # jax's truncated_normal(0.02) truncates at +-2 stddev without rescaling (as TF/BERT), so the
    # sample std is 0.02 * 0.87962566 (std of a standard normal truncated to [-2, 2]).
    assert abs(kernel.std() - 0.02 * 0.87962566) < 3e-4
    assert abs(kernel.mean()) < 3e-4
    assert np.abs(kernel).max() <= 0.04
    for name, value in params.items():
        if name.endswith(("kernel", "embedding")):
            assert 0.012 < np.std(value) < 0.024 and np.abs(value).max() <= 0.04, name
        elif name.endswith("scale"):
            np.testing.assert_array_equal(value, 1.0)
        else:
            np.testing.assert_array_equal(value, 0.0)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_keeps_params_outputs_and_gradients(remat):
    plain, rematted = make_model(), make_model(remat=remat)
    batch = make_batch()
    variables = init(plain, batch)
    assert jax.tree.map(jnp.shape, init(rematted, batch)) == jax.tree.map(jnp.shape, variables)
    np.testing.assert_array_equal(
        flat_params(init(rematted, batch))["encoder/layer_1/output/kernel"],
        flat_params(variables)["encoder/layer_1/output/kernel"],
    )

    def loss(model):
        def fn(params):
            rngs = {"dropout": jax.random.key(3)}
            out = model.apply({"params": params}, batch, deterministic=False, rngs=rngs)
            return jnp.sum(out["mlm_logits"] ** 2)

        return jax.jit(jax.value_and_grad(fn))(variables["params"])

    # The recomputed forward is fused differently: float32 rounding of gradients whose terms
    # are ~1 in size leaves ~1e-6 absolute differences on elements that nearly cancel.
    for a, b in zip(jax.tree.leaves(loss(rematted)), jax.tree.leaves(loss(plain)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------ Model Garden encoder options (BertEncoderConfig)


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def numpy_embeddings(params, batch):
    """Word + position (0 at padding) + type embeddings, then LayerNorm (at the table width)."""
    positions = np.where(batch["packed_segment_ids"] != 0, batch["position_ids"], 0)
    x = (
        params["encoder/word_embeddings/embedding"][batch["input_word_ids"]]
        + params["encoder/position_embeddings/embedding"][positions]
        + params["encoder/type_embeddings/embedding"][batch["input_type_ids"]]
    )
    ln = "encoder/embeddings_layer_norm"
    return layer_norm(x, params[f"{ln}/scale"], params[f"{ln}/bias"])


def numpy_pre_ln_block(x, params, layer, mask):
    """Model Garden's TransformerEncoderBlock(norm_first=True) without dropout, in numpy."""
    p = {k.removeprefix(f"encoder/{layer}/"): np.asarray(v) for k, v in params.items()}
    y = layer_norm(x, p["attention_layer_norm/scale"], p["attention_layer_norm/bias"])
    q, k, v = (
        np.einsum("bsh,hnd->bsnd", y, p[f"attention/{n}/kernel"]) + p[f"attention/{n}/bias"]
        for n in ("query", "key", "value")
    )
    scores = np.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(mask, scores, -1e30)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    context = np.einsum("bnqk,bknd->bqnd", weights, v)
    x = x + np.einsum("bqnd,ndh->bqh", context, p["attention/output/kernel"])
    x = x + p["attention/output/bias"]
    y = layer_norm(x, p["output_layer_norm/scale"], p["output_layer_norm/bias"])
    hidden = gelu_tanh(y @ p["intermediate/kernel"] + p["intermediate/bias"])
    return x + hidden @ p["output/kernel"] + p["output/bias"]


def test_pre_ln_block_matches_numpy_and_keeps_the_param_tree():
    post, pre = make_model(num_layers=1), make_model(num_layers=1, norm_first=True)
    batch = make_batch()
    variables = init(pre, batch)
    post_variables = init(post, batch)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, post_variables)
    params = {k: np.asarray(v) for k, v in flat_params(variables).items()}
    # LayerNorms away from (1, 0) so that a misplaced norm shows.
    rng = np.random.default_rng(1)
    for name in params:
        if "layer_norm" in name:
            params[name] = params[name] + rng.normal(0, 0.3, params[name].shape).astype(np.float32)
    variables = {"params": traverse_util.unflatten_dict(params, sep="/")}
    sequence = apply(pre, variables, batch, deterministic=True, method=BertForPreTraining.encode)
    mask = np.asarray(attention_mask(jnp.asarray(batch["packed_segment_ids"])))
    expected = numpy_pre_ln_block(numpy_embeddings(params, batch), params, "layer_0", mask)
    np.testing.assert_allclose(sequence, expected, atol=2e-5)
    post_sequence = apply(post, variables, batch, deterministic=True, method="encode")
    assert np.abs(np.asarray(post_sequence) - expected).max() > 0.1  # Not the post-LN block.


def test_factorised_embeddings_match_numpy_with_tied_head():
    width = 8
    model = make_model(embedding_size=width, num_layers=1, use_next_sentence=True)
    batch = make_batch()
    variables = init(model, batch)
    params = {k: np.asarray(v) for k, v in flat_params(variables).items()}
    shapes = {k: v.shape for k, v in params.items()}
    assert shapes["encoder/word_embeddings/embedding"] == (VOCAB, width)
    assert shapes["encoder/position_embeddings/embedding"] == (MAX_POS, width)
    assert shapes["encoder/type_embeddings/embedding"] == (TYPES, width)
    assert shapes["encoder/embeddings_layer_norm/scale"] == (width,)
    assert shapes["encoder/embedding_projection/kernel"] == (width, HIDDEN)
    assert shapes["encoder/embedding_projection/bias"] == (HIDDEN,)
    assert shapes["mlm_head/dense/kernel"] == (HIDDEN, width)
    assert shapes["mlm_head/layer_norm/scale"] == (width,)
    assert "encoder/embedding_projection/kernel" not in flat_params(init(make_model(), batch))

    # Embeddings -> projection, checked through a zero-layer encoder with the same params.
    no_layers = make_model(embedding_size=width, num_layers=0, use_next_sentence=True)
    projected = apply(no_layers, variables, batch, deterministic=True, method="encode")
    expected = (
        numpy_embeddings(params, batch) @ params["encoder/embedding_projection/kernel"]
        + params["encoder/embedding_projection/bias"]
    )
    np.testing.assert_allclose(projected, expected, atol=1e-5)

    # The head maps H back to E and scores against the [V, E] table.
    sequence = np.asarray(apply(model, variables, batch, deterministic=True, method="encode"))
    outputs = apply(model, variables, batch, deterministic=True)
    gathered = np.take_along_axis(sequence, batch["masked_lm_positions"][..., None], 1)
    hidden = gelu_tanh(gathered @ params["mlm_head/dense/kernel"] + params["mlm_head/dense/bias"])
    hidden = layer_norm(
        hidden, params["mlm_head/layer_norm/scale"], params["mlm_head/layer_norm/bias"]
    )
    logits = hidden @ params["encoder/word_embeddings/embedding"].T + params["mlm_head/output_bias"]
    np.testing.assert_allclose(outputs["mlm_logits"], logits, atol=1e-5)

    # The gradient reaches the table through the input lookup and the tied output product.
    def loss(p):
        return jnp.sum(model.apply({"params": p}, batch, deterministic=True)["mlm_logits"] ** 2)

    grads = flat_params({"params": jax.jit(jax.grad(loss))(variables["params"])})
    assert np.all(np.isfinite(grads["encoder/word_embeddings/embedding"]))
    assert np.abs(grads["encoder/embedding_projection/kernel"]).max() > 0


def test_embedding_size_equal_to_hidden_size_is_the_unfactorised_model():
    batch = make_batch()
    plain, same = make_model(), make_model(embedding_size=HIDDEN)
    variables = init(plain, batch)
    assert jax.tree.map(np.asarray, init(same, batch)).keys() == variables.keys()
    for a, b in zip(jax.tree.leaves(init(same, batch)), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        apply(same, variables, batch, deterministic=True)["mlm_logits"],
        apply(plain, variables, batch, deterministic=True)["mlm_logits"],
    )


@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_feed_forward_and_head_activations(activation, f32_model_and_vars):
    _, variables = f32_model_and_vars
    batch = make_batch()
    params = flat_params(variables)
    functions = {"relu": lambda x: np.maximum(x, 0), "silu": lambda x: x / (1 + np.exp(-x))}
    # The head follows model.activation unless mlm_activation names its own.
    for model, head in (
        (make_model(use_next_sentence=True, activation=activation), activation),
        (make_model(use_next_sentence=True, mlm_activation=activation), activation),
        (
            make_model(use_next_sentence=True, activation=activation, mlm_activation="gelu_tanh"),
            "gelu_tanh",
        ),
    ):
        sequence = np.asarray(apply(model, variables, batch, deterministic=True, method="encode"))
        gathered = np.take_along_axis(sequence, batch["masked_lm_positions"][..., None], 1)
        hidden = gathered @ params["mlm_head/dense/kernel"] + params["mlm_head/dense/bias"]
        hidden = functions.get(head, gelu_tanh)(hidden)
        hidden = layer_norm(
            hidden, params["mlm_head/layer_norm/scale"], params["mlm_head/layer_norm/bias"]
        )
        expected = hidden @ params["encoder/word_embeddings/embedding"].T
        expected = expected + params["mlm_head/output_bias"]
        logits = apply(model, variables, batch, deterministic=True)["mlm_logits"]
        np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_initializer_ranges_set_the_truncated_normal_stddevs():
    model = make_model(
        hidden_size=128,
        intermediate_size=512,
        num_layers=1,
        use_next_sentence=True,
        initializer_range=0.05,
        mlm_initializer_range=0.01,
    )
    params = flat_params(init(model, make_batch()))
    truncated = 0.87962566  # Std of a standard normal cut at +-2.
    for name, stddev in (
        ("encoder/layer_0/intermediate/kernel", 0.05),
        ("encoder/word_embeddings/embedding", 0.05),
        ("nsp_head/pooler/kernel", 0.05),  # Model Garden: the encoder's initializer.
        ("mlm_head/dense/kernel", 0.01),
    ):
        value = np.asarray(params[name])
        assert abs(value.std() - stddev * truncated) < 0.06 * stddev, name
        assert np.abs(value).max() <= 2 * stddev, name
