"""What this machine's GPU can run of the anoclip GPU path, in one table and a few minutes.

    python -m anoclip.benchmarks.device_check [--budget 270] [--runs 20] [--keep DIR] [--json]

It exports ViT-B-16-plus-240 with random weights itself (needs torch + open_clip; ``--keep DIR``
reuses or keeps that export), then times, on batch 1, whatever is installed:

* torch eager on CUDA, fp32 and fp16 autocast: export's PyTorch V-V module (the reference);
* onnxruntime with the CUDA and the TensorRT execution providers (onnxruntime-gpu);
* the native TensorRT backend (tensorrt + cuda-python), after building its engine;
* the TTA adapter loop on cupy arrays (GPU) and on numpy (CPU, the baseline).

Every row says ok (mean and median ms) or why it was skipped; a row that fails says so and the
others still run. Rows that would start after ``--budget`` seconds are skipped. The exit code is 1
when a row that could run failed, else 0: a row skipped for a missing library, a missing GPU or the
time budget is not a failure (without a CUDA GPU every GPU row is skipped and the exit code is 0).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

BACKBONE = "ViT-B-16-plus-240"


@dataclass
class Row:
    name: str
    status: str  # "ok", "skipped: why" or "failed: why"
    mean_ms: float | None = None
    p50_ms: float | None = None
    note: str = ""


class Check:
    def __init__(self, budget_s: float, runs: int):
        self.deadline = time.monotonic() + budget_s
        self.runs = runs
        self.rows: list[Row] = []

    def skip(self, name: str, why: str) -> None:
        self.rows.append(Row(name, f"skipped: {why}"))

    def row(self, name: str, make: Callable[[], tuple[Callable[[], object], Callable[[], None], str]]) -> None:
        """``make()`` -> (run once, wait for the device, note); a SkipRow it raises skips the row."""
        if time.monotonic() > self.deadline:
            return self.skip(name, "time budget spent")
        try:
            run, sync, note = make()
            times = self.time(run, sync)
            self.rows.append(Row(name, "ok", statistics.fmean(times), statistics.median(times), note))
        except SkipRow as exc:
            self.skip(name, str(exc))
        except Exception as exc:  # noqa: BLE001 - a report: say what failed and carry on
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            self.rows.append(Row(name, f"failed: {type(exc).__name__}: {first}"[:160]))
            traceback.print_exc(file=sys.stderr)

    def time(self, run, sync) -> list[float]:
        for _ in range(3):
            run()
        sync()
        times = []
        for _ in range(self.runs):
            start = time.perf_counter()
            run()
            sync()
            times.append((time.perf_counter() - start) * 1e3)
            if time.monotonic() > self.deadline:
                break
        return times


class SkipRow(Exception):
    pass


def _import(name: str, install: str):
    try:
        return __import__(name, fromlist=["_"])
    except ImportError as exc:
        raise SkipRow(f"{name} not installed ({install})") from exc
    except Exception as exc:  # noqa: BLE001 - e.g. a CUDA library of the wrong version
        raise SkipRow(f"{name} does not import: {str(exc).splitlines()[0][:100]}") from exc


def _cuda_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def export_model(keep: str | None) -> tuple[Path | None, str]:
    """The export folder (made here unless ``keep`` holds one) and a note, or (None, why)."""
    folder = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="anoclip-device-check-"))
    if (folder / "manifest.json").is_file():
        return folder, f"reused {folder}"
    try:
        from anoclip.export.cli import export_command
    except ImportError as exc:
        return None, f"export needs torch and open_clip ({exc})"
    start = time.monotonic()
    export_command.main(["--backbone", BACKBONE, "--pretrained", "none", "--classes", "bottle", "--dynamic-batch",
                         "--no-check", "--out", str(folder)], standalone_mode=False)
    return folder, f"{time.monotonic() - start:.0f} s, {folder}"


def check_torch(check: Check, torch) -> None:
    def make(half: bool):
        def build():
            from anoclip.benchmarks.latency.eager import load_reference
            from anoclip.export.vv import VVVisual

            module = VVVisual(load_reference(BACKBONE, "none").model.visual).cuda().eval()
            image = torch.randn(1, 3, *module.geometry.image_size, device="cuda")

            def run():
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=half):
                    return module(image)

            return run, torch.cuda.synchronize, torch.cuda.get_device_name(0)
        return build

    check.row("torch eager CUDA fp32 (V-V reference)", make(False))
    check.row("torch eager CUDA fp16 autocast", make(True))


def check_backends(check: Check, folder: Path | None, why: str) -> None:
    from anoclip.runtime.artifacts import load_artifacts
    from anoclip.runtime.backends import create_backend
    from anoclip.runtime.vocabulary import VISUAL

    names = [("onnxruntime CUDA EP", "cuda"), ("onnxruntime TensorRT EP", "tensorrt"),
             ("TensorRT native", "tensorrt-native")]
    if folder is None:
        for name, _ in names:
            check.skip(name, why)
        return
    artifacts = load_artifacts(folder, load_thresholds=False)
    image = np.random.default_rng(0).standard_normal((1, 3, *artifacts.manifest.image_size)).astype(np.float32)

    def make(backend: str):
        def build():
            import onnxruntime as ort

            loaded, precision = artifacts, "fp32"
            if backend == "tensorrt-native":
                trt = _import("tensorrt", "pip install tensorrt")
                try:
                    from cuda.bindings import runtime  # noqa: F401
                except ImportError:
                    _import("cuda.cudart", "pip install cuda-python")
                from anoclip.calibration.engine import build_engine
                from anoclip.runtime.engine import BatchProfile
                from anoclip.runtime.gpu import release

                # fp16 needs the fp16 model on TensorRT 11 (no weakly typed fallback there)
                fp16 = "visual_fp16" in artifacts.manifest.models or release(trt.__version__)[0] == 10
                start = time.monotonic()
                result = build_engine(folder, "fp16" if fp16 else "fp32", batch=BatchProfile(1, 1, 4), parity=2)
                cosine = result.sidecar.parity.get("patch_embeds_min_cosine", "n/a")
                note = (f"{result.sidecar.precision} engine built in {time.monotonic() - start:.0f} s, parity min "
                        f"cosine {cosine}")
                precision = result.sidecar.precision
                loaded = load_artifacts(folder, load_thresholds=False)  # its manifest names the new engine
            else:
                provider = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}[backend]
                if provider not in ort.get_available_providers():
                    raise SkipRow(f"onnxruntime {ort.__version__} has no {provider} (install onnxruntime-gpu)")
                note = ""
            start = time.monotonic()
            runner = create_backend(loaded, VISUAL, backend, precision=precision)
            runner.run(image)
            note = note or f"first run {time.monotonic() - start:.1f} s (TensorRT EP: engine build)"
            return (lambda: runner.run(image)), (lambda: None), f"{runner.describe()}; {note}"
        return build

    for name, backend in names:
        check.row(name, make(backend))


def check_tta(check: Check, folder: Path | None) -> None:
    from anoclip.runtime.tta import TTAAdapter, TTAConfig

    if folder is not None:
        from anoclip.runtime.artifacts import load_artifacts

        artifacts = load_artifacts(folder, load_thresholds=False)
        prompts = artifacts.prompts.get("bottle")
        T, tf, M = prompts.prompt_features, prompts.text_features, artifacts.manifest.num_patches
    else:  # ViT-B-16-plus-240's sizes, random prompts
        rng = np.random.default_rng(0)
        T, tf, M = rng.standard_normal((40, 640)), rng.standard_normal((2, 640)), 225
    T, tf = np.asarray(T, np.float32), np.asarray(tf, np.float32)
    P = np.random.default_rng(1).standard_normal((M, tf.shape[1])).astype(np.float32)

    def numpy_loop():
        adapter = TTAAdapter(T, tf, TTAConfig())
        return (lambda: adapter.adapt(P)), (lambda: None), f"M={M}, C={tf.shape[1]}, 2N={T.shape[0]}, 5 steps"

    def cupy_loop():
        cp = _import("cupy", "pip install cupy-cuda12x")
        adapter = TTAAdapter(cp.asarray(T), cp.asarray(tf), TTAConfig())
        P_gpu = cp.asarray(P)
        return (lambda: adapter.adapt(P_gpu)), cp.cuda.Device().synchronize, f"cupy {cp.__version__}"

    check.row("TTA loop, numpy (CPU)", numpy_loop)
    if _cuda_torch() is None and _probe() is None:
        check.skip("TTA loop, cupy (GPU)", "no CUDA GPU")
    else:
        check.row("TTA loop, cupy (GPU)", cupy_loop)


def _probe():
    from anoclip.runtime.gpu import probe_gpu

    return probe_gpu(0)


def format_table(rows: list[Row]) -> str:
    width = max(len(r.name) for r in rows)
    lines = [f"{'row':<{width}}  {'mean ms':>9}  {'p50 ms':>9}  status / note", "-" * (width + 40)]
    for r in rows:
        mean = f"{r.mean_ms:9.2f}" if r.mean_ms is not None else f"{'-':>9}"
        p50 = f"{r.p50_ms:9.2f}" if r.p50_ms is not None else f"{'-':>9}"
        lines.append(f"{r.name:<{width}}  {mean}  {p50}  {r.status}{'; ' + r.note if r.note else ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=270.0, help="Seconds after which no new row starts.")
    parser.add_argument("--runs", type=int, default=20, help="Timed runs per row (after 3 warm-up runs).")
    parser.add_argument("--keep", default=None, help="Folder for the export: reused if it holds one, kept after.")
    parser.add_argument("--json", action="store_true", help="Print the rows as JSON after the table.")
    args = parser.parse_args(argv)
    check = Check(args.budget, args.runs)
    gpu, torch = _probe(), _cuda_torch()
    gpu_rows = ["export ViT-B-16-plus-240 (random weights)", "torch eager CUDA fp32 (V-V reference)",
                "torch eager CUDA fp16 autocast", "onnxruntime CUDA EP", "onnxruntime TensorRT EP",
                "TensorRT native"]
    if gpu is None and torch is None:
        for name in gpu_rows:
            check.skip(name, "no CUDA GPU (no NVIDIA driver or no device)")
        folder = None
    else:
        try:
            folder, note = export_model(args.keep)
            status = "ok" if folder else f"skipped: {note}"
        except Exception as exc:  # noqa: BLE001
            folder, note = None, f"export failed: {str(exc).splitlines()[0][:120]}"
            status = f"failed: {note}"
            traceback.print_exc(file=sys.stderr)
        check.rows.append(Row(gpu_rows[0], status, note=note if folder else ""))
        if torch is None:
            check.skip(gpu_rows[1], "torch without CUDA")
            check.skip(gpu_rows[2], "torch without CUDA")
        else:
            check_torch(check, torch)
        check_backends(check, folder, note)
    check_tta(check, folder)
    if folder is not None and not args.keep:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    print(f"device check: GPU {gpu or (torch.cuda.get_device_name(0) if torch else 'none')}")
    print(format_table(check.rows))
    if args.json:
        print(json.dumps([asdict(r) for r in check.rows], indent=2))
    return exit_status(check.rows)


def exit_status(rows: list[Row]) -> int:
    """1 when a row that could run failed (skips are not failures), else 0; the failures named on stderr."""
    failed = [r.name for r in rows if r.status.startswith("failed")]
    if failed:
        print(f"device check: {len(failed)} row(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
