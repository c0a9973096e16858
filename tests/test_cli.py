"""End-to-end through the command line: --help, one-line errors, the stage chain, the pipeline."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from alpamayo_cache.cli import app

runner = CliRunner()


def test_help_lists_the_commands():
    out = subprocess.run(
        [sys.executable, "-m", "alpamayo_cache", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("precompute", "train", "eval", "pipeline", "info", "verify", "synth", "export"):
        assert command in out


def test_bad_input_is_one_line_with_exit_status_2(tmp_path):
    result = runner.invoke(app, ["train", str(tmp_path / "missing-store")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: store") and "precompute" in lines[0]
    result = runner.invoke(
        app,
        [
            "precompute",
            "--data",
            str(tmp_path),
            "--store",
            str(tmp_path / "s"),
            "--camera-set",
            "mask:camera_roof",
        ],
    )
    assert result.exit_code == 2 and "unknown camera 'camera_roof'" in result.output


def test_stage_chain_with_resume(synthetic_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "store"
    ok = lambda r: r.exit_code == 0 or print(r.output)  # noqa: E731
    assert ok(
        runner.invoke(
            app,
            [
                "precompute",
                "--data",
                str(synthetic_data),
                "--store",
                str(store),
                "--limit",
                "4",
                "--set",
                "val_percent=50",
            ],
        )
    )
    info = runner.invoke(app, ["info", str(store)])
    assert json.loads(info.output)["samples"] == 4
    assert "4 samples checked, 0 bad" in runner.invoke(app, ["verify", str(store)]).output
    assert ok(
        runner.invoke(
            app,
            [
                "train",
                str(store),
                "--run",
                "smoke",
                "--steps",
                "4",
                "--set",
                "stop_after=2",
                "--set",
                "save_every=2",
            ],
        )
    )
    assert ok(runner.invoke(app, ["train", str(store), "--run", "smoke", "--steps", "4", "--resume"]))
    lines = (tmp_path / "runs" / "smoke" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert ok(
        runner.invoke(
            app, ["eval", str(store), "--checkpoint", "runs/smoke", "--split", "all", "--num-samples", "2"]
        )
    )
    assert (tmp_path / "runs" / "smoke" / "eval" / "report.md").is_file()


def test_default_pipeline_beats_its_baseline_on_sharp_curves(tmp_path, monkeypatch):
    """The README's main command: synthetic clips, tiny preset, CPU. The fine-tuned head must beat
    its untrained start on held-out sharp curves, with a bootstrap interval excluding zero."""
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["pipeline"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "runs" / "tiny-traj-only" / "eval"
    assert (out / "report.md").is_file() and (out / "plots" / "by_curvature_min_ade.png").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    sharp = metrics["paired"]["tiny-traj-only"]["min_ade@sharp"]
    assert sharp["n"] >= 5
    assert sharp["ci_high"] < 0, sharp


def test_pilot_pipeline_is_small(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["pipeline", "--pilot", "--name", "pilot"])
    assert result.exit_code == 0, result.output
    info = json.loads(runner.invoke(app, ["info", "cache_store/pilot"]).output)
    assert info["clips"] == 6
    lines = (tmp_path / "runs" / "pilot" / "metrics.jsonl").read_text().splitlines()
    n_train = info["by_split"].get("train", 0)
    assert len(lines) == -(-n_train // 4)  # one epoch of micro-batches of 4
    assert (tmp_path / "runs" / "pilot" / "eval" / "report.md").is_file()


@pytest.mark.long
def test_ctrl_c_saves_the_step_and_exits_130(tiny_store, tmp_path):
    """SIGINT mid-run: the current step finishes, a checkpoint of it is saved, the exact resume
    command is printed, the exit status is 130; the resumed run continues from that step."""
    import signal
    import time

    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "alpamayo_cache", "train", str(tiny_store), "--run-dir", str(run_dir),
        "--device", "cpu", "--steps", "400", "--set", "save_every=1000", "--set", "val_every=1000",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    steps = len(metrics.read_text().splitlines())
    assert (run_dir / "checkpoints" / f"step-{steps:06d}" / "head.safetensors").is_file(), out
    command = next(line for line in out.splitlines() if line.startswith("alpamayo-cache train "))
    assert "steps=400" in command and command.endswith("--resume"), command  # the run's own settings
    # The printed command as it stands (two more steps of it), run through this interpreter.
    words = [sys.executable, "-m", "alpamayo_cache", *shlex.split(command)[1:], "--stop-after", "2"]
    resumed = subprocess.run(words, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert len(metrics.read_text().splitlines()) == steps + 2
