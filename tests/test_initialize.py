"""Tests for mlm.initialize: starting a new run from another run's checkpoint."""

import os

import jax
import ml_collections
import numpy as np
import optax
import pytest

from mlm import checkpoint, initialize, task
from mlm import config as config_lib
from mlm.errors import ConfigError, WorkdirError
from mlm.optim import create_optimizer
from mlm.train import train_and_evaluate

SOURCE_STEPS = 3


def tiny_config(**data) -> ml_collections.ConfigDict:
    config = config_lib.base_config()
    config.model.update(
        vocab_size=600,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
    )
    config.data.update(seq_length=32, max_predictions_per_seq=5, use_next_sentence_label=False)
    config.data.update(**data)
    config.train.update(
        global_batch_size=8,
        num_steps=SOURCE_STEPS,
        log_every=1,
        eval_every=0,
        checkpoint_every=SOURCE_STEPS,
    )
    config.optimizer.update(learning_rate=5e-3, warmup_steps=1)
    return config


def fresh_state(config: ml_collections.ConfigDict, seed: int = 7) -> task.TaskState:
    """The state a new run starts from (what train_and_evaluate creates before training)."""
    config = config_lib.validate(config)
    model = task.build_model(config)
    tx = create_optimizer(config.optimizer, config.train.num_steps)
    return jax.jit(task.state_initializer(config, model, tx))(jax.random.PRNGKey(seed))


def save_state(directory: str, state: task.TaskState, step: int) -> None:
    manager = checkpoint.make_manager(directory, keep=0)
    checkpoint.save(manager, step, state, None)
    manager.wait_until_finished()
    manager.close()


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trees_equal(actual, expected):
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for a, b in zip(jax.tree.leaves(host(actual)), jax.tree.leaves(host(expected)), strict=True):
        np.testing.assert_array_equal(a, b)


def names(tree) -> list[str]:
    return sorted(
        "/".join(str(key.key) for key in path)
        for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
    )


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A real 3-step run (state and data items), and its final state read back."""
    workdir = str(tmp_path_factory.mktemp("source") / "workdir")
    train_and_evaluate(tiny_config(), workdir, mode="train")
    config = config_lib.validate(tiny_config())
    model = task.build_model(config)
    tx = create_optimizer(config.optimizer, config.train.num_steps)
    abstract = jax.eval_shape(task.state_initializer(config, model, tx), jax.random.PRNGKey(0))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = checkpoint.abstract_with_shardings(abstract, jax.tree.map(lambda _: device, abstract))
    manager = checkpoint.make_manager(checkpoint.checkpoint_dir(workdir), keep=0)
    state = checkpoint.restore(manager, SOURCE_STEPS, target)
    manager.close()
    return workdir, state


@pytest.fixture(scope="module")
def target():
    return fresh_state(tiny_config())


def test_params_only_copies_every_param_and_keeps_the_new_run_state(source, target):
    workdir, saved = source
    state, report = initialize.load_initial_state(target, workdir, init_optimizer=False)
    assert_trees_equal(state.params, saved.params)
    assert_trees_equal(state.opt_state, target.opt_state)
    assert int(state.step) == 0
    np.testing.assert_array_equal(state.rng, target.rng)
    for new, old in zip(jax.tree.leaves(state.params), jax.tree.leaves(target.params), strict=True):
        assert new.sharding == old.sharding
    assert report.loaded == names(target.params)
    assert report.initialized == [] and report.unused == []
    assert report.optimizer == "initialized"
    assert report.source == os.path.join(workdir, "checkpoints") and report.step == SOURCE_STEPS


def nodes(tree, kind):
    """The sub-states of type `kind` (e.g. optax.ScaleByAdamState) of an optimizer state."""
    is_kind = lambda node: isinstance(node, kind)  # noqa: E731
    return [node for node in jax.tree.leaves(tree, is_leaf=is_kind) if is_kind(node)]


def test_init_optimizer_copies_the_moments_but_not_the_run_counters(source, target):
    workdir, saved = source
    state, report = initialize.load_initial_state(target, workdir, init_optimizer=True)
    assert report.optimizer == "loaded"
    assert_trees_equal(state.params, saved.params)
    [adam], [saved_adam] = (
        nodes(state.opt_state, optax.ScaleByAdamState),
        nodes(saved.opt_state, optax.ScaleByAdamState),
    )
    assert_trees_equal(adam, saved_adam)
    assert int(adam.count) == SOURCE_STEPS
    assert np.abs(np.asarray(adam.mu["encoder"]["layer_0"]["output"]["kernel"])).sum() > 0
    # The schedule restarts with the new run's step 0; the divergence guard's counts are new.
    [schedule] = nodes(state.opt_state, optax.ScaleByScheduleState)
    [saved_schedule] = nodes(saved.opt_state, optax.ScaleByScheduleState)
    assert int(saved_schedule.count) == SOURCE_STEPS and int(schedule.count) == 0
    for guard, fresh in zip(
        nodes(state.opt_state, optax.ApplyIfFiniteState),
        nodes(target.opt_state, optax.ApplyIfFiniteState),
        strict=True,
    ):
        assert_trees_equal(guard._replace(inner_state=()), fresh._replace(inner_state=()))
    assert int(state.step) == 0


def test_every_path_form_names_the_same_step(source, tmp_path):
    workdir, _ = source
    directory = os.path.join(workdir, "checkpoints")
    for path in (workdir, directory, directory + "/", os.path.join(directory, str(SOURCE_STEPS))):
        assert initialize.resolve_checkpoint(path) == (directory, SOURCE_STEPS)
    with pytest.raises(ConfigError, match=r"'/nonexistent/run' does not exist; set train\.init"):
        initialize.resolve_checkpoint("/nonexistent/run")
    with pytest.raises(ConfigError, match="is a URL; mount the bucket"):
        initialize.resolve_checkpoint("gs://bucket/run")
    with pytest.raises(WorkdirError, match=r"step 99 is not a finished .* \(finished: \[3\]\)"):
        initialize.resolve_checkpoint(os.path.join(directory, "99"))
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    (tmp_path / "empty" / "checkpoints" / "5.orbax-checkpoint-tmp-1").mkdir()
    with pytest.raises(WorkdirError, match="holds no finished checkpoint step; train the source"):
        initialize.resolve_checkpoint(str(tmp_path / "empty"))
    (tmp_path / "other" / "0" / "data").mkdir(parents=True)
    with pytest.raises(WorkdirError, match="has no 'state' item; it is not an mlm checkpoint"):
        initialize.load_initial_state(
            fresh_state(tiny_config()), str(tmp_path / "other"), init_optimizer=False
        )


def test_nsp_head_is_initialized_from_a_source_without_it(source):
    workdir, saved = source
    nsp_target = fresh_state(tiny_config(use_next_sentence_label=True))
    state, report = initialize.load_initial_state(nsp_target, workdir, init_optimizer=False)
    nsp_names = [name for name in names(nsp_target.params) if name.startswith("nsp_head/")]
    assert nsp_names and report.initialized == nsp_names
    assert report.loaded == names(saved.params) and report.unused == []
    assert_trees_equal(state.params["nsp_head"], nsp_target.params["nsp_head"])
    assert_trees_equal(state.params["encoder"], saved.params["encoder"])
    assert_trees_equal(state.params["mlm_head"], saved.params["mlm_head"])
    with pytest.raises(ConfigError, match=r"optimizer state .*set train\.init_optimizer=False"):
        initialize.load_initial_state(nsp_target, workdir, init_optimizer=True)


def test_source_nsp_head_is_reported_unused(tmp_path, target):
    nsp_source = fresh_state(tiny_config(use_next_sentence_label=True), seed=3)
    save_state(str(tmp_path / "checkpoints"), nsp_source, 12)
    state, report = initialize.load_initial_state(target, str(tmp_path), init_optimizer=False)
    assert report.step == 12
    assert report.unused == [n for n in names(nsp_source.params) if n.startswith("nsp_head/")]
    assert report.loaded == names(target.params) and report.initialized == []
    expected = {k: v for k, v in nsp_source.params.items() if k != "nsp_head"}
    assert_trees_equal(state.params, expected)
    table = report.format_report()
    assert "nsp_head/pooler/kernel" in table and "unused" in table


def test_a_different_model_size_is_refused_naming_the_parameter(source):
    workdir, _ = source
    wider = tiny_config()
    wider.model.update(hidden_size=48, intermediate_size=96)
    with pytest.raises(
        ConfigError,
        match=r"parameter 'encoder/embeddings_layer_norm/bias' has shape \(32,\) in checkpoint "
        r"'.*' step 3 but \(48,\) in this model: checkpoint from a different model size",
    ) as error:
        initialize.load_initial_state(fresh_state(wider), workdir, init_optimizer=False)
    assert "\n" not in str(error.value)


def test_report_lists_every_name_once(source, tmp_path):
    workdir, _ = source
    nsp_target = fresh_state(tiny_config(use_next_sentence_label=True))
    _, report = initialize.load_initial_state(nsp_target, workdir, init_optimizer=False)
    lines = report.format_report().splitlines()
    assert lines[0].startswith(f"initialized from {workdir}/checkpoints step {SOURCE_STEPS}: ")
    assert lines[1].split() == ["parameter", "status", "shape"]
    rows = [line.split(maxsplit=2) for line in lines[2:]]
    listed = [row[0] for row in rows]
    assert sorted(listed) == listed == names(nsp_target.params)
    assert {row[1] for row in rows} == {"loaded", "initialized"}
    shapes = dict(
        ("/".join(str(k.key) for k in path), str(leaf.shape))
        for path, leaf in jax.tree_util.tree_flatten_with_path(nsp_target.params)[0]
    )
    assert all(row[2] == shapes[row[0]] for row in rows)
    path = initialize.write_report(report, str(tmp_path))
    assert path == str(tmp_path / "init_report.txt")
    with open(path) as file:
        assert file.read() == report.format_report()


def test_a_source_run_with_another_vocab_is_refused(source, tmp_path):
    workdir, _ = source
    directory, _ = initialize.resolve_checkpoint(workdir)
    with open(os.path.join(workdir, "vocab.txt")) as file:
        vocab = file.read()
    (tmp_path / "vocab.txt").write_text(vocab)
    initialize.check_vocab(directory, str(tmp_path))
    (tmp_path / "vocab.txt").write_text(vocab + "extra\n")
    with pytest.raises(ConfigError, match=r"another vocab .*set data\.vocab_file="):
        initialize.check_vocab(directory, str(tmp_path))
