"""The TPU memory and FLOP table of docs/accelerators.md, measured with `python -m mlm.aot`.

Each row is one `mlm.aot` run (a subprocess) on this CPU host; its JSON line is appended to
OUT (JSON lines; rows already there are not run again, so the script can be stopped and
resumed). `--table` prints the Markdown table from OUT.

Run:
  python benchmarks/aot_table.py --out aot_table.jsonl            # all rows (hours on 2 cores)
  python benchmarks/aot_table.py --out aot_table.jsonl --shard 1/2  # every other job
  python benchmarks/aot_table.py --out aot_table.jsonl --table    # the table
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys

GIB = 2**30
CONFIGS = {
    "bert_base": "configs/bert_base.py",
    "bert_large": "configs/bert_large.py",
    "modernbert_base": "configs/modernbert_base.py",
}
TOPOLOGIES = ("v5e-8", "v4-8", "v5p-8")
CHIPS = {"v5e-8": 8, "v4-8": 4, "v5p-8": 4}


def row_key(model: str, seq: int, batch: int, topology: str, fsdp: bool, remat: str) -> str:
    return f"{model}/{seq}/{batch}/{topology}/{'fsdp' if fsdp else 'dp'}/{remat}"


def load(path: str) -> dict[str, dict]:
    rows = {}
    if os.path.exists(path):
        with open(path) as file:
            for line in file:
                record = json.loads(line)
                rows[record["key"]] = record
    return rows


def compile_row(
    out: str, rows: dict, model: str, seq: int, batch: int, topology: str, fsdp: bool, remat: str
) -> dict:
    """Runs `mlm.aot` for one row (or returns the row already in OUT)."""
    key = row_key(model, seq, batch, topology, fsdp, remat)
    if key in rows:
        return rows[key]
    command = [
        sys.executable,
        "-m",
        "mlm.aot",
        "--config",
        CONFIGS[model],
        "--topology",
        topology,
        f"--config.train.global_batch_size={batch}",
        f"--config.data.seq_length={seq}",
        f"--config.model.remat={remat}",
    ]
    if model == "modernbert_base":  # The config's 320 (30%) at 1024, scaled to the length.
        command.append(f"--config.data.max_predictions_per_seq={seq * 320 // 1024}")
    elif seq == 512:
        command.append("--config.data.max_predictions_per_seq=80")
    if fsdp:
        command += ["--config.mesh.data=1", f"--config.mesh.fsdp={CHIPS[topology]}"]
    print(f"{key}: compiling...", file=sys.stderr, flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    if result.returncode not in (0, 1) or not lines:
        raise RuntimeError(f"{key}: mlm.aot failed: {result.stderr[-2000:]}")
    record = {"key": key, "model": model, **json.loads(lines[-1])}
    with open(out, "a") as file:
        file.write(json.dumps(record) + "\n")
    rows[key] = record
    print(
        f"{key}: {record['hbm_bytes_per_chip'] / GIB:.2f} GiB, fits {record['fits']}",
        file=sys.stderr,
        flush=True,
    )
    return record


def largest_fitting(
    out: str, rows: dict, model: str, seq: int, topology: str, fsdp: bool, remat: str, start: int
) -> int | None:
    """The largest power-of-two global batch that fits, from `start` down (or up while it fits).

    The next batch tried is the power of two that the last row's HBM figure predicts (memory
    grows about linearly with the batch), checked by compiling it.
    """
    chips = CHIPS[topology]
    batch = start
    fitting, failing = None, None
    while True:
        record = compile_row(out, rows, model, seq, batch, topology, fsdp, remat)
        if record["fits"]:
            fitting = batch if fitting is None else max(fitting, batch)
        else:
            failing = batch if failing is None else min(failing, batch)
        if fitting is not None and failing is not None and failing == 2 * fitting:
            return fitting
        ratio = record["hbm_capacity_bytes"] / record["hbm_bytes_per_chip"]
        guess = 2 ** math.floor(math.log2(max(batch * ratio, chips)))
        if record["fits"]:
            guess = max(guess, 2 * batch)
            if failing is not None:
                guess = min(guess, failing // 2)
        else:
            guess = min(guess, batch // 2)
            if fitting is not None:
                guess = max(guess, 2 * fitting)
        if guess < chips:
            return fitting
        if guess == batch:
            return fitting
        batch = guess


def jobs(out: str, rows: dict) -> list:
    """The table's work as independent jobs (one row, or one largest-batch search), in order."""
    work = []

    def row(model: str, seq: int, topology: str, fsdp: bool) -> None:
        args = (out, rows, model, seq, 256, topology, fsdp, "none")
        work.append(lambda: compile_row(*args))

    def search(topology: str, fsdp: bool, remat: str, start: int) -> None:
        args = (out, rows, "bert_large", 512, topology, fsdp, remat, start)
        work.append(lambda: print(f"largest batch {args[2:-1]}: {largest_fitting(*args)}"))

    for model in ("bert_base", "bert_large"):
        for topology in TOPOLOGIES:
            for fsdp in (False, True):
                row(model, 128, topology, fsdp)
    for topology in TOPOLOGIES:
        for fsdp in (False, True):
            row("bert_base", 512, topology, fsdp)
    # ModernBERT-base beside bert_base at seq 512, then at its own seq 1024: as many tokens, the
    # batch that fits, and recomputation.
    for seq, batch, remat in (
        (512, 256, "none"),
        (1024, 128, "none"),
        (1024, 64, "none"),
        (1024, 128, "full"),
    ):
        args = (out, rows, "modernbert_base", seq, batch, "v5e-8", False, remat)
        work.append(functools.partial(compile_row, *args))
    search("v5e-8", False, "none", 64)
    search("v5e-8", False, "full", 64)
    search("v5p-8", False, "none", 256)
    for topology in TOPOLOGIES:
        for fsdp in (False, True):
            if (topology, fsdp) not in (("v5p-8", False), ("v5e-8", False)):
                search(topology, fsdp, "none", 256)
    return work


def run_all(out: str, shard: int, shards: int) -> None:
    """Runs every `shards`-th job from `shard` (several processes can share OUT)."""
    for index, job in enumerate(jobs(out, load(out))):
        if index % shards == shard:
            job()


def table(out: str) -> str:
    lines = [
        "| model | seq | global batch | topology | mesh | remat | HBM / chip (GiB) | fits | "
        "XLA TFLOP / chip | model TFLOP / chip | XLA / model | compile (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def order(record: dict) -> tuple:
        return (
            record["seq_length"],
            record["model"],
            TOPOLOGIES.index(record["topology"]),
            record["mesh"]["fsdp"],
            record["remat"],
            record["global_batch_size"],
        )

    for record in sorted(load(out).values(), key=order):
        mesh = "x".join(f"{axis}={size}" for axis, size in record["mesh"].items())
        xla = record.get("xla_flops_per_chip")
        lines.append(
            f"| {record['model']} | {record['seq_length']} | {record['global_batch_size']} | "
            f"{record['topology']} | {mesh} | {record['remat']} | "
            f"{record['hbm_bytes_per_chip'] / GIB:.2f} | {'yes' if record['fits'] else 'no'} | "
            + (f"{xla / 1e12:.2f}" if xla else "-")
            + f" | {record['model_flops_per_chip'] / 1e12:.2f} | "
            + (f"{record['flops_ratio']:.3f}" if xla else "-")
            + f" | {record['compile_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON lines of the rows")
    parser.add_argument("--table", action="store_true", help="print the table and stop")
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th job from the i-th")
    args = parser.parse_args()
    if args.table:
        print(table(args.out))
    else:
        shard, shards = (int(part) for part in args.shard.split("/"))
        run_all(args.out, shard, shards)


if __name__ == "__main__":
    main()
