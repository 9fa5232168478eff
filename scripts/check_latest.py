"""Try the newest releases of skingen's dependencies in a fresh virtual environment.

Builds ``VENV`` from scratch (CPU torch as in the lock), installs the newest release of every package that
``requirements.txt`` allows (``--no-upper-bounds``: the newest release of all, ignoring our caps), runs the suite,
and for each failing test says which release broke it: each package whose version differs from
``requirements.lock`` is set back to its locked version alone, and the failing tests that then pass are its
breakage. ``--write-lock`` writes ``requirements.lock`` from the environment when the whole suite passed.
Run it through ``bash scripts/check_latest.sh``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements.lock"
REQUIREMENTS = REPO / "requirements.txt"
TEST_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_ROOT_USER_ACTION": "ignore"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", default=os.path.join(tempfile.gettempdir(), "skingen-latest"),
                        help="Where the fresh environment is built (removed first).")
    parser.add_argument("--python", default=sys.executable, help="The interpreter the environment is made from.")
    parser.add_argument("--torch_version", default=os.environ.get("TORCH_VERSION", "2.13.0"))
    parser.add_argument("--no-upper-bounds", dest="no_upper_bounds", action="store_true",
                        help="Ignore the '<' caps of requirements.txt (to see whether a capped release is fixed).")
    parser.add_argument("--write-lock", dest="write_lock", action="store_true",
                        help="Write requirements.lock from the environment when the whole suite passes.")
    parser.add_argument("pytest_args", nargs="*", help="Extra pytest arguments (e.g. -k data).")
    return parser.parse_args(argv)


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(text: str) -> dict[str, str]:
    """``name==version`` lines (comments and blank lines skipped), names normalised."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[normalise(name)] = version.split("+", 1)[0].strip()
    return pins


def requirement_names(text: str) -> list[str]:
    names = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(normalise(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0]))
    return names


def without_upper_bounds(text: str) -> str:
    return "\n".join(re.sub(r",?\s*<=?\s*[\w.*]+", "", line) for line in text.splitlines()) + "\n"


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run(cmd, **kwargs)


def pip(venv: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([str(venv / "bin" / "python"), "-m", "pip", "-q", *args], check=check,
               env={**os.environ, **TEST_ENV})


def freeze(venv: Path) -> dict[str, str]:
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "freeze"], capture_output=True, text=True,
                         check=True, env={**os.environ, **TEST_ENV}).stdout
    return read_pins(out)


def failing_tests(venv: Path, tests: list[str], report: Path) -> tuple[int, list[str]]:
    """Run pytest on ``tests`` (the suite when empty); the exit code and the ids of failed/errored tests."""
    cmd = [str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
           *tests]
    code = run(cmd, cwd=REPO, env={**os.environ, **TEST_ENV}).returncode
    failed = []
    if report.is_file():
        for case in ET.parse(report).getroot().iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                path = case.get("file") or case.get("classname", "").replace(".", "/") + ".py"
                failed.append(f"{path}::{case.get('name')}")
    return code, failed


def main(argv=None) -> int:
    args = parse_args(argv)
    venv = Path(args.venv)
    shutil.rmtree(venv, ignore_errors=True)
    run([args.python, "-m", "venv", str(venv)], check=True)
    pip(venv, "install", f"torch=={args.torch_version}")
    # torch stays the build installed above (--torch_version): upgrading it here would pull a CUDA build of
    # several GB; its newest release is checked by asking for it with --torch_version.
    requirements = "\n".join(line for line in REQUIREMENTS.read_text(encoding="utf-8").splitlines()
                              if requirement_names(line) != ["torch"]) + "\n"
    if args.no_upper_bounds:
        requirements = without_upper_bounds(requirements)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(requirements)
    pip(venv, "install", "--upgrade", "-r", f.name)
    pip(venv, "check")

    newest, locked = freeze(venv), read_pins(LOCK.read_text(encoding="utf-8")) if LOCK.is_file() else {}
    direct = requirement_names(requirements)
    changed = {name: (locked.get(name), version) for name, version in newest.items() if locked.get(name) != version}
    print(f"\nnewest releases ({datetime.date.today()}), against requirements.lock:")
    for name in sorted(newest, key=lambda n: (n not in direct, n)):
        mark = "" if name not in changed else f"   (locked {changed[name][0] or '-'})"
        print(f"  {'*' if name in direct else ' '} {name}=={newest[name]}{mark}")

    report = venv / "pytest.xml"
    code, failed = failing_tests(venv, list(args.pytest_args), report)
    if code == 0:
        print("\nthe suite passes with the newest releases")
        if args.write_lock:
            header = (f"# The tested lock: the suite passed with exactly these versions on {datetime.date.today()} "
                      "(CPU torch; scripts/check_latest.sh --write-lock).\n# Supported ranges: requirements.txt.\n")
            body = "".join(f"{name}=={version}\n" for name, version in sorted(newest.items()) if name != "pip")
            LOCK.write_text(header + body, encoding="utf-8")
            print(f"wrote {LOCK}")
        return 0
    print(f"\n{len(failed)} test(s) fail with the newest releases; which release broke which:")
    unexplained = set(failed)
    for name in sorted(changed, key=lambda n: (n not in direct, n)):
        old, new = changed[name]
        if old is None or not unexplained:
            continue
        pip(venv, "install", "--no-deps", f"{name}=={old}")
        _, still = failing_tests(venv, sorted(unexplained), report)
        fixed = sorted(unexplained - set(still))
        pip(venv, "install", "--no-deps", f"{name}=={new}")
        if fixed:
            print(f"\n{name} {new} (locked {old}) breaks:")
            for test in fixed:
                print(f"    {test}")
            unexplained -= set(fixed)
    if unexplained:
        print("\nnot explained by one package alone (several releases together, or a flaky test):")
        for test in sorted(unexplained):
            print(f"    {test}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
