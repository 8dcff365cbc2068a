"""benchmarks/gpu_check.py: its CPU mode runs whole without Ray or W&B, and it fails loudly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

REPO = Path(__file__).resolve().parents[1]
# Runs the script as `python benchmarks/gpu_check.py ...` would, with Ray and W&B unimportable (as on the GPU
# machines, which have neither): an import of either anywhere on the path fails the run.
WITHOUT_RAY_OR_WANDB = (
    "import runpy, sys; sys.modules.update(ray=None, wandb=None); sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def test_quick_cpu_mode_passes_every_check_without_ray_or_wandb(tmp_path):
    out = tmp_path / "check.json"
    # One thread: on a shared, loaded 2-core machine OpenMP barriers otherwise stall every op.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", WITHOUT_RAY_OR_WANDB, str(REPO / "benchmarks" / "gpu_check.py")]
    proc = subprocess.run(
        [*command, "--device", "cpu", "--quick", "--json", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.rstrip().endswith("PASSED")
    results = json.loads(out.read_text())
    assert results["ok"] and results["device"] == "cpu"

    sizes = results["selector"]["sizes"]
    assert [entry["shape"] for entry in sizes] == [[n, c, s, s] for n, c, s in gpu_check.QUICK.selector_sizes]
    for entry in sizes:
        assert set(entry["median_ms"]) == {"csl", "released", "threshold"}
        assert entry["vs_released"]["frac_weight_diff_gt_1e-3"] <= gpu_check.MAX_SHARE_OFF_RELEASED

    assert set(results["step"]) == {"bf16", "fp32"}
    for step in results["step"].values():
        assert step["seconds_per_iteration"] > 0 and 0 <= step["selector_share_percent"] <= 100
        assert not step["autocast_bf16"]  # autocast is CUDA-only; CPU runs fp32 either way
        assert "resnet18" in step["setting"]

    e2e = results["end_to_end"]
    assert e2e["backend"] == "gloo" and e2e["iterations"] == gpu_check.QUICK.iterations
    assert all(e2e["checkpoint_restored"].values())
    assert e2e["sync_batchnorm_layers"] == 0 < e2e["batchnorm_layers"]  # SyncBatchNorm is CUDA-only
    assert 0 <= e2e["miou"] <= 100


def test_a_failing_section_is_recorded_and_exits_1(tmp_path, monkeypatch, capsys):
    def broken(settings, device):
        raise RuntimeError("selector exploded")

    monkeypatch.setattr(gpu_check, "check_selector", broken)
    out = tmp_path / "check.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--only", "selector", "--json", str(out)]) == 1
    results = json.loads(out.read_text())
    assert not results["ok"]
    assert results["selector"] == {"error": "RuntimeError: selector exploded"}
    assert "FAILED" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [["--only", "selector,bogus"], ["--device", "tpu"], *([] if torch.cuda.is_available() else [["--device", "cuda"]])],
)
def test_bad_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(argv)
    assert exit_info.value.code == 2


def test_same_tensors_sees_any_difference():
    state = {"w": torch.ones(3), "groups": [{"lr": 0.1}], "step": 4}
    assert gpu_check._same_tensors(state, {"w": torch.ones(3), "groups": [{"lr": 0.1}], "step": 4})
    assert not gpu_check._same_tensors(state, {"w": torch.tensor([1.0, 1.0, 2.0]), "groups": [{"lr": 0.1}], "step": 4})
    assert not gpu_check._same_tensors(state, {"w": torch.ones(3), "groups": [{"lr": 0.2}], "step": 4})
    assert not gpu_check._same_tensors(state, {"w": torch.ones(3), "groups": [{"lr": 0.1}]})
