"""scripts/setup.sh on a Python that refuses pip installs (PEP 668): it installs into a project .venv instead.

The "system" Python here is this interpreter laid out under another prefix (its binary copied, its standard
library linked, an empty site-packages plus pip) with a real EXTERNALLY-MANAGED marker in its stdlib folder,
so pip itself refuses to install into it, as on Debian/Ubuntu. The packages this suite already has are made
visible through PYTHONPATH so that the run needs no network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from repo_scripts import REPO


def externally_managed_python(root: Path) -> Path:
    stdlib = Path(sysconfig.get_path("stdlib"))
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    lib = root / "lib" / version
    lib.mkdir(parents=True)
    for entry in stdlib.iterdir():
        if entry.name not in ("site-packages", "dist-packages"):
            (lib / entry.name).symlink_to(entry)
    for shared in Path(sys.base_prefix, "lib").glob("libpython*"):
        (root / "lib" / shared.name).symlink_to(shared)
    site = lib / "site-packages"
    site.mkdir()
    pip = Path(sysconfig.get_path("purelib")) / "pip"
    (site / "pip").symlink_to(pip)
    (lib / "EXTERNALLY-MANAGED").write_text("[externally-managed]\nError=installs go through the system packages\n")
    (root / "bin").mkdir()
    python = root / "bin" / version
    shutil.copy2(os.path.realpath(sys.executable), python)
    return python


def test_setup_uses_a_project_venv_where_pip_is_refused(tmp_path):
    python = externally_managed_python(tmp_path / "system")
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("scripts/setup.sh", "scripts/test.sh", "requirements.txt", "requirements.lock"):
        shutil.copy2(REPO / name, repo / name)
    env = dict(os.environ, PYTHON=str(python), PYTHONPATH=sysconfig.get_path("purelib"))
    env.pop("PIP_BREAK_SYSTEM_PACKAGES", None)

    refused = subprocess.run([str(python), "-m", "pip", "install", "--dry-run", "pyyaml"], env=env,
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "externally-managed-environment" in refused.stderr

    proc = subprocess.run(["bash", "scripts/setup.sh"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "externally managed (PEP 668); installing into the project virtualenv .venv/" in proc.stdout
    venv_python = repo / ".venv" / "bin" / "python"
    prefix = subprocess.run([str(venv_python), "-c", "import sys, torch, diffusers; print(sys.prefix)"], env=env,
                            capture_output=True, text=True)
    assert prefix.returncode == 0, prefix.stderr
    assert Path(prefix.stdout.strip()) == repo / ".venv"

    # test.sh runs the tests with the venv's python: a one-test suite proves which interpreter ran it.
    (repo / "tests").mkdir()
    (repo / "tests" / "test_which.py").write_text(
        "import sys\n\ndef test_runs_in_the_venv():\n    assert sys.prefix.endswith('.venv')\n")
    tests = subprocess.run(["bash", "scripts/test.sh", "-q", "tests/test_which.py"], cwd=repo, env=env,
                           capture_output=True, text=True, timeout=600)
    assert tests.returncode == 0, tests.stdout[-2000:] + tests.stderr[-2000:]
    assert "1 passed" in tests.stdout
