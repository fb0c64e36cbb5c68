"""Progress (shapkern/progress.py), as training epochs and dataset explanations report it: a plain line
in a redirected log with the rate, the time left and the caller's fields; nothing when disabled."""

import re

from shapkern.progress import Progress, duration


def test_a_redirected_log_gets_plain_lines_with_rate_time_left_and_fields(capsys):
    progress = Progress(4, "epoch 1/2", unit="batch", every_s=0.0)
    progress.update(postfix=lambda: {"loss": "0.500"})
    progress.update(3)
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"epoch 1/2: 1/4 batches, \S+ batches/s, \S+ left, loss 0\.500", lines[0]), lines
    assert re.fullmatch(r"epoch 1/2: 4/4 batches, \S+ batches/s, 0s left", lines[1]), lines
    assert "\r" not in "".join(lines)


def test_fields_are_read_only_when_shown_and_nothing_shows_when_disabled(capsys):
    reads = []
    quiet = Progress(3, "explain", unit="image", every_s=3600.0)
    quiet.update(postfix=lambda: reads.append(1) or {})
    off = Progress(3, "explain", unit="image", enabled=False, every_s=0.0)
    off.update(2, postfix=lambda: reads.append(1) or {})
    assert reads == [] and capsys.readouterr().out == ""


def test_durations_read_as_hours_minutes_seconds():
    assert [duration(s) for s in (3.4, 123, 3723)] == ["3s", "2m03s", "1h02m03s"]
