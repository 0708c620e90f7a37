"""`Experiment`: everything a config determines about a run, built in one place.

Training, evaluation, `mlm.fill_mask`, `mlm.convert`, `mlm.bench` and `mlm.aot` all build the
model, optimizer, schedule, abstract state, shardings and jitted steps through
`Experiment.build`, so they run (or compile) the same program for the same config.

Usage:
  experiment = Experiment.build(config, parallel.make_mesh(config.mesh))
  state = experiment.init_state()
  state, logs = experiment.train_step(state, parallel.global_batch(batch, experiment.mesh))
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mlm import checkpoint, loss_scale, parallel, privacy, task
from mlm.optim import create_optimizer, learning_rate_schedule


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A config's model, optimizer, state layout and compiled-on-first-call steps.

    Attributes:
      config: the validated config it was built from.
      mesh: the device mesh the steps run on (its platform picks `model.kernels=auto`).
      model: the flax module, with the kernel set for the mesh's platform.
      tx: the optimizer (`mlm.optim.create_optimizer`).
      schedule: the learning-rate schedule, step -> rate.
      init_fn: rng -> TaskState, unjitted (for `jax.eval_shape` or your own jit).
      abstract: the train state's `jax.ShapeDtypeStruct`s.
      shardings: the train state's NamedShardings over `mesh`.
      batch_sharding: the sharding of every batch array.
      train_step: jitted `task.train_step` (state donated): (state, batch) -> (state, logs).
      eval_step: jitted `task.eval_step`: (params, batch) -> metric sums.
      inference_step: jitted `task.inference_step`: (params, batch) -> predictions.
    """

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    model: nn.Module
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    init_fn: Any
    abstract: task.TaskState
    shardings: Any
    batch_sharding: jax.sharding.NamedSharding
    train_step: Any
    eval_step: Any
    inference_step: Any

    @classmethod
    def build(
        cls, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None
    ) -> Experiment:
        """Builds the experiment of a validated config.

        Args:
          config: a validated config (`mlm.config.validate`).
          mesh: the devices to run on; None: a one-device mesh on the first local device
            (readers such as `mlm.fill_mask` and `mlm.convert`, whatever mesh the run trained on).

        Returns:
          The Experiment. Nothing is compiled until a step is first called or lowered.
        """
        if mesh is None:
            mesh = parallel.make_mesh(None, devices=jax.local_devices()[:1])
        model = task.build_model(config, mesh)
        tx = create_optimizer(config.optimizer, config.train.num_steps)
        schedule = learning_rate_schedule(config.optimizer, config.train.num_steps)
        init_fn = task.state_initializer(config, model, tx)
        abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
        replicated = parallel.replicated_sharding(mesh)
        shardings = parallel.state_shardings(abstract, mesh, config.mesh.fsdp_min_size)
        batch_sharding = parallel.batch_sharding(mesh)
        train_step = jax.jit(
            functools.partial(
                task.train_step,
                model=model,
                tx=tx,
                schedule=schedule,
                grad_accum_steps=config.optimizer.grad_accum_steps,
                dp=privacy.from_config(config),
                ema_decay=config.optimizer.ema_decay,
                loss_scale_growth_steps=loss_scale.growth_steps(config.optimizer),
            ),
            in_shardings=(shardings, batch_sharding),
            out_shardings=(shardings, replicated),
            donate_argnums=0,
        )
        eval_step = jax.jit(
            functools.partial(task.eval_step, model=model),
            in_shardings=(shardings.params, batch_sharding),
            out_shardings=replicated,
        )
        inference_step = jax.jit(functools.partial(task.inference_step, model=model))
        return cls(
            config=config,
            mesh=mesh,
            model=model,
            tx=tx,
            schedule=schedule,
            init_fn=init_fn,
            abstract=abstract,
            shardings=shardings,
            batch_sharding=batch_sharding,
            train_step=train_step,
            eval_step=eval_step,
            inference_step=inference_step,
        )

    def init_state(self, seed: int | None = None) -> task.TaskState:
        """A new train state, created already sharded over the mesh.

        Args:
          seed: the init seed; None: `train.seed`.

        Returns:
          The TaskState at step 0.
        """
        seed = self.config.train.seed if seed is None else seed
        init = jax.jit(self.init_fn, out_shardings=self.shardings)
        return init(jax.random.PRNGKey(seed))

    def state_from_params(self, params: Any) -> task.TaskState:
        """The state training would start from with these params (step 0, fresh optimizer).

        Args:
          params: a params tree with the shapes of `abstract.params` (arrays or numpy).

        Returns:
          The TaskState (placed by JAX's defaults; restore or save it as any other).
        """
        return task.new_state(
            jax.tree.map(jnp.asarray, params),
            jax.random.PRNGKey(self.config.train.seed),
            tx=self.tx,
            **task.state_options(self.config),
        )

    def restore_target(self) -> task.TaskState:
        """The abstract state with its shardings: what `mlm.checkpoint` restores into."""
        return checkpoint.abstract_with_shardings(self.abstract, self.shardings)
