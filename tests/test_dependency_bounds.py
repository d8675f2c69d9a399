"""The version bounds in setup.cfg against what the code calls and what is installed here."""

from __future__ import annotations

import configparser
import io
import re
import tokenize
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("runtime", "benchmarks", "calibration", "export", "tests")
LOWER_OPS = (">=", ">", "==", "~=", "===")

# Public NumPy names and the first release that has them (NumPy 2.0 for the array-API names).
NUMPY_SINCE = {name: "2.0" for name in (
    "trapezoid", "concat", "isdtype", "unstack", "permute_dims", "matrix_transpose", "vecdot",
    "vecmat", "matvec", "cumulative_sum", "cumulative_prod", "astype", "pow", "acos", "acosh",
    "asin", "asinh", "atan", "atanh", "atan2", "bitwise_left_shift", "bitwise_right_shift",
    "bitwise_invert", "unique_all", "unique_counts", "unique_inverse", "unique_values", "long",
    "ulong", "bool", "strings",
)}
NUMPY_SINCE.update({"exceptions": "1.25", "dtypes": "1.25"})
NUMPY_LINALG_SINCE = {name: "2.0" for name in (
    "vector_norm", "matrix_norm", "vecdot", "matrix_transpose", "svdvals", "diagonal", "trace", "outer",
    "cross",
)}
_NUMPY_NAME = re.compile(r"\b(?:np|numpy) \. (?!linalg \.)(\w+)\b")
_NUMPY_LINALG_NAME = re.compile(r"\b(?:np|numpy) \. linalg \. (\w+)\b")
_ASARRAY_COPY = re.compile(r"\b(?:np|numpy) \. asarray \([^)]*\bcopy =")


def _requirements() -> dict[str, list[Requirement]]:
    """Requirements of setup.cfg by group: "install" and each extra."""
    config = configparser.ConfigParser(interpolation=None)
    config.read(ROOT / "setup.cfg")
    groups = {"install": config["options"]["install_requires"]}
    groups.update(config["options.extras_require"])
    return {group: [Requirement(line) for line in text.splitlines() if line.strip()]
            for group, text in groups.items()}


def _requirement(name: str) -> Requirement:
    for reqs in _requirements().values():
        for req in reqs:
            if req.name.lower().replace("_", "-") == name:
                return req
    raise AssertionError(f"{name} is not in setup.cfg")


def _lower_bound(req: Requirement) -> Version | None:
    lows = [Version(s.version) for s in req.specifier if s.operator in LOWER_OPS]
    return max(lows) if lows else None


def _source(path: str) -> str:
    return (ROOT / path).read_text()


def _code_tokens(text: str) -> str:
    """The tokens of ``text`` separated by spaces, without comments and string literals."""
    skip = {tokenize.COMMENT, tokenize.STRING, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}
    tokens = tokenize.generate_tokens(io.StringIO(text).readline)
    return " ".join(tok.string for tok in tokens if tok.type not in skip and tok.string)


def numpy_needs(text: str) -> dict[str, Version]:
    """NumPy names used in the code ``text`` that not every NumPy 1.x has, with the release that
    added them. Comments and strings do not count, so neither does a shim such as
    ``getattr(np, "name", None) or np.old_name``."""
    text = _code_tokens(text)
    found = {}
    for match in _NUMPY_NAME.finditer(text):
        if match.group(1) in NUMPY_SINCE:
            found[f"np.{match.group(1)}"] = Version(NUMPY_SINCE[match.group(1)])
    for match in _NUMPY_LINALG_NAME.finditer(text):
        if match.group(1) in NUMPY_LINALG_SINCE:
            found[f"np.linalg.{match.group(1)}"] = Version(NUMPY_LINALG_SINCE[match.group(1)])
    if _ASARRAY_COPY.search(text):
        found["np.asarray(copy=)"] = Version("2.0")
    return found


def test_numpy_scanner_flags_direct_calls_and_skips_the_shim():
    assert numpy_needs("area = np.trapezoid(y, x)") == {"np.trapezoid": Version("2.0")}
    assert numpy_needs("np.asarray(a, copy=False)") == {"np.asarray(copy=)": Version("2.0")}
    assert numpy_needs("m = x.dtype == np.bool") == {"np.bool": Version("2.0")}
    assert numpy_needs('f = getattr(np, "trapezoid", None) or np.trapz; b = np.bool_; np.linalg.norm(a)') == {}


def test_numpy_lower_bound_admits_no_release_without_the_numpy_api_the_code_uses():
    lower = _lower_bound(_requirement("numpy"))
    uses: dict[str, tuple[Version, str]] = {}
    this_file = Path(__file__).resolve()
    for folder in SOURCE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.resolve() == this_file:
                continue
            for name, since in numpy_needs(path.read_text()).items():
                uses[name] = (since, str(path.relative_to(ROOT)))
    too_new = {name: f"{since} ({where})" for name, (since, where) in uses.items() if since > lower}
    assert not too_new, f"setup.cfg allows numpy {lower}, but the code uses names added later: {too_new}"


def test_torch_lower_bound_has_the_dynamo_exporter_the_export_uses():
    text = _source("export/onnx_export.py")
    needed = Version("0")
    if "dynamo=True" in text:
        needed = max(needed, Version("2.6"))  # optimize= and the ONNXProgram return value
        opset = int(re.search(r"^DEFAULT_OPSET = (\d+)", text, re.M).group(1))
        if opset < 18:
            needed = max(needed, Version("2.9"))  # first torch to convert its opset-18 graph down
        if "dynamic_shapes" in text:
            needed = max(needed, Version("2.10"))  # 2.9 fixes a size-1 example batch axis at 1
    lower = _lower_bound(_requirement("torch"))
    assert lower is not None and lower >= needed, f"torch>={lower} in setup.cfg; export/onnx_export.py needs {needed}"


def test_torchvision_lower_bound_is_the_release_paired_with_torch():
    torch_low, vision_low = _lower_bound(_requirement("torch")), _lower_bound(_requirement("torchvision"))
    assert (vision_low.major, vision_low.minor) == (0, torch_low.minor + 15), (torch_low, vision_low)


def test_onnxscript_lower_bound_has_the_api_module_torch_imports():
    if _lower_bound(_requirement("torch")) >= Version("2.9"):
        # torch >= 2.9 imports onnxscript._framework_apis.torch_2_9, first shipped in onnxscript 0.4,
        # which itself needs onnx >= 1.16.
        assert _lower_bound(_requirement("onnxscript")) >= Version("0.4")
        assert _lower_bound(_requirement("onnx")) >= Version("1.16")


def test_open_clip_has_an_upper_bound_while_vv_needs_multihead_attention():
    if "nn.MultiheadAttention" not in _source("export/vv.py"):
        pytest.skip("export/vv.py no longer relies on nn.MultiheadAttention")
    spec = _requirement("open-clip-torch").specifier
    assert spec.contains("3.3.0"), "the tested open_clip release must stay allowed"
    assert not spec.contains("3.4.0", prereleases=True), (
        f"open_clip_torch{spec} admits 3.4, whose ViT blocks no longer use nn.MultiheadAttention")


def test_open_clip_lower_bound_has_the_calls_the_export_makes():
    text = _source("export/model.py") + _source("export/cli.py")
    needed = Version("0")
    if "open_clip.__version__" in text:
        needed = max(needed, Version("2.26.1"))
    if re.search(r"load_checkpoint\([^)]*weights_only=", text):
        needed = max(needed, Version("2.27"))
    if "prefer_hf_hub=" in text:
        needed = max(needed, Version("2.29"))
    lower = _lower_bound(_requirement("open-clip-torch"))
    assert lower is not None and lower >= needed, f"open_clip_torch>={lower} in setup.cfg; the export needs {needed}"


def test_every_requirement_has_a_lower_bound():
    missing = [f"{group}: {req}" for group, reqs in _requirements().items() for req in reqs
               if _lower_bound(req) is None]
    assert not missing, missing


def test_installed_versions_satisfy_every_bound():
    checked, wrong = [], []
    for group, reqs in _requirements().items():
        for req in reqs:
            try:
                installed = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                assert group != "install", f"runtime requirement {req.name} is not installed"
                continue
            checked.append(req.name)
            if not req.specifier.contains(installed, prereleases=True):
                wrong.append(f"{req.name} {installed} is outside {req.specifier} ({group})")
    assert checked and not wrong, wrong
