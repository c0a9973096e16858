"""``pipeline --model tiny-1.5`` and ``--model tiny-2super`` end to end through the CLI on CPU: routes on
the synthetic clips (some clips have none), route dropout in training, guided eval; and a store made for
one release refused by another with a one-line error. Slow (data for 6-7 cameras, two prefills per routed
sample): marked long."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from alpamayo_cache.cli import app
from alpamayo_cache.store.reader import StoreReader

runner = CliRunner()


@pytest.mark.long
@pytest.mark.parametrize("model", ["tiny-1.5", "tiny-2super"])
def test_release_pipeline_end_to_end(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["pipeline", "--model", model, "--pilot", "--name", "p", "--synthetic-clips", "8"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    reader = StoreReader(tmp_path / "cache_store" / "p")
    infos = reader.sample_infos().values()
    assert reader.info.model_config["release"] == (
        "alpamayo-1.5" if model == "tiny-1.5" else "alpamayo-2-super"
    )
    assert reader.info.inputs["routes"]
    routed = [i for i in infos if i.has_route]
    assert routed and len(routed) < len(infos)  # every fourth synthetic clip has no route
    assert all(i.route and i.route_start > 0 and i.uncond_length < i.length for i in routed)
    # The shared tokens' K/V, guided vs unguided prefill: bit-identical for tiny-1.5 here, float rounding
    # (~1e-6) for tiny-2super, whose kernels tile its two prompt lengths differently.
    assert all(i.writer["route_shared_kv_max_abs_diff"] < 1e-5 for i in routed)
    metrics = json.loads((tmp_path / "runs" / "p" / "eval" / "metrics.json").read_text())
    assert metrics["config"]["guidance"] == 1.5
    run_config = json.loads((tmp_path / "runs" / "p" / "config.json").read_text())
    assert json.dumps(run_config).count('"route_dropout": 0.2') >= 1
    other = "tiny-2super" if model == "tiny-1.5" else "tiny-1.5"
    refused = runner.invoke(
        app, ["precompute", "--model", other, "--store", "cache_store/p", "--limit", "1", "--synthetic-clips", "8",
              "--synthetic-dir", "cache_store/synthetic-data"]
    )  # fmt: skip
    assert refused.exit_code == 2, refused.output
    lines = [line for line in refused.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: store") and "fingerprint" in lines[-1], refused.output
    head = runner.invoke(app, ["eval", "cache_store/p", "--baseline", other])
    assert head.exit_code == 2 and "the store was made for" in head.output
