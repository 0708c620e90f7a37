"""mlm.kernels: the choice per platform, and both kernel sets computing the same function."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mlm import config as config_lib
from mlm import kernels, parallel, task
from mlm.experiment import Experiment
from mlm.kernels import cpu, cpu_dropout, standard
from mlm.model import attention_mask
from mlm.step_bench import synthetic_batch


@pytest.mark.parametrize(
    "setting, platform, expected",
    [
        ("auto", "cpu", "cpu"),
        ("auto", "gpu", "standard"),
        ("auto", "tpu", "standard"),
        ("cpu", "tpu", "cpu"),
        ("standard", "cpu", "standard"),
    ],
)
def test_setting_resolves_by_the_platform(setting, platform, expected):
    assert kernels.select(setting, platform) == kernels.KernelSet(expected, platform)


def test_unknown_setting_is_refused():
    with pytest.raises(ValueError, match="model.kernels must be one of auto, cpu, standard"):
        kernels.select("fast", "cpu")
    config = config_lib.base_config()
    config.model.kernels = "fast"
    with pytest.raises(config_lib.ConfigError, match="model.kernels must be one of"):
        config_lib.validate(config)


def test_build_model_takes_kernels_and_row_sharding_from_the_mesh():
    # A mesh of TPU devices on this CPU host gets the standard set: tests/test_aot.py.
    config = config_lib.validate(config_lib.sized_config("tiny"))
    mesh = parallel.make_mesh(config.mesh)
    model = task.build_model(config, mesh)
    assert model.kernels == kernels.KernelSet("cpu", "cpu")
    assert model.row_sharding == parallel.batch_sharding(mesh)
    without_mesh = task.build_model(config)
    assert without_mesh.kernels == kernels.KernelSet("cpu", "cpu")
    assert without_mesh.row_sharding is None


def test_dropout_layers_of_each_set():
    assert isinstance(kernels.KernelSet("cpu").dropout(0.1), cpu_dropout.Dropout)
    layer = kernels.KernelSet("standard").dropout(0.1)
    assert type(layer) is nn.Dropout


def test_attention_implementation_is_cudnn_only_on_gpu_in_16_bit():
    assert standard.attention_implementation("gpu", jnp.bfloat16) == "cudnn"
    assert standard.attention_implementation("gpu", jnp.float16) == "cudnn"
    assert standard.attention_implementation("gpu", jnp.float32) is None
    assert standard.attention_implementation("tpu", jnp.bfloat16) is None
    assert standard.attention_implementation("cpu", jnp.bfloat16) is None


def test_cudnn_attention_falls_back_to_xla_where_unavailable():
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(key, (2, 8, 2, 4), jnp.bfloat16) for key in keys)
    mask = attention_mask(jnp.array([[1] * 6 + [0] * 2, [1] * 3 + [2] * 5]))
    expected = standard.fused_attention(q, k, v, mask, implementation=None)
    forced = jax.jit(lambda q, k, v: standard.fused_attention(q, k, v, mask, "cudnn"))
    np.testing.assert_array_equal(forced(q, k, v), expected)
    # A KernelSet for a GPU asks for cuDNN; on this CPU host the XLA fallback runs.
    gpu_set = kernels.KernelSet("standard", "gpu")
    np.testing.assert_array_equal(
        jax.jit(lambda q, k, v: gpu_set.attention(q, k, v, mask))(q, k, v), expected
    )


SEQ, HEADS, HEAD_DIM = 16, 4, 8


def _attention_inputs(dtype):
    rng = np.random.default_rng(0)
    shape = (2, SEQ, HEADS, HEAD_DIM)
    query, key, value = (jnp.asarray(rng.normal(size=shape), dtype) for _ in range(3))
    segments = np.array([[1] * 6 + [2] * 6 + [0] * 4, [1] * 3 + [0] * 13], np.int32)
    return query, key, value, attention_mask(segments)


@pytest.mark.parametrize("name", kernels.KERNEL_SETS)
@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_dropout_attention_is_fused_attention_plus_dropout(name, dtype, atol):
    query, key, value, mask = _attention_inputs(dtype)
    attend = {"cpu": cpu.dropout_attention, "standard": standard.dropout_attention}[name]

    @functools.partial(jax.jit, static_argnames=("rate",))
    def with_dropout(rate, rng):
        return attend(query, key, value, mask, dropout_rate=rate, dropout_rng=rng)

    reference = standard.fused_attention(query, key, value, mask)
    kept_all = with_dropout(0.0, jax.random.key(1))
    assert kept_all.dtype == reference.dtype == dtype
    np.testing.assert_allclose(
        np.asarray(kept_all, np.float32), np.asarray(reference, np.float32), atol=atol
    )
    dropped = np.asarray(with_dropout(0.3, jax.random.key(1)), np.float32)
    assert np.max(np.abs(dropped - np.asarray(reference, np.float32))) > 0.1
    np.testing.assert_array_equal(dropped, np.asarray(with_dropout(0.3, jax.random.key(1))))


def test_standard_attention_dropout_drops_each_probability_independently():
    rate = 0.25
    n = 64
    query = jnp.zeros((8, n, 2, 4))  # Uniform attention: every probability is 1 / n.
    mask = jnp.ones((1, 1, n, n), bool)
    # With identity rows as values, the output holds the (dropped, rescaled) probabilities.
    eye = jnp.broadcast_to(jnp.eye(n)[None, :, None, :], (8, n, 2, n))
    out = standard.dropout_attention(
        query, query, eye, mask, dropout_rate=rate, dropout_rng=jax.random.key(0)
    )
    probabilities = np.asarray(out) * n  # 0 where dropped, 1 / (1 - rate) where kept.
    dropped = probabilities < 0.5
    assert abs(dropped.mean() - rate) < 5 * np.sqrt(rate * (1 - rate) / dropped.size)
    np.testing.assert_allclose(probabilities[~dropped], 1 / (1 - rate), rtol=1e-5)
    # Not one mask shared by the batch or the heads.
    assert (dropped[0] != dropped[1]).any() and (dropped[:, :, 0] != dropped[:, :, 1]).any()


def _tiny_config(kernel_set: str):
    config = config_lib.sized_config("tiny")
    config.model.vocab_size = 96
    config.model.dropout_rate = 0.0
    config.model.attention_dropout_rate = 0.0
    config.model.kernels = kernel_set
    config.data.seq_length = 32
    config.data.max_predictions_per_seq = 5
    config.train.global_batch_size = 8
    config.train.num_steps = 10
    config.optimizer.warmup_steps = 2
    config.optimizer.learning_rate = 1e-3
    return config_lib.validate(config)


def _train(kernel_set: str, num_steps: int, state=None):
    config = _tiny_config(kernel_set)
    mesh = parallel.make_mesh(config.mesh)
    experiment = Experiment.build(config, mesh)
    assert experiment.model.kernels.name == kernel_set
    if state is None:
        state = experiment.init_state(seed=0)
    batch = synthetic_batch(np.random.default_rng(7), 8, 32, 5, 96, 0.8)
    losses = []
    for _ in range(num_steps):  # One batch again and again: the loss must fall.
        state, logs = experiment.train_step(state, parallel.global_batch(batch, mesh))
        losses.append(float(logs["loss"]))
    return state, losses


def test_both_sets_train_the_same_model_and_share_checkpoints():
    config = _tiny_config("cpu")
    init_cpu = task.state_initializer(config, task.build_model(config), _optimizer(config))
    init_std = task.state_initializer(
        config,
        task.build_model(config).clone(kernels=kernels.KernelSet("standard")),
        _optimizer(config),
    )
    params_cpu = jax.jit(init_cpu)(jax.random.PRNGKey(0)).params
    params_std = jax.jit(init_std)(jax.random.PRNGKey(0)).params
    assert jax.tree.structure(params_cpu) == jax.tree.structure(params_std)
    for a, b in zip(jax.tree.leaves(params_cpu), jax.tree.leaves(params_std), strict=True):
        np.testing.assert_array_equal(a, b)

    cpu_state, cpu_losses = _train("cpu", 4)
    std_state, std_losses = _train("standard", 4)
    np.testing.assert_allclose(cpu_losses, std_losses, rtol=1e-5)
    assert cpu_losses[-1] < cpu_losses[0]
    for a, b in zip(jax.tree.leaves(cpu_state), jax.tree.leaves(std_state), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)

    # A state trained with one set continues with the other (the checkpoint pytree is the same).
    _, continued = _train("standard", 2, state=cpu_state)
    _, reference = _train("cpu", 2, state=std_state)
    np.testing.assert_allclose(continued, reference, rtol=1e-5)


def _optimizer(config):
    from mlm.optim import create_optimizer

    return create_optimizer(config.optimizer, config.train.num_steps)


@pytest.mark.parametrize("name", kernels.KERNEL_SETS)
def test_float16_attention_runs_on_cpu_in_both_sets(name):
    query, key, value, mask = _attention_inputs(jnp.float16)
    out = jax.jit(lambda q, k, v: kernels.KernelSet(name, "cpu").attention(q, k, v, mask))(
        query, key, value
    )
    reference = standard.fused_attention(
        *(t.astype(jnp.float32) for t in (query, key, value)), mask
    )
    assert out.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(out, np.float32), reference, atol=2e-3)


def test_tune_host_changes_malloc_only_for_cpu():
    assert kernels.tune_host("tpu") is False
    assert kernels.tune_host("gpu") is False
