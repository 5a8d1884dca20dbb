"""Console progress: a board actor collects lines and step state; the driver prints them.

Why a board: Ray forwards worker and controller output line by line, each line prefixed with
the actor's name and pid, so a ``\\r`` progress bar cannot render from a worker and the
per-epoch lines come out wrapped in Ray's prefixes. Instead rank 0 posts its messages and its
in-epoch step state, and Train's controller posts each epoch's metrics once it has registered
that report and its checkpoint, to a tiny actor (no CPU reserved) owned by the driver; a thread
on the driver drains it and writes plain lines to stdout and, where a terminal is attached, a
bar to the terminal. Without a board (Tune trials) the same lines are printed where they arise.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, SupportsFloat, TextIO

POST_INTERVAL_S = 0.5  # rank 0 posts step state at most this often
POLL_INTERVAL_S = 0.5  # the driver drains the board this often
LOG_FIRST_LINE_S = 5.0  # without a terminal: a loop's first progress line (with its ETA) ...
LOG_LINE_INTERVAL_S = 30.0  # ... then one at most this often


def quiet_ray_notices() -> None:
    """Ray's ``worker_process_setup_hook`` for the run (``launcher.connection``): the process
    that runs a dataset (Ray Data's split coordinator, one per dataset) logs a WARNING that
    progress bars are off, which the run turns off on purpose (``data.pipeline``); Ray Data
    offers no setting that keeps them off without that notice. Its logger's other records
    are progress lines, which are off too."""
    import logging

    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def format_epoch_line(m: dict[str, Any]) -> str:
    """The per-epoch line: losses, validation quality, throughput, elapsed and ETA."""
    epoch, total = int(m["epoch"]), int(m["epochs"])
    done = epoch - int(m.get("first_epoch", 1)) + 1
    eta = m["elapsed_s"] / max(done, 1) * (total - epoch)
    return (
        f"epoch {epoch}/{total}  train loss {m['train_loss']:.4f} "
        f"(img {m['train_image_loss']:.4f} pose {m['train_pose_loss']:.4f})  "
        f"val loss {m['val_loss']:.4f}  PSNR {m['val_psnr']:.2f} dB{_face(m)}  "
        f"SSIM {m['val_ssim']:.3f}  "
        f"pose err {m['val_pose_mae_deg']:.1f} deg  {m['samples_per_sec']:.1f} samples/s  "
        f"epoch {m['epoch_time_s']:.1f}s  elapsed {m['elapsed_s']:.0f}s  ETA {eta:.0f}s"
    ) + (f"\n    held-out judged: {format_judged(m)}" if "judged_yaw_err_deg" in m else "")


def _face(m: dict[str, Any]) -> str:
    """`` (face 18.21)``: the face-region PSNR that picks ``best_model.pth`` by default."""
    return f" (face {m['val_psnr_face']:.2f})" if "val_psnr_face" in m else ""


def format_judged(m: dict[str, Any]) -> str:
    """The independent judges' figures of an epoch (``controlnet_ray.judging``), with the
    floor (the judge on real targets), the best trivial predictor, copying the source (for
    identity) and how many held-out persons and pairs they rest on."""
    margin = m.get("face_margin_db")
    margin_s = "n/a" if margin is None else f"{margin:+.2f} dB"
    source = m.get("id_top1_source")
    beside = f"copying the source {source:.0%}, " if source is not None else ""
    counted = (
        f"; on {_count(m['judged_persons'], 'person')}, {_count(m['judged_pairs'], 'pair')}"
        if "judged_persons" in m and "judged_pairs" in m
        else ""
    )
    return (
        f"yaw err {m['judged_yaw_err_deg']:.1f} deg (floor {m['judge_floor_yaw_deg']:.1f}), "
        f"pitch {m['judged_pitch_err_deg']:.1f} (floor {m['judge_floor_pitch_deg']:.1f}); "
        f"face PSNR {margin_s} over the best trivial predictor; "
        f"identity top-1 {m['id_top1']:.0%} ({beside}chance {m['id_chance']:.0%}); "
        f"sharpness {m['sharpness']:.2f}{counted}"
    )


def _count(n: float, noun: str) -> str:
    """``1 person``, ``3 persons``."""
    return f"{n:.0f} {noun}{'' if round(n) == 1 else 's'}"


def format_bar(state: dict[str, Any], width: int = 100) -> str:
    """One bar line for the step state rank 0 posted, cut to ``width`` characters."""
    step, total = int(state["step"]), max(int(state["total"]), 1)
    head = f"epoch {state['epoch']}/{state['epochs']} {state['phase']:<5}"
    tail = f" {step}/{total}"
    if state["phase"] == "train":
        rate = state.get("samples_per_sec", 0.0)
        eta = state.get("elapsed_s", 0.0) / max(step, 1) * (total - step)
        tail += f"  loss {state['loss']:.4f}  {rate:.1f} samples/s  epoch ETA {eta:.0f}s"
    cells = max(10, min(30, width - len(head) - len(tail) - 3))
    filled = round(cells * min(step, total) / total)
    return f"{head} [{'#' * filled}{'-' * (cells - filled)}]{tail}"[:width]


def format_duration(seconds: float) -> str:
    """``45s``, ``3m05s``, ``1h02m``: a time a person reads at a glance."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_steps(
    label: str, step: int, total: int, elapsed_s: float, eta_s: float, loss: float
) -> str:
    """``pose judge [######------] 120/540 steps  loss 0.0123  elapsed 40s  ETA 2m20s``."""
    total = max(total, 1)
    filled = round(20 * min(step, total) / total)
    return (
        f"{label} [{'#' * filled}{'-' * (20 - filled)}] {step}/{total} steps  loss {loss:.4f}  "
        f"elapsed {format_duration(elapsed_s)}  ETA {format_duration(eta_s)}"
    )


class StepProgress:
    """Progress of a long loop the driver runs itself (the judges' training before Ray), called
    after each step with the steps done and the loss.

    It decides as the in-epoch bar does (:func:`bar_stream`): on a terminal (or with
    ``--progress bar``) one bar redrawn in place, at most every ``POLL_INTERVAL_S``; anywhere
    else -- a log file, ``ray job submit``, a Ray task whose output Ray forwards line by line
    -- plain lines, the first after ``LOG_FIRST_LINE_S`` (so the ETA shows early) and then at
    most every ``LOG_LINE_INTERVAL_S``: a log gets a line every half minute, never a stream of
    ``\\r`` frames. The last step always ends with one line on ``lines``. The ETA is the
    rate since the first step ended (the first one pays for start-up) times the steps left.
    """

    def __init__(
        self,
        label: str,
        total: int,
        mode: str = "auto",
        lines: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label, self.total = label, max(int(total), 1)
        self._bar = bar_stream(mode)
        self._lines = lines if lines is not None else sys.stdout
        self._clock = clock
        self._start = self._last = clock()
        self._origin: tuple[int, float] | None = None  # (step, time) the rate is measured from
        self._shown = 0  # progress lines or bar frames written

    def __call__(self, step: int, loss: SupportsFloat) -> None:
        now = self._clock()
        if step >= self.total:
            self._finish(now - self._start, float(loss))
        elif self._origin is None:
            self._origin, self._last = (step, now), now
        elif now - self._last >= self._interval():
            self._last, self._shown = now, self._shown + 1
            first, t0 = self._origin
            eta = (now - t0) / max(step - first, 1) * (self.total - step)
            text = format_steps(self.label, step, self.total, now - self._start, eta, float(loss))
            if self._bar is None:
                print(text, file=self._lines, flush=True)
            else:
                width = shutil.get_terminal_size((100, 24)).columns - 1
                self._bar.write("\r" + text[:width] + "\x1b[K")
                self._bar.flush()

    def _interval(self) -> float:
        if self._bar is not None:
            return POLL_INTERVAL_S
        return LOG_FIRST_LINE_S if self._shown == 0 else LOG_LINE_INTERVAL_S

    def _finish(self, elapsed_s: float, loss: float) -> None:
        if self._bar is not None and self._shown:
            self._bar.write("\r\x1b[K")
            self._bar.flush()
        line = f"{self.label}: {self.total} steps in {format_duration(elapsed_s)}, loss {loss:.4f}"
        print(line, file=self._lines, flush=True)


class ProgressBoard:
    """The actor's class: what rank 0 posted since the driver last looked."""

    def __init__(self) -> None:
        self._events: list[tuple[str, Any]] = []
        self._state: dict[str, Any] | None = None

    def post(self, kind: str, payload: Any) -> None:
        """``kind`` is ``"message"`` (a line of text) or ``"epoch"`` (reported metrics)."""
        self._events.append((kind, payload))
        self._state = None  # a finished phase's bar is stale

    def step(self, state: dict[str, Any]) -> None:
        self._state = state

    def drain(self) -> tuple[list[tuple[str, Any]], dict[str, Any] | None]:
        events, self._events = self._events, []
        return events, self._state


def render_event(kind: str, payload: Any) -> str:
    return format_epoch_line(payload) if kind == "epoch" else str(payload)


def post_or_print(board: Any | None, kind: str, payload: Any, file: TextIO | None) -> None:
    """Post an event to the driver's board, or print its line in place where there is none."""
    if board is None:
        print(render_event(kind, payload), file=file, flush=True)
    else:
        board.post.remote(kind, payload)


class WorkerProgress:
    """Rank 0's side: posts to the board when there is one, else prints the lines itself."""

    def __init__(self, board: Any | None, rank: int) -> None:
        self.board = board
        self.enabled = rank == 0
        self._last_post = 0.0

    def message(self, text: str) -> None:
        self._event("message", text)

    def due(self, last: bool = False) -> bool:
        """Whether to post step state now: at most every POST_INTERVAL_S, and the last step."""
        if not self.enabled or self.board is None:
            return False
        now = time.monotonic()
        if last or now - self._last_post >= POST_INTERVAL_S:
            self._last_post = now
            return True
        return False

    def step(self, state: dict[str, Any]) -> None:
        """Fire-and-forget: the training loop never waits for the driver."""
        self.board.step.remote(state)

    def _event(self, kind: str, payload: Any) -> None:
        if self.enabled:
            # sys.__stdout__: Ray Train's print patch would both log and echo a plain print.
            post_or_print(self.board, kind, payload, sys.__stdout__)


def bar_stream(mode: str) -> TextIO | None:
    """Where the bar goes: the terminal (stderr first, as tqdm does) or nowhere."""
    if mode == "lines":
        return None
    for stream in (sys.stderr, sys.stdout):
        if stream.isatty():
            return stream
    return sys.stderr if mode == "bar" else None


class ConsoleProgress:
    """Driver side: a thread drains the board, prints lines, redraws the bar in place."""

    def __init__(
        self,
        fetch: Callable[[], tuple[list[tuple[str, Any]], dict[str, Any] | None]],
        lines: TextIO,
        bar: TextIO | None,
        interval: float = POLL_INTERVAL_S,
    ) -> None:
        self._fetch = fetch
        self._lines, self._bar = lines, bar
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self._drawn: dict[str, Any] | None = None  # the state on screen; None: no bar shown

    def start(self) -> ConsoleProgress:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop polling, print what is still on the board, leave the cursor on a clean line."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.poll_once()
        self._clear_bar()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.poll_once()

    def poll_once(self) -> None:
        try:
            events, state = self._fetch()
        except Exception:  # the board died with a failing run; Ray reports the failure itself
            return
        if events:
            self._clear_bar()
            for kind, payload in events:
                print(render_event(kind, payload), file=self._lines, flush=True)
        if state is not None and self._bar is not None and state != self._drawn:
            self._drawn = state
            width = shutil.get_terminal_size((100, 24)).columns - 1
            self._bar.write("\r" + format_bar(state, width) + "\x1b[K")
            self._bar.flush()

    def _clear_bar(self) -> None:
        if self._bar is not None and self._drawn is not None:
            self._bar.write("\r\x1b[K")
            self._bar.flush()
            self._drawn = None


def start_console(mode: str) -> tuple[Any, ConsoleProgress]:
    """Create the board actor (0 CPUs, owned by this driver) and its console thread."""
    import ray

    board = ray.remote(num_cpus=0, max_concurrency=1)(ProgressBoard).remote()
    console = ConsoleProgress(
        lambda: ray.get(board.drain.remote(), timeout=30), sys.stdout, bar_stream(mode)
    )
    return board, console.start()
