"""CI's compatibility stage: the tests that depend on a library, rerun against other releases of it.

The main run (.ci/run) is the README's test command: the newest releases pip resolves today. This stage then
checks what setup.py declares, around it:

- in the main venv, one library at a time: the exact versions of .ci/constraints.txt (the "pinned" row: the set
  the suite last ran green with, so a red main run with a green pinned row points at an upstream release), the
  oldest release setup.py declares of transformers, diffusers and openai, and BAGEL's and OmniGen2's
  transformers pins for the model bindings; each row leaves the pinned set installed for the next;
- in venvs of their own: torch 2.15.0 (the newest release) with the triton it brings, torch 2.5.1 on Python 3.10
  (the oldest declared torch; BAGEL's pin), and triton 3.6.0, 3.4.0 and 3.2.0 over the main run's torch.

A failing row fails CI unless setup.py's range excludes that version. Prints a table of rows x result at the end.

    python .ci/compat.py [--only NAME ...] [--list]
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / ".ci" / "constraints.txt"
DIST = "dar-attention"

# transformers rows: its binding, compile, and the pipeline whose text encoder is a transformers model.
TRANSFORMERS_TESTS = ["tests/bindings/test_transformers.py", "tests/core/test_compile.py",
                      "tests/bindings/test_diffusers_pipeline_qwen_edit.py"]
DIFFUSERS_TESTS = ["tests/bindings/test_diffusers*.py", "tests/parallel/test_diffusers.py",
                   "tests/core/test_compile.py"]
MODEL_TESTS = ["tests/bindings/test_bagel.py", "tests/bindings/test_omnigen2.py", "tests/varlen/test_*.py"]
JUDGE_TESTS = ["tests/eval/test_eval_judges.py", "tests/eval/test_eval_secrets.py"]
# The pinned row: every test whose outcome depends on a library other than torch / triton (which the README
# pins, so the main run and this row share them).
PINNED_TESTS = sorted({*TRANSFORMERS_TESTS, *DIFFUSERS_TESTS, *MODEL_TESTS, "tests/eval",
                       "tests/bindings/test_recorder.py", *(f"tests/tooling/test_{name}.py" for name in
                                                            ("demo", "examples", "cli", "packaging"))})
# The newest torch: the core, the backends, the kernels (interpreter), flex, compile (a compiled diffusers
# transformer included), varlen and the bindings that need no torchvision (no torchvision release for it is on
# this disk, and the index's builds of it want the CUDA torch). Left to the main run: what does not depend on
# torch's release (the fuzzing, the benchmark harness, packaging and the node-pack entry, the CLI, the demo and
# examples).
NEW_TORCH_TESTS = ["tests/core/test_*.py", "tests/backends/test_*.py", "tests/kernels/test_*.py",
                   "tests/varlen/test_*.py", "tests/bindings/test_*.py", "tests/tooling/test_first_use.py",
                   *(f"!tests/{name}" for name in ("bindings/test_diffusers_*.py", "bindings/test_recorder.py",
                                                  "bindings/test_comfyui_pack.py", "core/test_fuzz_oracle.py"))]
# The oldest torch cannot run the kernels (its triton is too old): the core, varlen and model bindings.
OLD_TORCH_TESTS = ["tests/core/test_semantics.py", "tests/core/test_validation.py",
                   "tests/core/test_sampling_and_plan.py", "tests/core/test_compile.py",
                   "tests/backends/test_availability.py", *MODEL_TESTS]


@dataclass
class Row:
    name: str
    package: str
    version: str  # "oldest" (setup.py's lower bound), "constraints" or an exact release
    tests: list[str]
    why: str
    venv: dict | None = None  # for torch rows: python, pip requirements
    also: tuple[str, ...] = ()  # requirements installed with the package (pip resolves them together)
    without: tuple[str, ...] = ()  # distributions uninstalled for this row (not pinned, so not put back)
    result: str = "not run"
    detail: str = ""
    seconds: float = 0.0
    resolved: str = ""
    fatal: bool = True
    # pytest-xdist workers: the kernel-heavy rows run the Triton interpreter, one core per process; two workers
    # take about 2/3 of the time on the 2 cores CI has (the rows' tests share no files or ports).
    workers: int = 1
    counts: dict = field(default_factory=dict)


ROWS = [
    # The newest releases are the main run's; this row is the set the suite last ran green with.
    Row("pinned", "(pinned set)", "constraints", PINNED_TESTS, ".ci/constraints.txt, exact versions"),
    # Without `kernels`: the main run's transformers (>= 5.25) pulled it in, and transformers 5.0 imports it when
    # present and fails against its 0.19 API; pip never installs it beside 5.0, so neither does this row.
    Row("transformers-oldest", "transformers", "oldest", TRANSFORMERS_TESTS, "oldest release setup.py declares",
        without=("kernels",)),
    Row("diffusers-oldest", "diffusers", "oldest", DIFFUSERS_TESTS, "oldest release setup.py declares"),
    # transformers 4.x pins huggingface_hub < 1.0, which diffusers >= 0.40 cannot import with: pip picks the
    # newest diffusers within our range that installs beside it, as it would in those models' environments.
    Row("transformers-4.49.0", "transformers", "4.49.0", MODEL_TESTS, "BAGEL's pinned environment",
        also=("diffusers>=0.38",)),
    Row("transformers-4.51.3", "transformers", "4.51.3", MODEL_TESTS, "OmniGen2's pinned environment",
        also=("diffusers>=0.38",)),
    Row("openai-oldest", "openai", "oldest", JUDGE_TESTS, "oldest release setup.py declares"),
    Row("torch-2.15.0", "torch", "2.15.0", NEW_TORCH_TESTS, "newest torch release, with the triton it brings",
        venv=dict(python=sys.executable, first=["torch==2.15.0"], extras="test,diffusers,transformers",
                  constrain=True, uncapped=True), workers=2),
    Row("torch-2.5.1", "torch", "2.5.1", OLD_TORCH_TESTS, "oldest declared torch (BAGEL's pin), Python 3.10",
        venv=dict(python="python3.10", first=["torch==2.5.1"], extras=None,
                  plain=["einops", "pytest", "hypothesis", "pytest-benchmark", "transformers==4.49.0"],
                  constrain=False)),
]


# The fused kernels on the Tritons users have (dar.kernels.features; issue 20): the kernel tests under the
# interpreter, against the oracle and the reference backend, and the static targets compiled for sm_90a and
# sm_80 with that Triton. numpy < 2.4: the interpreter before Triton 3.7 turns one-element arrays into ints,
# which numpy 2.4 made an error (docs/kernels.md).
KERNEL_TESTS = ["tests/kernels/test_*.py", "tests/backends/test_triton.py", "tests/varlen/test_triton.py",
                "tests/backends/test_availability.py"]
# Each row is a venv over the main run's packages (torch 2.14.1, the project) with that triton on top: torch's
# own pairing (2.11.0 / 2.8.0 / 2.6.0) brings several GB of CUDA wheels from the index, measured at over 10
# minutes per row here, which the 45-minute CI budget cannot hold for three rows. The kernels import only
# torch and triton, and these tests exercise triton's compiler and interpreter, not torch's.
ROWS += [
    Row(f"triton-{version}", "triton", version, KERNEL_TESTS, why,
        venv=dict(python=sys.executable, overlay=[f"triton=={version}", "numpy<2.4"]), workers=2)
    for version, why in (("3.6.0", "the lent GPU machine's triton (torch 2.11.0 there; 2.14.1 here, Python 3.11)"),
                         ("3.4.0", "the first triton with host TMA descriptors (torch 2.8.0's; 2.14.1 here)"),
                         ("3.2.0", "OmniGen2's pin, pointer loads only (torch 2.6.0's; 2.14.1 here)"))
]


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, **kw)


def pip(python: str, *args: str, uncapped: bool = False) -> None:
    # uncapped: these machines' pip configuration caps torch at the newest release on their disk; a row for a
    # newer torch replaces that constraints file with an empty one (the command line's -c files still apply).
    env = dict(os.environ, PIP_CONSTRAINT=os.devnull) if uncapped else None
    res = sh([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = [ln for ln in res.stdout.splitlines() if "is ignored: it is neither a file nor a directory" not in ln]
    if lines:
        print("\n".join(lines[-20:]))
    if res.returncode:
        raise RuntimeError(f"pip install {' '.join(args)} failed")


def declared(package: str) -> Requirement | None:
    """The requirement on ``package`` that setup.py declares (install_requires or an extra)."""
    for text in importlib.metadata.requires(DIST) or ():
        req = Requirement(text)
        if req.name.lower() == package.lower() and req.specifier:
            return req
    return None


def oldest(package: str) -> str:
    req = declared(package)
    lows = [s.version for s in (req.specifier if req else ()) if s.operator in (">=", "==", "~=")]
    if not lows:
        raise RuntimeError(f"setup.py declares no lower bound for {package}")
    return min(lows, key=Version)


def allowed(package: str, version: str) -> bool:
    req = declared(package)
    return req is None or req.specifier.contains(version, prereleases=True)


def expand(patterns: list[str]) -> list[str]:
    """The test files the patterns name: ``!pattern`` takes files out, except those a plain pattern names
    exactly (without wildcards)."""
    exact = {str(ROOT / p) for p in patterns if not p.startswith("!") and not glob.has_magic(p)}
    files = {f for p in patterns if not p.startswith("!") for f in glob.glob(str(ROOT / p))}
    files -= {f for p in patterns if p.startswith("!") for f in glob.glob(str(ROOT / p[1:]))} - exact
    if not files:
        raise RuntimeError(f"no test file matches {patterns}")
    return [os.path.relpath(f, ROOT) for f in sorted(files)]


def run_tests(python: str, files: list[str], row: Row) -> bool:
    env = dict(os.environ, TRITON_INTERPRET="1", HYPOTHESIS_PROFILE="ci", MPLBACKEND="Agg")
    xdist = ["-n", str(row.workers)] if row.workers > 1 else []
    res = sh([python, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", "-o", "addopts=", *xdist], cwd=ROOT,
             env=env,
             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail = res.stdout.strip().splitlines()
    summary = tail[-1] if tail else ""
    for n, what in re.findall(r"(\d+) (passed|failed|errors?|skipped)", summary):
        row.counts[what] = int(n)
    row.detail = summary.strip("= ")
    if res.returncode:
        print("\n".join(tail[-60:]))
    return res.returncode == 0 and row.counts.get("passed", 0) > 0


def check_import(python: str, package: str, version: str) -> None:
    mod = {"pytorch": "torch"}.get(package, package)
    got = subprocess.run([python, "-c", f"import {mod}; print({mod}.__version__)"], capture_output=True, text=True)
    found = got.stdout.strip().split("+")[0]
    if got.returncode or Version(found) != Version(version):
        raise RuntimeError(f"{package} {version} does not import as installed: {got.stderr.strip()[-500:] or found}")


def pinned_row(row: Row) -> None:
    files = expand(row.tests)
    pip(sys.executable, "-r", str(CONSTRAINTS))
    row.resolved = "constraints"
    row.result = "passed" if run_tests(sys.executable, files, row) else "FAILED"


def library_row(row: Row) -> None:
    version = oldest(row.package) if row.version == "oldest" else row.version
    row.resolved = version
    row.fatal = allowed(row.package, version) or row.version != "oldest"
    files = expand(row.tests)
    try:
        if row.without:
            sh([sys.executable, "-m", "pip", "uninstall", "-y", "-q", *row.without], check=True)
        try:
            pip(sys.executable, f"{row.package}=={version}", *row.also, "-c", str(_torch_pins()))
        except RuntimeError as exc:
            # A brand-new release can require a dependency release this index does not have yet; the package
            # itself is then tested with the dependencies already installed, and the table says so.
            pip(sys.executable, "--no-deps", f"{row.package}=={version}")
            row.resolved += " (no-deps)"
            print(f"note: {exc}; installed {row.package} {version} without its dependencies", flush=True)
        check_import(sys.executable, row.package, version)
        for req in row.also:
            name = Requirement(req).name
            got = subprocess.run([sys.executable, "-c", f"import {name}; print({name}.__version__)"],
                                 capture_output=True, text=True)
            row.resolved += f" + {name} {got.stdout.strip() or 'not importable'}"
        ok = run_tests(sys.executable, files, row)
    finally:  # back to the pinned set for the next row
        pip(sys.executable, "-r", str(CONSTRAINTS))
    row.result = "passed" if ok else "FAILED"


_PINS: Path | None = None


def _torch_pins() -> Path:
    """A constraints file that holds torch, torchvision and triton where the main run put them."""
    global _PINS
    if _PINS is None:
        keep = [ln for ln in CONSTRAINTS.read_text().splitlines()
                if re.match(r"(torch|torchvision|triton|nvidia-[\w-]+)==", ln)]
        _PINS = Path(tempfile.mkdtemp()) / "torch-pins.txt"
        _PINS.write_text("\n".join(keep) + "\n")
    return _PINS


def find_python(name: str) -> str:
    """An interpreter that runs: ``name`` on PATH, else a pyenv installation of it (pyenv's shim refuses a
    version that is installed but not selected)."""
    if name == sys.executable:
        return name
    version = name.removeprefix("python")
    candidates = [shutil.which(name), *sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}*/bin/{name}")))]
    for python in filter(None, candidates):
        if subprocess.run([python, "--version"], capture_output=True).returncode == 0:
            return python
    raise RuntimeError(f"{name} is not on this machine")


def torch_row(row: Row) -> None:
    spec = row.venv
    row.resolved = row.version
    python = find_python(spec["python"])
    venv = Path(tempfile.mkdtemp()) / "venv"
    sh([python, "-m", "venv", str(venv)], check=True)
    vpy = str(venv / "bin" / "python")
    if spec.get("overlay"):
        # Over the main run's packages: its site-packages (torch, the editable project) come after the venv's
        # own, where the overlay's releases go, installed without their dependencies.
        purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
        mine = subprocess.run([vpy, "-c", purelib], capture_output=True, text=True, check=True).stdout.strip()
        base = subprocess.run([sys.executable, "-c", purelib], capture_output=True, text=True, check=True).stdout.strip()
        Path(mine, "zz_main_run.pth").write_text(f"import site; site.addsitedir({base!r})\n")
        pip(vpy, "--no-deps", *spec["overlay"])
        check_import(vpy, row.package, row.version)
        ok = run_tests(vpy, expand(row.tests), row)
        row.result = "passed" if ok else "FAILED"
        shutil.rmtree(venv.parent, ignore_errors=True)
        return
    # An older Python's bundled pip/setuptools install editable projects the legacy way, which cannot map
    # kernels/ and bindings/ onto dar.kernels / dar.bindings.
    uncapped = spec.get("uncapped", False)
    pip(vpy, "-U", "pip", "setuptools")
    pip(vpy, *spec["first"], uncapped=uncapped)
    if spec["extras"]:
        # The pinned set, less what this torch brings itself (torch, torchvision, triton and CUDA libraries).
        others = [ln for ln in CONSTRAINTS.read_text().splitlines()
                  if ln and not ln.startswith("#")
                  and not re.match(r"(torch|torchvision|triton|nvidia-[\w-]+|cuda-[\w-]+)==", ln)]
        pins = venv / "pins.txt"
        pins.write_text("\n".join(others + [f"torch=={row.version}"] + [r for r in spec["first"] if "==" in r]) + "\n")
        pip(vpy, "-c", str(pins), "-e", f"{ROOT}[{spec['extras']}]", uncapped=uncapped)
    else:
        pip(vpy, *spec["plain"])
        pip(vpy, "--no-deps", "-e", str(ROOT))
    check_import(vpy, "torch", row.version)
    files = expand(row.tests)
    ok = run_tests(vpy, files, row)
    row.result = "passed" if ok else "FAILED"
    shutil.rmtree(venv.parent, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--only", nargs="*", default=None, help="run only these rows (names from --list)")
    ap.add_argument("--list", action="store_true", help="list the rows and exit")
    args = ap.parse_args(argv)
    if args.list:
        for row in ROWS:
            print(f"{row.name:<22} {row.why}")
        return 0
    rows = [r for r in ROWS if args.only is None or r.name in args.only]
    unknown = set(args.only or ()) - {r.name for r in ROWS}
    if unknown:
        ap.error(f"unknown rows: {sorted(unknown)}")
    for row in rows:
        print(f"\n=== compatibility: {row.name} ({row.why})", flush=True)
        start = time.monotonic()
        try:
            (torch_row if row.venv else pinned_row if row.name == "pinned" else library_row)(row)
        except Exception as exc:  # a row that cannot even install counts as failed, with the reason
            row.result, row.detail = "FAILED", f"{type(exc).__name__}: {exc}"
        row.seconds = time.monotonic() - start
    print("\nCompatibility stage (tests rerun against other releases):\n")
    print(f"| {'row':<22} | {'package':<12} | {'version':<10} | {'result':<9} | {'time':>6} | tests |")
    print(f"|{'-' * 24}|{'-' * 14}|{'-' * 12}|{'-' * 11}|{'-' * 8}|-------|")
    failed = []
    for r in rows:
        result = r.result if r.fatal else f"{r.result} (excluded by setup.py)"
        print(f"| {r.name:<22} | {r.package:<12} | {r.resolved:<10} | {result:<9} | {r.seconds:5.0f}s | {r.detail} |")
        if r.result != "passed" and r.fatal:
            failed.append(r.name)
    if failed:
        print(f"\ncompatibility stage FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
