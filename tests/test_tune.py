"""The sweep CLI without a cluster: flags, resource plan, per-trial configs, ASHA that survives
a resume, and the ranked table. The sweep itself runs against a real Ray head in
tests/test_ray_client.py; trial placement on a 0-CPU head with the driver resource, in
tests/test_multinode_storage.py (its autoscaling cluster).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from controlnet_ray.capacity import Cluster, ensure
from controlnet_ray.config import ConfigError
from controlnet_ray.tune import (
    DRIVER_RESOURCE,
    DRIVER_SHARE,
    TRIAL_CPUS,
    SweepOptions,
    discard_previous_sweep,
    format_table,
    load_rungs,
    make_scheduler,
    merge_history,
    param_space,
    parse_sweep_args,
    plan_sweep,
    rank,
    result_trial_id,
    set_aside_other_sweep,
    summarize_trial,
    sweep_dir,
    sweep_failure_config,
    sweep_need,
    trial_config,
    write_results,
)
from controlnet_ray.tune.search_space import sweep_metric
from controlnet_ray.tune.summary import checkpoint_exists, kept_checkpoints
from controlnet_ray.tune.trials import trial_data_seed
from tests.cli_helpers import run_module
from tests.datasets import make_legacy_fixture

TINY = ["--epochs", "3", "--batch_size", "4", "--save_dir", "/tmp/ck", "--log_dir", "/tmp/lg"]


def parse(*extra: str):
    return parse_sweep_args([*TINY, *extra])


# --- command line ----------------------------------------------------------------------------


def test_defaults_and_training_flags_pass_through():
    cfg, opts = parse("--lr", "3e-4", "--num_ray_workers", "2")
    assert opts.loss_types == ("mse", "l1", "combined")
    assert opts.pose_loss_weights == (0.01, 0.1, 0.5)
    assert opts.lrs is None and opts.scheduler == "asha" and opts.grace_period is None
    assert (cfg.optim.epochs, cfg.optim.lr, cfg.ray.num_ray_workers) == (3, 3e-4, 2)
    assert opts.grid_size() == 9


def test_search_space_flags_and_dashless_form():
    _, opts = parse_sweep_args(
        [*TINY, "loss_types", "mse", "l1", "--pose_loss_weights", "0.1", "--lrs", "1e-3", "1e-4"]
    )
    assert opts.loss_types == ("mse", "l1") and opts.pose_loss_weights == (0.1,)
    assert opts.lrs == (1e-3, 1e-4) and opts.grid_size() == 4


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--loss_types", "mse", "huber"], "--loss_types"),
        (["--loss_types", "mse", "mse"], "--loss_types"),
        (["--pose_loss_weights", "-1"], "--pose_loss_weights"),
        (["--lrs", "0"], "--lrs"),
        (["--scheduler", "pbt"], "--scheduler"),
        (["--grace_period", "4"], "--grace_period"),
        (["--reduction_factor", "1"], "--reduction_factor"),
        (["--num_samples", "0"], "--num_samples"),
        (["--max_concurrent_trials", "0"], "--max_concurrent_trials"),
        (["--sweep_name", "a/b"], "--sweep_name"),
        (["--epochs", "0"], "--epochs"),
        (["--best_metric", "val_loss"], "--best_metric val_loss"),  # over 3 losses x 3 weights
    ],
)
def test_invalid_values_exit_2_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_cli_help_and_bad_flag_fail_fast_without_ray():
    help_ = run_module("tune", "--help")
    assert help_.returncode == 0
    for flag in ("--loss_types", "--pose_loss_weights", "--lrs", "--scheduler", "--sweep_name"):
        assert flag in help_.stdout
    bad = run_module("tune", "--loss_types", "huber")
    assert bad.returncode == 2 and "--loss_types" in bad.stderr
    assert "Started a local Ray" not in bad.stdout + bad.stderr


# --- checks before Ray, preparation once connected (the launcher's, as for training) -----------


@pytest.mark.parametrize("cluster", [[], ["--address", "127.0.0.1:9"]], ids=["local", "cluster"])
def test_bad_data_stops_a_sweep_in_one_line_before_ray(tmp_path: Path, cluster: list):
    """The sweep reads and checks its data before starting or joining Ray: nothing listens at
    the cluster's address, so reaching Ray would fail differently."""
    fx = make_legacy_fixture(tmp_path / "repo", frames_per_person=3)
    doc = fx.load_json("video")
    doc["landmarks_2d"][4] = [[1e4, 1e4]] * 5
    fx.save_json("video", doc)
    person = doc["metadata"][4]["person_name"]
    out = ["--save_dir", str(tmp_path / "ck"), "--log_dir", str(tmp_path / "lg")]
    args = ["--data_dir", str(fx.data_dir), "--cache_dir", str(tmp_path / "c"), *out, *cluster]
    proc = run_module("tune", *args, timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and err.count("\n") == 0 and err.startswith("error: "), err
    assert f"video_metadata.json: entry 4 (person '{person}'): field 'landmarks_2d'" in err
    assert "sweep " not in proc.stdout  # Ray was never started or joined


class _Connecting(Exception):
    """Raised in place of starting or joining Ray: the test stops the sweep there."""


@pytest.mark.parametrize("joins", [True, False], ids=["cluster", "local"])
def test_a_sweep_prepares_after_joining_a_cluster_and_before_a_local_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, joins: bool
):
    """Against a cluster the shards are left for after the connection (then prepared as Ray
    tasks on its nodes, as training does); locally they are ready before Ray starts."""
    from controlnet_ray.tune import command_line

    if joins:
        monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def start_ray(cfg, opts):  # noqa: ANN001, ANN202 - stands in for tune.resources.start_ray
        raise _Connecting

    monkeypatch.setattr(command_line, "start_ray", start_ray)
    fx = make_legacy_fixture(tmp_path / "repo", frames_per_person=3)
    cache = tmp_path / "c"
    cfg, opts = parse(
        "--data_dir", str(fx.data_dir), "--cache_dir", str(cache), "--num_workers", "1",
        "--no_judge",
    )  # fmt: skip
    with pytest.raises(_Connecting):
        command_line.run_sweep(cfg, opts)
    out = capsys.readouterr().out
    manifests = list(cache.glob("shards/*/manifest.json"))
    if joins:
        assert "shards: not prepared yet" in out and not manifests, out
    else:
        assert "shards: not prepared yet" not in out and len(manifests) == 1, out


# --- resources -------------------------------------------------------------------------------


def test_two_cores_run_one_trial_with_a_cpu_left_for_ray_data():
    cfg, opts = parse()
    plan = plan_sweep(cfg, opts, cpus=2, gpus=0, local=True)
    assert plan.concurrency == 1 and 0 < plan.trial_cpus < 1
    assert plan.trial_cpus + plan.cpus_per_worker <= 2 - 1  # one CPU stays free for Ray Data
    assert plan.ray_num_cpus == 2


def test_bigger_machines_run_trials_concurrently_within_the_grid():
    cfg, opts = parse()
    plan = plan_sweep(cfg, opts, cpus=16, gpus=0, local=False)
    assert plan.concurrency == 9  # 9 grid points, 15 CPUs / 1.25 per trial = 12 would fit
    assert plan.cpus_per_worker == 1.0 and plan.ray_num_cpus is None
    used = plan.concurrency * (plan.trial_cpus + plan.cpus_per_worker) + 1
    assert used <= 16


def test_gpus_limit_concurrency_and_small_clusters_fail_naming_flags():
    cfg, opts = parse("--use_gpu", "--num_ray_workers", "2")
    assert plan_sweep(cfg, opts, cpus=32, gpus=4, local=False).concurrency == 2
    cfg, opts = parse("--max_concurrent_trials", "4", "--cpus_per_worker", "1")
    plan = plan_sweep(cfg, opts, cpus=3, gpus=0, local=False)
    need = sweep_need(cfg, plan)
    assert need.totals == {"CPU": 4 * (0.25 + 1) + 1}
    fixed = Cluster(resources=lambda: {"CPU": 3.0})
    with pytest.raises(ConfigError, match="--max_concurrent_trials 4"):
        ensure(need, 600, fixed=True, cluster=fixed)
    local = plan_sweep(cfg, opts, cpus=2, gpus=0, local=True)  # locally: more logical CPUs
    assert local.ray_num_cpus >= 4 * (local.trial_cpus + 1) + 1


def test_trials_go_to_driver_nodes_without_a_cpu_only_when_the_cluster_has_them():
    cfg, opts = parse("--use_gpu", "--num_ray_workers", "2", "--max_concurrent_trials", "2")
    plain = plan_sweep(cfg, opts, cpus=16, gpus=4, local=False)
    assert plain.trial_resources() == {"CPU": TRIAL_CPUS}
    safe = plan_sweep(cfg, opts, cpus=16, gpus=4, local=False, on_driver_nodes=True)
    assert safe.trial_resources() == {"CPU": 0.0, DRIVER_RESOURCE: DRIVER_SHARE}
    need = sweep_need(cfg, safe)
    assert need.totals == {"CPU": 2 * 2 * 1.0 + 1, "GPU": 4.0, DRIVER_RESOURCE: 2 * DRIVER_SHARE}
    assert {"CPU": 1.0, "GPU": 1.0} in need.bundles and {"CPU": 0.0} not in need.bundles


def test_a_crashed_trial_is_relaunched_up_to_max_failures():
    cfg, _ = parse("--max_failures", "3")
    assert sweep_failure_config(cfg).max_failures == 3


# --- trials ----------------------------------------------------------------------------------


def test_param_space_is_a_full_grid():
    from ray.tune.search.variant_generator import generate_variants

    _, opts = parse("--loss_types", "mse", "l1", "--lrs", "1e-3", "1e-4", "--num_samples", "2")
    trials = [config for _, config in generate_variants(param_space(opts))]
    assert len(trials) == opts.grid_size() == 2 * 3 * 2 * 2
    combos = {(c["loss_type"], c["pose_loss_weight"], c["lr"], c["repeat"]) for c in trials}
    assert len(combos) == len(trials)


def test_trial_config_has_own_dirs_stable_run_name_and_seed():
    cfg, _ = parse("--storage_path", "/tmp/store", "--seed", "7", "--run_name", "ignored")
    params = {"loss_type": "l1", "pose_loss_weight": 0.5, "lr": 1e-3, "repeat": 1}
    t = trial_config(cfg, params, "sw", "abc12_00003")
    assert (t.optim.loss_type, t.optim.pose_loss_weight, t.optim.lr) == ("l1", 0.5, 1e-3)
    assert t.output.save_dir == "/tmp/ck/sw/abc12_00003"
    assert t.output.log_dir == "/tmp/lg/sw/abc12_00003"
    assert t.run_name() == "abc12_00003" and t.ray.seed == 8
    assert t.storage_path() == "/tmp/store/sw/train_runs"
    assert trial_config(cfg, params, "sw", "abc12_00003") == t  # same trial, same config
    s3, _ = parse("--storage_path", "s3://bucket/rr")
    assert trial_config(s3, params, "sw", "x").storage_path() == "s3://bucket/rr/sw/train_runs"
    assert sweep_dir("s3://bucket/rr/", "sw") == "s3://bucket/rr/sw"


def test_every_trial_draws_its_own_data_order_and_keeps_it():
    cfg, _ = parse("--seed", "7")
    grid = [{"loss_type": lt, "pose_loss_weight": w, "repeat": r}
            for lt in ("mse", "l1") for w in (0.1, 0.5) for r in (0, 1)]  # fmt: skip
    seeds = [trial_data_seed(trial_config(cfg, p, "sw", f"t{i}"), p) for i, p in enumerate(grid)]
    assert len(set(seeds)) == len(grid) and all(0 <= s < 2**31 for s in seeds)
    again = [trial_data_seed(trial_config(cfg, p, "sw", "other_id"), p) for p in grid]
    assert again == seeds  # from the trial's values and seed, not its id: kept on restore


def test_fresh_refuses_remote_storage():
    cfg, opts = parse("--storage_path", "s3://bucket/rr")
    with pytest.raises(ConfigError, match="--fresh"):
        discard_previous_sweep(cfg, opts)


def test_a_sweep_with_other_settings_is_a_new_sweep(tmp_path: Path, capsys):
    """Same settings: the record is kept and nothing moves (the Tuner restores the sweep).
    Other settings: the old experiment and its results move aside, naming the differences."""
    flags = ("--storage_path", str(tmp_path / "store"), "--save_dir", str(tmp_path / "ck"),
             "--log_dir", str(tmp_path / "lg"))  # fmt: skip
    cfg, opts = parse(*flags)
    assert set_aside_other_sweep(cfg, opts) is None  # nothing there yet: only recorded
    experiment = tmp_path / "store" / opts.sweep_name
    (experiment / "train_runs").mkdir(parents=True)
    (tmp_path / "ck" / opts.sweep_name).mkdir(parents=True)
    assert set_aside_other_sweep(*parse(*flags, "--max_concurrent_trials", "1")) is None
    assert experiment.is_dir() and capsys.readouterr().out == ""

    moved = set_aside_other_sweep(*parse(*flags, "--lr", "5e-3", "--loss_types", "l1"))
    out = capsys.readouterr().out
    assert moved is not None and moved.parent == experiment.parent
    assert (moved / "train_runs").is_dir() and not (experiment / "train_runs").exists()
    assert "--lr 0.0001 -> 0.005" in out and "--loss_types" in out and len(out.splitlines()) == 1
    assert [p.name for p in (tmp_path / "ck").iterdir()] == [moved.name]


def test_a_sweep_with_other_settings_on_object_storage_asks_for_a_new_name(
    tmp_path: Path, s3_server
):
    flags = ("--storage_path", s3_server("sweeps"), "--log_dir", str(tmp_path / "lg"))
    set_aside_other_sweep(*parse(*flags))
    set_aside_other_sweep(*parse(*flags))  # same settings: fine
    with pytest.raises(ConfigError, match=r"--sweep_name .* other settings .*--lr"):
        set_aside_other_sweep(*parse(*flags, "--lr", "5e-3"))


# --- ASHA that survives Tuner.restore --------------------------------------------------------


def _asha(tmp_path: Path):
    _, opts = parse("--grace_period", "1", "--reduction_factor", "2")
    sched = make_scheduler(opts, max_t=3, state_file=tmp_path / "rungs.json")
    sched.set_search_properties("val_psnr", "max")
    return sched


def _report(sched, trial_id: str, epoch: int, psnr: float) -> str:
    trial = SimpleNamespace(trial_id=trial_id)
    if trial_id not in sched._trial_info:
        sched.on_trial_add(None, trial)
    return sched.on_trial_result(None, trial, {"epoch": epoch, "val_psnr": psnr})


def test_asha_stops_the_worse_trial_and_its_rungs_survive_a_restore(tmp_path: Path):
    import ray.cloudpickle as pickle

    sched = _asha(tmp_path)
    pickled_at_start = pickle.dumps(sched)  # what Tuner stores in tuner.pkl
    assert _report(sched, "a", 1, 20.0) == "CONTINUE"
    # A plain restore would start with empty rungs and let "b" through:
    restored = pickle.loads(pickled_at_start)
    restored.set_search_properties("val_psnr", "max")
    assert _report(restored, "b", 1, 10.0) == "STOP"
    assert _report(restored, "c", 1, 30.0) == "CONTINUE"
    assert load_rungs(restored._brackets, str(tmp_path / "missing.json")) == 0


def test_no_scheduler_with_none():
    _, opts = parse("--scheduler", "none")
    assert make_scheduler(opts, 3, Path("/tmp/x.json")) is None


# --- the table -------------------------------------------------------------------------------


def _hist(*faces: float, whole: tuple[float, ...] = ()) -> list[dict]:
    """Validation rows as Tune reports them: face PSNR per epoch (whole PSNR 5 dB lower unless
    given), each with the checkpoint Tune's callback names for every epoch."""
    whole = whole or tuple(f - 5 for f in faces)
    return [
        {"epoch": i, "val_psnr_face": f, "val_psnr": w, "val_loss": 1 / f,
         "checkpoint_path": f"/tune/e{i}"}
        for i, (f, w) in enumerate(zip(faces, whole, strict=True), 1)
    ]  # fmt: skip


def _kept(*epochs: int) -> dict[int, str]:
    """The checkpoints Train still keeps, as :func:`kept_checkpoints` returns them."""
    return {e: f"/ck/e{e}" for e in epochs}


def test_summaries_rank_and_flag_early_stops_and_errors():
    cfg, _ = parse()  # --epochs 3
    p = {"loss_type": "mse", "pose_loss_weight": 0.1}
    full = summarize_trial(cfg, "sw", "t0", p, _hist(10, 12, 11), None, _kept(2, 3))
    early = summarize_trial(cfg, "sw", "t1", {**p, "loss_type": "l1"}, _hist(14), None, _kept(1))
    failed = summarize_trial(cfg, "sw", "t2", p, [], "RuntimeError: boom")
    assert (full.best_score, full.best_epoch, full.epochs_run) == (12, 2, 3)
    assert full.checkpoint == "/ck/e2" and not full.stopped_early and full.status == "finished"
    assert early.stopped_early and early.status == "stopped early" and early.epochs_run == 1
    assert failed.status == "error" and not failed.stopped_early and failed.best_score is None
    ranked = rank([failed, full, early], "max")
    assert [r.trial_id for r in ranked] == ["t1", "t0", "t2"]
    table = format_table(ranked, "val_psnr_face")
    lines = table.splitlines()
    assert "best val_psnr_face" in lines[0] and "stopped early?" in lines[0]
    assert "checkpoint" in lines[0]
    assert lines[1].split()[:3] == ["1", "t1", "l1"] and "yes" in lines[1]
    assert "error" in lines[3]


def test_a_sweep_is_ranked_by_face_psnr_not_whole_psnr():
    """Trial a has the better whole-image PSNR, b the better face PSNR (the default
    --best_metric, by which Train keeps checkpoints): b wins, at its best face epoch, with
    the checkpoint Train kept for that epoch. With --best_metric val_psnr, a wins."""
    p = {"loss_type": "mse", "pose_loss_weight": 0.1}
    histories = {"a": _hist(20, 21, whole=(19, 18)), "b": _hist(23, 22, whole=(14, 16))}

    def ranked(*flags: str) -> list:
        cfg, _ = parse(*flags)
        rows = [
            summarize_trial(cfg, "sw", t, p, h, None, _kept(1, 2)) for t, h in histories.items()
        ]
        return rank(rows, sweep_metric(cfg)[1])

    best, second = ranked()
    assert (best.trial_id, best.best_score, best.best_epoch, best.checkpoint) == (
        "b",
        23,
        1,
        "/ck/e1",
    )
    assert (second.trial_id, second.best_score, second.best_epoch) == ("a", 21, 2)
    assert [r.trial_id for r in ranked("--best_metric", "val_psnr")] == ["a", "b"]
    by_loss = ranked(
        "--best_metric", "val_loss", "--loss_types", "l1", "--pose_loss_weights", "0.1"
    )
    assert [(r.trial_id, r.best_epoch) for r in by_loss] == [("b", 1), ("a", 2)]  # lowest first


def test_the_table_prints_only_checkpoints_train_still_keeps(tmp_path: Path):
    """Tune's rows name a checkpoint for every epoch; Train keeps --num_to_keep of them. The
    best epoch's checkpoint comes from Train's record, and only while its folder exists."""
    from ray.train import Checkpoint

    cfg, _ = parse()
    p = {"loss_type": "mse", "pose_loss_weight": 0.1}
    gone = summarize_trial(cfg, "sw", "t", p, _hist(15, 12, 11), None, _kept(2, 3))
    assert gone.best_epoch == 1 and gone.checkpoint is None  # not /tune/e1
    (tmp_path / "checkpoint_1").mkdir()
    kept = Checkpoint(str(tmp_path / "checkpoint_1"))
    deleted = Checkpoint(str(tmp_path / "checkpoint_0"))
    assert checkpoint_exists(kept) and not checkpoint_exists(deleted)
    train_rows = [{"epoch": 1, "checkpoint_path": kept.path}, {"epoch": 2}]
    assert kept_checkpoints(train_rows) == {1: kept.path}


def test_an_unset_grace_period_is_a_quarter_of_the_epochs(tmp_path: Path):
    _, opts = parse("--epochs", "12")
    assert opts.grace_period is None and opts.grace_epochs(12) == 3
    assert opts.grace_epochs(3) == 1
    _, given = parse("--epochs", "12", "--grace_period", "5")
    assert given.grace_epochs(12) == 5
    sched = make_scheduler(opts, max_t=12, state_file=tmp_path / "r.json")
    assert sched._brackets[0]._rungs[-1][0] == 3  # the first milestone: the grace period


def test_a_trial_is_named_by_its_id_even_when_tune_suffixed_its_folder():
    """A restored pending trial whose folder already existed runs in ``<id>_<4 hex>``."""
    ran = SimpleNamespace(metrics={"trial_id": "ab_00001"}, path="/r/sw/ab_00001_1893")
    never = SimpleNamespace(metrics={}, path="/r/sw/ab_00002")
    assert result_trial_id(ran) == "ab_00001" and result_trial_id(never) == "ab_00002"


def test_history_merges_tune_rows_with_the_full_run_history():
    """After a resume Tune holds only the later epochs; the run's own history fills the rest."""
    tune_rows = [{"epoch": 2, "val_psnr_face": 11.0, "checkpoint_path": "/ck/e2"}]
    train_rows = [{"epoch": 1, "val_psnr_face": 13.0, "checkpoint_path": "/ck/e1"}]
    file_rows = [{"epoch": 1, "val_psnr_face": 13.0}, {"epoch": 2, "val_psnr_face": 11.0}]
    merged = merge_history(tune_rows, train_rows, file_rows)
    assert [(r["epoch"], r["checkpoint_path"]) for r in merged] == [(1, "/ck/e1"), (2, "/ck/e2")]
    cfg, _ = parse("--epochs", "2")
    best = summarize_trial(
        cfg, "sw", "t", {"loss_type": "mse", "pose_loss_weight": 0.1}, merged, None,
        kept_checkpoints(train_rows),
    )  # fmt: skip
    assert (best.best_score, best.checkpoint, best.epochs_run) == (13.0, "/ck/e1", 2)


def test_history_merge_lets_a_later_source_fill_a_missing_value():
    """A finished run restored by Tune re-reports its last epoch without a checkpoint: pandas
    gives that row checkpoint_path NaN, which must not hide the Train run's path."""
    tune_rows = [{"epoch": 2, "val_psnr": 14.0, "checkpoint_path": float("nan")}]
    train_rows = [{"epoch": 2, "val_psnr": 14.0, "checkpoint_path": "/ck/e2"}]
    merged = merge_history(tune_rows, train_rows)
    assert merged == [{"epoch": 2, "val_psnr": 14.0, "checkpoint_path": "/ck/e2"}]


def test_results_are_written_as_json_and_csv_with_the_best_config(tmp_path: Path):
    cfg, opts = parse("--sweep_name", "sw")
    p = {"loss_type": "combined", "pose_loss_weight": 0.5, "lr": 2e-4}
    rows = rank(
        [
            summarize_trial(cfg, "sw", "t0", p, _hist(15, 16, 17), None),
            summarize_trial(cfg, "sw", "t1", {**p, "loss_type": "mse"}, _hist(9), None),
        ],
        "max",
    )
    json_path, csv_path = write_results(rows, cfg, opts, tmp_path)
    doc = json.loads(json_path.read_text())
    assert doc["best"]["trial_id"] == "t0" and (doc["metric"], doc["mode"]) == (
        "val_psnr_face",
        "max",
    )
    assert doc["best_config"] == {
        "loss_type": "combined",
        "pose_loss_weight": 0.5,
        "lr": 2e-4,
        "seed": cfg.ray.seed,
    }
    assert [t["trial_id"] for t in doc["trials"]] == ["t0", "t1"]
    with csv_path.open() as f:
        table = list(csv.DictReader(f))
    assert [r["trial_id"] for r in table] == ["t0", "t1"]
    assert table[1]["stopped_early"] == "True" and table[0]["epochs_run"] == "3"


def test_sweep_options_defaults_match_the_parser():
    _, opts = parse()
    assert opts == SweepOptions()
