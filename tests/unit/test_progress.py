"""The console progress line: step/total, terms, images/s and ETA."""

from __future__ import annotations

import pytest

from pipeline.train.progress import Progress, format_duration, format_progress


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (-3, "0s"),
        (45.9, "45s"),
        (60, "1m00s"),
        (192, "3m12s"),
        (3_599, "59m59s"),
        (3_600 + 5 * 60 + 59, "1h05m"),
        (86_400 * 3 + 3_600 * 4 + 59, "3d04h"),
    ],
)
def test_durations(seconds, text):
    assert format_duration(seconds) == text


def test_line_shows_step_of_total_terms_rate_and_eta():
    line = format_progress(120, 400, {"loss": 0.123456, "kl": 1234.5}, 85.31, 192.4)
    assert line == "step 120/400  loss 0.1235  kl 1234  85.3 img/s  ETA 3m12s"
    assert format_progress(1, 10, {}, 2.0, None) == "step 1/10  2.0 img/s  ETA -"


def test_eta_is_the_remaining_steps_at_the_mean_step_time_since_start():
    now = [100.0]
    progress = Progress(start_step=20, total=400, clock=lambda: now[0])
    assert progress.eta_s(20) is None  # nothing done yet in this process
    now[0] += 50.0  # 100 steps in 50 s: 0.5 s a step, 280 steps to go
    assert progress.eta_s(120) == pytest.approx(140.0)
    assert progress.line(120, {"loss": 0.5}, 10.0).endswith("10.0 img/s  ETA 2m20s")
    assert progress.eta_s(400) == 0.0
