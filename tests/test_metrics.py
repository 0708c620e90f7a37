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
