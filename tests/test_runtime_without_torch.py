"""The runtime imports and predicts with torch, open_clip and onnx made unimportable."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

BLOCKER = textwrap.dedent(
    """
    import sys, importlib.abc

    class Block(importlib.abc.MetaPathFinder):
        blocked = ("torch", "torchvision", "open_clip", "onnx", "onnxscript")

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.blocked:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name.split(".")[0])
            return None

    for name in list(sys.modules):
        if name.split(".")[0] in Block.blocked:
            del sys.modules[name]
    sys.meta_path.insert(0, Block())
    """
)


def run_blocked(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code), *args], capture_output=True,
                          text=True, timeout=300)


def test_every_runtime_module_imports_without_torch():
    proc = run_blocked(
        """
        import importlib, pkgutil
        import anoclip.runtime as runtime
        names = [m.name for m in pkgutil.iter_modules(runtime.__path__, "anoclip.runtime.")]
        for name in names:
            importlib.import_module(name)
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("blocker failed")
        leaked = [m for m in sys.modules if m.split(".")[0] in Block.blocked]
        assert not leaked, leaked
        print(len(names))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) >= 8


def test_detector_and_cli_predict_without_torch(tiny_artifacts, tmp_path):
    import cv2
    import numpy as np

    image = tmp_path / "img.png"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 256, (70, 70, 3), dtype=np.uint8))
    proc = run_blocked(
        """
        import json
        from anoclip.runtime.detector import Detector
        detector = Detector.load(sys.argv[1], backend="auto")
        result = detector.predict(sys.argv[2], "bottle")
        print(json.dumps({"score": result.score, "shape": list(result.anomaly_map.shape)}))
        """,
        str(tiny_artifacts), str(image),
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert 0 < out["score"] < 1 and out["shape"] == [48, 48]
    proc = run_blocked(
        "from anoclip.runtime.cli import main; sys.argv[0] = 'anoclip'; main()",
        "predict", "--artifacts", str(tiny_artifacts), "--class", "carpet", "--out", str(tmp_path / "o"), str(image),
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "o" / "results.jsonl").read_text())
    assert Path(record["map"]) == tmp_path / "o" / record["run"] / "img_map.npy" and Path(record["map"]).is_file()


def test_export_subcommand_without_torch_says_what_to_install():
    proc = run_blocked("from anoclip.runtime.cli import main; sys.argv[0] = 'anoclip'; main()", "export", "--help")
    assert proc.returncode == 1
    assert "needs torch" in proc.stderr and "pip install 'anoclip[export]'" in proc.stderr and "Traceback" not in proc.stderr


def test_benchmarks_import_without_torch():
    """bench, eval, metrics and the latency scripts run on a device with only the runtime installed."""
    proc = run_blocked(
        """
        import importlib, pkgutil
        import anoclip.benchmarks as benchmarks
        names = [m.name for m in pkgutil.walk_packages(benchmarks.__path__, "anoclip.benchmarks.")]
        for name in names:
            importlib.import_module(name)
        leaked = [m for m in sys.modules if m.split(".")[0] in Block.blocked]
        assert not leaked, leaked
        print(len(names))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) >= 8


def test_bench_cli_without_torch(tiny_artifacts):
    proc = run_blocked(
        "from anoclip.runtime.cli import main; sys.argv[0] = 'anoclip'; main()",
        "bench", "--artifacts", str(tiny_artifacts), "--runs", "3", "--warmup", "0", "--image-size", "32",
        "--backends", "cpu", "--json",
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["rows"]
    assert {r["status"].split(":")[0] for r in rows} == {"ok", "skipped"}  # int8, fp16, fused: not made
    assert all(r["status"] == "ok" for r in rows if r["precision"] == "fp32" and "fused" not in r["name"])
