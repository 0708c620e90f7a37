"""One process of a CPU run on 127.0.0.1 (started by tests/test_parallel.py).

Usage: python multihost_worker.py MODE NUM_PROCESSES DEVICES PORT PROCESS_ID CONFIG WORKDIR OUT
MODE `inputs`: reports this process's eval chunks and the global sum of a train batch.
MODE `train`: runs `train_and_evaluate` and reports its results.
NUM_PROCESSES > 1 joins a `jax.distributed` run; DEVICES is the CPU devices of this process.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={sys.argv[3]}"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mlm import config as config_lib  # noqa: E402
from mlm import distributed, parallel  # noqa: E402


def report_inputs(config, workdir):
    from jax.experimental import multihost_utils

    from mlm.data.inputs import build_inputs

    os.makedirs(workdir, exist_ok=True)

    inputs = build_inputs(
        config, workdir, shard_index=jax.process_index(), shard_count=jax.process_count()
    )
    chunks = []
    for batch in inputs.eval:
        for ids, segments, positions, labels, weights in zip(
            batch["input_word_ids"],
            batch["packed_segment_ids"],
            batch["masked_lm_positions"],
            batch["masked_lm_ids"],
            batch["masked_lm_weights"],
            strict=True,
        ):
            ids = ids.copy()
            used = weights > 0
            ids[positions[used]] = labels[used]
            for segment in range(1, int(segments.max()) + 1):
                chunks.append(ids[segments == segment].tolist())
    local = next(iter(inputs.train))
    mesh = parallel.make_mesh()
    global_ids = parallel.global_batch(local, mesh)["input_word_ids"]
    total = int(jax.jit(lambda x: x.sum())(global_ids))
    gathered = multihost_utils.process_allgather(local["input_word_ids"])
    return {
        "chunks": chunks,
        "global_shape": list(global_ids.shape),
        "global_sum": total,
        "local_sums": [int(x.sum()) for x in np.asarray(gathered)],
        "num_devices": jax.device_count(),
    }


def main():
    mode, num_processes, _, port, process_id, config_json, workdir, out = sys.argv[1:]
    if int(num_processes) > 1:
        # What launch/local.sh sets; mlm.train's command line makes the same call.
        os.environ.update(
            MLM_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            MLM_NUM_PROCESSES=num_processes,
            MLM_PROCESS_ID=process_id,
        )
        distributed.initialize_from_environment()
    with open(config_json) as file:
        config = config_lib.from_json(file.read())
    if mode == "inputs":
        result = report_inputs(config, workdir)
    else:
        from mlm.train import train_and_evaluate

        result = train_and_evaluate(config, workdir)
    with open(out, "w") as file:
        json.dump(result, file)
    if int(num_processes) > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
