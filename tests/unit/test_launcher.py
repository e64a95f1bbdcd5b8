import os
import subprocess
import sys

import pytest

from workers.launcher import parse_gpus, parse_models, worker_commands


def test_gpu_selection():
    assert parse_gpus("all", ["0", "1"]) == ["0", "1"]
    assert parse_gpus("all", []) == []
    assert parse_gpus("1", ["0", "1"]) == ["1"]
    assert parse_gpus("cpu", ["0"]) == []
    with pytest.raises(ValueError, match="GPU 3 not found"):
        parse_gpus("0,3", ["0", "1"])


def test_one_pinned_named_worker_per_gpu_and_one_control_process():
    *commands, control = worker_commands(["0", "1"], control=True)
    assert [env["CUDA_VISIBLE_DEVICES"] for _, _, env in commands] == ["0", "1"]
    names = [name.split("@")[0] for name, _, _ in commands]
    assert names == ["gpu0", "gpu1"]
    for _, argv, _ in commands:
        assert argv[argv.index("--concurrency") + 1] == "1"
        assert "--beat" not in argv and "workers.app" in argv
    name, argv, env = control
    assert name.startswith("control@") and env == {"CUDA_VISIBLE_DEVICES": ""}
    assert argv[argv.index("-A") + 1] == "workers.control" and argv[argv.index("-Q") + 1] == "control"
    assert argv[argv.index("--pool") + 1] == "threads" and "--beat" in argv


def test_cpu_worker_hides_gpus():
    [(name, _, env)] = worker_commands([])
    assert name.startswith("cpu@") and env == {"CUDA_VISIBLE_DEVICES": ""}


def test_a_worker_reads_its_models_interactive_queues_before_any_bulk_one():
    [(_, argv, _)] = worker_commands([], models=["tiny-sd", "lanczos-x4"])
    assert argv[argv.index("-Q") + 1].split(",") == [
        "interactive.lanczos-x4", "interactive.tiny-sd", "interactive",
        "bulk.lanczos-x4", "bulk.tiny-sd", "bulk"]
    assert parse_models("tiny-sd", ["tiny-sd", "lanczos-x4"]) == ["tiny-sd"]
    assert parse_models(None, ["tiny-sd", "lanczos-x4"]) == ["lanczos-x4", "tiny-sd"]
    with pytest.raises(ValueError, match="unknown profile nope"):
        parse_models("tiny-sd,nope", ["tiny-sd"])
def test_the_control_process_never_imports_torch(tmp_path):
    """It must start in a second and stay small: the reconciler never waits for a model library."""
    code = "import sys, workers.control; print(sorted(m for m in ('torch', 'diffusers', 'cv2') if m in sys.modules))"
    env = {**os.environ, "STEP1X_DATA_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


def test_worker_with_a_gpu_that_is_not_there_says_so_without_a_traceback(monkeypatch):
    from typer.testing import CliRunner

    from step1x.cli import app
    from workers import launcher

    monkeypatch.setattr(launcher, "detect_gpus", lambda: ["0"])
    result = CliRunner().invoke(app, ["worker", "--gpus", "0,3"])
    assert result.exit_code == 2
    assert "GPU 3 not found (found: 0)" in result.output and "Traceback" not in result.output


def test_workers_and_control_start_without_celery_chatter():
    """Nothing reads gossip, mingle or heartbeat events (workers report to the database), and mingle
    costs a second at every start: both kinds of process leave them off."""
    *workers, control = worker_commands(["0"], control=True)
    for _, argv, _ in [*workers, control]:
        assert {"--without-gossip", "--without-mingle", "--without-heartbeat"} <= set(argv)
