"""What a user who installs the package (not a checkout) gets: every subpackage, the lm-eval YAMLs,
the shipped hparams."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from helpers import REPO


def test_every_subpackage_and_shipped_yaml_folder_is_listed_for_setuptools():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "surgery_plugin").rglob("__init__.py")}
    assert on_disk <= listed, f"add {sorted(on_disk - listed)} to [tool.setuptools] packages in pyproject.toml"
    yaml_folders = {"surgery_plugin.shipped_hparams." + p.parent.name for p in (REPO / "hparams").glob("*/*.yaml")}
    assert yaml_folders <= listed and yaml_folders <= set(setuptools["package-data"]), sorted(yaml_folders)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel, built from this checkout and installed into a plain folder (no checkout around it)."""
    root = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w", str(root), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    [wheel] = list(root.glob("surgery_plugin-*.whl"))
    target = root / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    return wheel, target, build.stdout + build.stderr


def test_the_build_prints_no_setuptools_warnings(installed):
    *_, log = installed
    assert "BuildBackendWarning" not in log and "absent from the `packages`" not in log, log[-3000:]


def test_wheel_ships_hparams_and_lm_eval_templates(installed):
    wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "surgery_plugin/shipped_hparams/Surgery/smollm2-135m.yaml" in names
    assert "surgery_plugin/integrations/lm_eval/_safeedit_template_yaml" in names
    assert "surgery_plugin/integrations/lm_eval/surgery_rtp.yaml" in names
    shipped = {p.relative_to(REPO / "hparams").as_posix() for p in (REPO / "hparams").rglob("*.yaml")}
    assert {n.removeprefix("surgery_plugin/shipped_hparams/") for n in names if "shipped_hparams/" in n} == shipped


def test_installed_package_finds_its_yamls_outside_a_checkout(installed, tmp_path):
    _, site, _ = installed
    code = (
        "import surgery_plugin.config as h; p = h.shipped_hparams_path('smollm2-135m'); "
        "print(p); print(h.SurgeryHyperParams.from_hparams(p).alpha)"
    )
    run = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {code}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    path, alpha = run.stdout.split()
    assert path.startswith(str(site)) and "shipped_hparams" in path
    assert float(alpha) > 0


def test_the_readme_quotes_the_split_table_as_generated():
    from surgery_plugin.data.splits import describe

    assert describe() in (REPO / "README.md").read_text(), "regenerate: python -m surgery_plugin.data.splits"


def test_the_surgery_command_runs_as_a_user_runs_it(tmp_path):
    """The one smoke test of the real entry points, in fresh processes: the console script make installs and
    ``python -m surgery_plugin``; a usage error is one line and exit code 2."""
    from helpers import surgery_subprocess

    script = Path(sys.executable).parent / "surgery"
    assert script.is_file(), f"{script}: the console script is not installed (make setup)"
    ran = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert ran.returncode == 0 and "probe" in ran.stdout and "compare" in ran.stdout, ran.stderr[-2000:]
    bad = surgery_subprocess("edit", "--model", "smollm2-135m", cwd=tmp_path)
    lines = [line for line in bad.stderr.splitlines() if line.startswith("surgery: error:")]
    assert bad.returncode == 2 and len(lines) == 1 and "--probe" in lines[0], bad.stderr[-2000:]
    assert not any(tmp_path.iterdir()), "a usage error writes nothing"
