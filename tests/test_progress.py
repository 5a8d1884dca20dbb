"""Console progress: bar formatting, the driver's console thread and rank 0's poster. The CLI
under a real pseudo-terminal is tested with the guide's full-configuration run
(tests/test_original_guide.py)."""

from __future__ import annotations

import io
import re
import sys

from controlnet_ray import progress
from controlnet_ray.epoch_lines import EpochLines
from controlnet_ray.progress import (
    ConsoleProgress,
    ProgressBoard,
    StepProgress,
    WorkerProgress,
    bar_stream,
    format_bar,
    format_duration,
    format_epoch_line,
    format_steps,
)

EPOCH = {
    "epoch": 2,
    "epochs": 4,
    "first_epoch": 1,
    "train_loss": 0.5,
    "train_image_loss": 0.4,
    "train_pose_loss": 1.0,
    "val_loss": 0.45,
    "val_psnr": 14.25,
    "val_ssim": 0.31,
    "val_pose_mae_deg": 12.5,
    "samples_per_sec": 30.0,
    "epoch_time_s": 10.0,
    "elapsed_s": 20.0,
}
STEP = {
    "epoch": 2,
    "epochs": 4,
    "phase": "train",
    "step": 3,
    "total": 12,
    "loss": 0.4321,
    "samples_per_sec": 25.0,
    "elapsed_s": 3.0,
}


def test_epoch_line_eta_counts_only_epochs_run_here():
    line = format_epoch_line({**EPOCH, "first_epoch": 2, "elapsed_s": 10.0})
    assert line.startswith("epoch 2/4") and "PSNR 14.25 dB" in line
    assert line.endswith("ETA 20s")  # 10 s for the one epoch run here, two left
    face = format_epoch_line({**EPOCH, "val_psnr_face": 18.214})
    assert "PSNR 14.25 dB (face 18.21)  SSIM" in face


def test_bar_shows_position_loss_rate_and_epoch_eta():
    bar = format_bar(STEP, width=120)
    assert bar.startswith("epoch 2/4 train [")
    assert " 3/12 " in bar and "loss 0.4321" in bar and "25.0 samples/s" in bar
    assert bar.endswith("epoch ETA 9s")  # 1 s a step, 9 steps left
    cells = re.search(r"\[([#-]+)\]", bar).group(1)
    assert cells.count("#") == round(len(cells) * 3 / 12)


def test_bar_fits_the_terminal_width():
    assert len(format_bar(STEP, width=40)) == 40
    assert format_bar({**STEP, "step": 12}, width=200).count("-") == 0


def test_board_drains_once_and_a_posted_line_ends_the_bar():
    board = ProgressBoard()
    board.step(STEP)
    assert board.drain() == ([], STEP)
    board.post("epoch", EPOCH)
    assert board.drain() == ([("epoch", EPOCH)], None)
    assert board.drain() == ([], None)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_console_redraws_bar_in_place_and_clears_it_before_lines():
    feed = [([], STEP), ([("message", "hello")], {**STEP, "step": 4}), ([("epoch", EPOCH)], None)]
    lines, bar = io.StringIO(), _Tty()
    console = ConsoleProgress(lambda: feed.pop(0) if feed else ([], None), lines, bar)
    console.poll_once()
    assert bar.getvalue().startswith("\repoch 2/4 train [") and " 3/12 " in bar.getvalue()
    console.poll_once()
    assert lines.getvalue() == "hello\n"
    assert "\r\x1b[K" in bar.getvalue() and " 4/12 " in bar.getvalue()
    console.close()  # drains the epoch event, leaves the terminal line clean
    assert lines.getvalue().splitlines()[1] == format_epoch_line(EPOCH)
    assert bar.getvalue().endswith("\r\x1b[K")


def test_console_without_terminal_prints_lines_only():
    lines = io.StringIO()
    console = ConsoleProgress(lambda: ([("message", "m")], STEP), lines, None)
    console.poll_once()
    assert lines.getvalue() == "m\n"


def test_console_survives_a_dead_board():
    def dead():
        raise RuntimeError("actor died")

    lines = io.StringIO()
    ConsoleProgress(dead, lines, _Tty()).poll_once()
    assert lines.getvalue() == ""


def test_bar_stream_follows_mode_and_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert bar_stream("auto") is None and bar_stream("lines") is None
    assert bar_stream("bar") is sys.stderr
    monkeypatch.setattr(sys, "stdout", _Tty())
    assert bar_stream("auto") is sys.stdout and bar_stream("lines") is None


class _RecordingBoard:
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.post = self._method("post")
        self.step = self._method("step")

    def _method(self, name: str):
        board = self

        class _Remote:
            @staticmethod
            def remote(*args):
                board.calls.append((name, *args))

        return _Remote()


def test_worker_progress_posts_from_rank_0_only_and_throttles_steps(monkeypatch):
    board = _RecordingBoard()
    other = WorkerProgress(board, rank=1)
    other.message("not me")
    assert not other.due(last=True) and board.calls == []
    p = WorkerProgress(board, rank=0)
    clock = iter([100.0, 100.1, 100.2, 101.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    assert p.due()  # first step
    assert not p.due()  # 0.1 s later
    assert p.due(last=True)  # the last step always goes
    assert p.due()  # POST_INTERVAL_S later
    p.message("hi")
    p.step(STEP)
    assert board.calls == [("post", "message", "hi"), ("step", STEP)]


def test_worker_progress_without_board_prints_itself(capfd):
    p = WorkerProgress(None, rank=0)
    assert not p.due(last=True)
    p.message("resumed from somewhere")
    assert capfd.readouterr().out == "resumed from somewhere\n"


def test_epoch_lines_callback_posts_epochs_only(capsys):
    board = _RecordingBoard()
    EpochLines(board).after_report(None, [EPOCH, EPOCH], checkpoint=None)
    EpochLines(board).after_report(None, [{"epoch": 1}], checkpoint=None)  # not an epoch report
    assert board.calls == [("post", "epoch", EPOCH)]
    EpochLines(None).after_report(None, [EPOCH], checkpoint=None)  # Tune: print in place
    assert capsys.readouterr().out == format_epoch_line(EPOCH) + "\n"


# ------------------------------------------------------------------ a driver-side step loop


class _Clock:
    """A hand-moved clock: the tests decide when time passes (no sleeps)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_durations_and_step_line_read_at_a_glance():
    assert [format_duration(s) for s in (4.6, 65, 3725)] == ["5s", "1m05s", "1h02m"]
    line = format_steps("pose judge", 120, 540, 40.0, 140.0, 0.01234)
    assert line.startswith("pose judge [####----------------] 120/540 steps  loss 0.0123")
    assert line.endswith("elapsed 40s  ETA 2m20s")


def test_step_progress_in_a_log_prints_a_line_every_half_minute_not_frames(monkeypatch):
    """Without a terminal (a log file): the first line after a few seconds, then one per
    LOG_LINE_INTERVAL_S however many steps, and a last line; no carriage returns. The ETA
    leaves out the first step's start-up (here 20 s)."""
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    log, clock = io.StringIO(), _Clock()
    bar = StepProgress("identity judge", 1000, "auto", log, clock)
    for step in range(1, 1001):
        clock.now += 20.0 if step == 1 else 0.125  # 144.875 s in all
        bar(step, 0.5)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and sys.stderr.getvalue() == ""
    assert len(lines) == 5  # at 5 s after the first step, then 30 s apart, and the end
    assert lines[0].startswith("identity judge [") and " 41/1000 steps" in lines[0]
    assert lines[0].endswith("elapsed 25s  ETA 2m00s") and " 281/1000 " in lines[1]
    assert lines[-1] == "identity judge: 1000 steps in 2m25s, loss 0.5000"


def test_step_progress_on_a_terminal_redraws_in_place_and_ends_with_a_line(monkeypatch):
    tty, log, clock = _Tty(), io.StringIO(), _Clock()
    monkeypatch.setattr(sys, "stderr", tty)
    bar = StepProgress("pose judge", 40, "auto", log, clock)
    for step in range(1, 41):
        clock.now += 0.25
        bar(step, 0.1)
    frames = tty.getvalue().split("\r")[1:]
    assert len(frames) == 20 and frames[0].startswith("pose judge [") and frames[-1] == "\x1b[K"
    assert log.getvalue() == "pose judge: 40 steps in 10s, loss 0.1000\n"
    StepProgress("pose judge", 40, "lines", log, clock)(40, 0.1)  # --progress lines: no bar
    assert tty.getvalue().count("\r") == 20  # unchanged


def test_judged_figures_read_identity_beside_copying_the_source_and_name_their_counts():
    m = {
        "judged_yaw_err_deg": 6.0, "judge_floor_yaw_deg": 3.0, "judged_pitch_err_deg": 4.0,
        "judge_floor_pitch_deg": 2.0, "face_margin_db": 1.5, "id_top1": 0.81,
        "id_chance": 1 / 6, "sharpness": 0.7,
    }  # fmt: skip
    assert "identity top-1 81% (chance 17%)" in progress.format_judged(m)
    line = progress.format_judged({**m, "id_top1_source": 0.76, "judged_persons": 3.0,
                                   "judged_pairs": 48.0})  # fmt: skip
    assert "identity top-1 81% (copying the source 76%, chance 17%)" in line
    assert line.endswith("; on 3 persons, 48 pairs")
    one = progress.format_judged({**m, "judged_persons": 1.0, "judged_pairs": 8.0})
    assert one.endswith("; on 1 person, 8 pairs")
