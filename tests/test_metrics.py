"""mlm.metrics: the console progress (a bar on a terminal, plain lines elsewhere)."""

import io

from mlm.metrics import ConsoleProgress, format_progress_line

METRICS = {"loss": 5.12345, "masked_lm_accuracy": 0.1234, "learning_rate": 1e-4}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_progress_line_says_step_loss_accuracy_rate_speed_and_times():
    line = format_progress_line(40, 2000, dict(METRICS, tokens_per_s=3184.4), 65, 3130)
    assert line == (
        "step 40/2000: loss 5.1235, accuracy 0.123, lr 0.0001, 3,184 tokens/s, "
        "elapsed 0:01:05, remaining 0:52:10"
    )
    # Before a speed is measured (the first interval), no tokens/s and no estimate.
    assert format_progress_line(1, 10, METRICS, 7.4, None) == (
        "step 1/10: loss 5.1235, accuracy 0.123, lr 0.0001, elapsed 0:00:07"
    )


def test_off_a_terminal_each_interval_is_one_plain_line():
    stream = io.StringIO()
    progress = ConsoleProgress(0, 4, stream=stream)
    for step in range(1, 5):
        progress.advance(step)
        if step % 2 == 0:
            progress.log(step, METRICS)
    progress.write("eval step 4: {'masked_lm_accuracy': 0.1}")
    progress.close()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert [line.split(":")[0] for line in lines] == ["step 2/4", "step 4/4", "eval step 4"]
    assert "remaining 0:00:00" in lines[1]


def test_on_a_terminal_messages_never_share_the_bars_line():
    stream = Terminal()
    progress = ConsoleProgress(0, 4, stream=stream)
    progress.advance(1)
    progress.log(1, METRICS)
    progress.write("eval step 1: {}")
    progress.close()
    text = stream.getvalue()
    assert "\r" in text  # The bar redraws in place.
    assert "\neval step 1: {}\n" in text.replace("\r", "\n")
    assert "eval step 1: {}" in text.splitlines()  # A line of its own.


def test_tensorboard_reads_the_scalars_the_json_lines_hold(tmp_path):
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mlm.metrics import MetricWriter

    writer = MetricWriter(str(tmp_path))
    for step, loss in ((4, 8.921), (8, 8.3407)):
        writer.write("metrics", {"step": step, "loss": loss, "masked_lm_accuracy": step / 100})
    writer.write("eval_metrics", {"step": 8, "validation_loss": 8.2})
    writer.close()
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = {
        tag: [(event.step, round(event.value, 4)) for event in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }
    assert scalars["train/loss"] == [(r["step"], r["loss"]) for r in logged]
    assert scalars["train/masked_lm_accuracy"] == [(4, 0.04), (8, 0.08)]
    assert scalars["eval/validation_loss"] == [(8, 8.2)]


def test_two_writers_made_within_one_second_keep_both_event_files(tmp_path, monkeypatch):
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mlm.metrics import MetricWriter

    # tensorboardX names its file by the second: an eval (a reader), then the run resumed
    # from the same step, both within one second.
    monkeypatch.setattr(time, "time", lambda: 1_796_000_000.25)
    reader = MetricWriter(str(tmp_path), start_step=None)
    reader.write("eval_metrics", {"step": 8, "validation_loss": 8.2})
    reader.close()
    resumed = MetricWriter(str(tmp_path), start_step=8)
    for step, loss in ((12, 8.0), (16, 7.5)):
        resumed.write("metrics", {"step": step, "loss": loss})
    resumed.close()
    monkeypatch.undo()
    assert len(list((tmp_path / "tensorboard").iterdir())) == 2
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("eval/validation_loss")] == [
        (8, 8.2)
    ]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(12, 8.0), (16, 7.5)]


def test_writing_tensorboard_events_does_not_import_torch(tmp_path):
    # torch is installed here (the interop extra); tensorboardX would import it (2 s) to accept
    # torch tensors. A fresh process, so that no other test has imported torch already.
    import subprocess
    import sys

    script = (
        "import sys\n"
        "import mlm.train\n"
        "from mlm.metrics import MetricWriter\n"
        "assert 'tensorboardX' not in sys.modules\n"
        f"writer = MetricWriter({str(tmp_path)!r})\n"
        "writer.write('metrics', {'step': 1, 'loss': 2.5})\n"
        "writer.close()\n"
        "assert 'tensorboardX' in sys.modules and 'torch' not in sys.modules\n"
        "import torch\n"
        "print(torch.ones(2).sum().item())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["2.0"]  # torch itself still imports afterwards.
    assert list((tmp_path / "tensorboard").iterdir())


def wandb_records(path) -> list:
    """The records of a W&B run file (`run-ID.wandb`): W&B's 7-byte header, then LevelDB's log
    format (32 KiB blocks of chunks: crc32 uint32, length uint16, type uint8; 1 full, 2 first,
    3 middle, 4 last), each record a `wandb_internal_pb2.Record`, as `wandb sync` reads it."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, position = [], b"", 7
    while position + 7 <= len(data):
        left_in_block = 32768 - position % 32768
        if left_in_block < 7:
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:
            break
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(path) -> list[dict]:
    """The logged rows of a W&B run file: {key: value} with `_step`, W&B's own keys dropped."""
    import json

    rows = []
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            items = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            rows.append({k: v for k, v in items.items() if k == "_step" or not k.startswith("_")})
    return rows


def test_wandb_gets_the_same_scalars_and_a_resumed_run_continues_its_run(tmp_path, monkeypatch):
    import json
    import re

    from mlm import config as config_lib
    from mlm.metrics import MetricWriter, start_wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = config_lib.base_config()
    config.train.update(wandb_project="mlm-test", wandb_run_name="tiny", num_steps=8)
    workdir = str(tmp_path)
    for steps in ((2, 4), (6, 8)):  # A run, then the same workdir resumed from step 4.
        writer = MetricWriter(
            workdir, start_step=steps[0] - 2, wandb_run=start_wandb(config, workdir)
        )
        for step in steps:
            writer.write("metrics", {"step": step, "loss": 9.0 - step / 4})
        writer.write("eval_metrics", {"step": steps[-1], "validation_loss": 8.0 - step / 8})
        writer.close()
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    # W&B names a run's folder offline-run-TIME-ID, with "-1" added when the resumed run starts
    # within the same second as the first: sorted by name, the first run comes first either way.
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    folder = re.compile(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?")
    assert len(runs) == 2 and all(folder.fullmatch(run.name) for run in runs)
    histories = [wandb_history(run / f"run-{run_id}.wandb") for run in runs]
    assert histories == [
        [
            {"train/loss": 8.5, "_step": 2},
            {"train/loss": 8.0, "eval/validation_loss": 7.5, "_step": 4},
        ],
        [
            {"train/loss": 7.5, "_step": 6},
            {"train/loss": 7.0, "eval/validation_loss": 7.0, "_step": 8},
        ],
    ]
    (run,) = [r.run for r in wandb_records(runs[0] / f"run-{run_id}.wandb") if r.HasField("run")]
    assert (run.run_id, run.project, run.display_name) == (run_id, "mlm-test", "tiny")
    sent = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert sent["train"]["num_steps"] == 8


def test_wandb_project_without_wandb_is_one_line_before_the_run(monkeypatch):
    import importlib.util

    import pytest

    from mlm import config as config_lib
    from mlm.errors import ConfigError
    from mlm.metrics import require_wandb

    config = config_lib.base_config()
    require_wandb(config)  # Off: nothing to check.
    config.train.wandb_project = "mlm-test"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "wandb" else real_find_spec(name, *args),
    )
    with pytest.raises(
        ConfigError, match=r"^train.wandb_project 'mlm-test' needs wandb; .*'\.\[wandb\]'"
    ):
        require_wandb(config)
