"""mlm.experiment: one build of model, optimizer, state layout and steps for every command."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from mlm import checkpoint, parallel
from mlm import config as config_lib
from mlm.experiment import Experiment
from mlm.step_bench import synthetic_batch


def tiny_config(**optimizer):
    config = config_lib.sized_config("tiny")
    config.model.vocab_size = 96
    config.model.dropout_rate = 0.0
    config.model.attention_dropout_rate = 0.0
    config.data.seq_length = 32
    config.data.max_predictions_per_seq = 5
    config.train.global_batch_size = 8
    config.train.num_steps = 10
    config.optimizer.warmup_steps = 2
    config.optimizer.learning_rate = 1e-3
    config.optimizer.update(optimizer)
    return config_lib.validate(config)


def test_the_built_steps_train_evaluate_and_predict():
    config = tiny_config()
    experiment = Experiment.build(config, parallel.make_mesh(config.mesh))
    state = experiment.init_state()
    assert jax.tree.structure(state) == jax.tree.structure(experiment.abstract)
    shapes = jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype), state)
    assert shapes == jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype), experiment.abstract)
    assert state.params["encoder"]["word_embeddings"]["embedding"].shape == (96, 128)
    batch = parallel.global_batch(
        synthetic_batch(np.random.default_rng(3), 8, 32, 5, 96, 0.9), experiment.mesh
    )
    first = experiment.eval_step(state.params, batch)
    losses = []
    for _ in range(6):  # One batch again and again: the loss must fall.
        state, logs = experiment.train_step(state, batch)
        losses.append(float(logs["loss"]))
    assert int(state.step) == 6 and losses[-1] < losses[0]
    after = experiment.eval_step(state.params, batch)
    assert float(after["lm_loss_sum"]) < float(first["lm_loss_sum"])
    predictions = experiment.inference_step(state.params, batch)
    assert predictions["mlm_logits"].shape == (8, 5, 96)


def test_init_state_is_the_seeded_init_and_the_restore_target_carries_the_shardings():
    config = tiny_config()
    experiment = Experiment.build(config, parallel.make_mesh(config.mesh))
    same = experiment.init_state()
    other_seed = experiment.init_state(seed=config.train.seed + 1)
    direct = jax.jit(experiment.init_fn)(jax.random.PRNGKey(config.train.seed))
    for a, b in zip(jax.tree.leaves(same.params), jax.tree.leaves(direct.params), strict=True):
        np.testing.assert_array_equal(a, b)
    embedding = ("encoder", "word_embeddings", "embedding")
    pick = lambda state: np.asarray(state.params[embedding[0]][embedding[1]][embedding[2]])  # noqa: E731
    assert not np.array_equal(pick(same), pick(other_seed))
    target = experiment.restore_target()
    assert all(
        leaf.sharding == sharding
        for leaf, sharding in zip(
            jax.tree.leaves(target), jax.tree.leaves(experiment.shardings), strict=True
        )
    )


@pytest.mark.parametrize(
    "ema_decay, dtype", [(0.0, "float32"), (0.999, "float32"), (0.0, "float16")]
)
def test_state_from_params_has_the_layout_of_a_new_run(tmp_path, ema_decay, dtype):
    config = tiny_config(ema_decay=ema_decay)
    config.model.dtype = dtype
    config = config_lib.validate(config)
    experiment = Experiment.build(config)
    trained = experiment.init_state(seed=5)
    state = experiment.state_from_params(jax.device_get(trained.params))
    assert jax.tree.structure(state) == jax.tree.structure(experiment.abstract)
    assert int(state.step) == 0
    assert (state.ema_params is not None) == (ema_decay > 0)
    assert (state.loss_scale is not None) == (dtype == "float16")
    moments = [leaf for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim == 2]
    assert moments and all(not np.asarray(leaf).any() for leaf in moments)
    # Saved and restored as training would resume it.
    manager = checkpoint.make_manager(str(tmp_path / "checkpoints"), keep=1)
    checkpoint.save(manager, 0, state, None, config.to_dict())
    checkpoint.finish(manager)
    reader = checkpoint.open_reader(str(tmp_path / "checkpoints"))
    restored, step = checkpoint.restore_latest_intact(
        reader, experiment.restore_target(), report=print
    )
    reader.close()
    assert step == 0
    np.testing.assert_array_equal(
        restored.params["mlm_head"]["output_bias"], trained.params["mlm_head"]["output_bias"]
    )


def test_readers_get_one_device_whatever_mesh_the_run_trained_on():
    script = textwrap.dedent(
        """
        import jax
        from mlm import config as config_lib, parallel
        from mlm.experiment import Experiment
        config = config_lib.sized_config("tiny")
        config.mesh.data, config.mesh.fsdp = 2, 4
        config = config_lib.validate(config)
        trained_on = Experiment.build(config, parallel.make_mesh(config.mesh))
        reader = Experiment.build(config)
        print(dict(trained_on.mesh.shape), reader.mesh.size, len(jax.devices()))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[0] == "{'data': 2, 'fsdp': 4} 1 8"
