"""The package layout: every package installed, and the top-level recipes/ shipped as verl_anchor.recipes."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_directory_is_listed_for_installation():
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "verl_anchor").rglob("__init__.py")}
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert on_disk | {"verl_anchor.recipes"} == listed


def test_recipes_resolve_from_the_checkout_install():
    from importlib.resources import files

    shipped = {p.name for p in files("verl_anchor.recipes").iterdir() if p.name.endswith(".yaml")}
    assert shipped == {p.name for p in (ROOT / "recipes").glob("*.yaml")} and "anchor_base.yaml" in shipped


@pytest.mark.timeout(600)
def test_recipes_compose_from_a_built_wheel(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("verl_anchor-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    assert {f"verl_anchor/recipes/{p.name}" for p in (ROOT / "recipes").glob("*.yaml")} <= names
    shipped = ROOT / "verl_anchor" / "assets" / "countdown-policy"  # the demo policy (verl_anchor.models.policy)
    assert {f"verl_anchor/assets/countdown-policy/{p.name}" for p in shipped.iterdir()} <= names
    # The unpacked wheel first on the path, ahead of the editable checkout.
    probe = (
        "import verl_anchor, sys\n"
        "assert verl_anchor.__file__.startswith(sys.argv[1]), verl_anchor.__file__\n"
        "from hydra import compose, initialize_config_module\n"
        "with initialize_config_module(config_module='verl_anchor.recipes', version_base=None):\n"
        "    config = compose(config_name='countdown_qwen3_4b')\n"
        "print(config.algorithm.adv_estimator)\n"
    )
    site = str(tmp_path / "site")
    proc = subprocess.run(
        [sys.executable, "-c", probe, site],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": site, "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "anchor_coupled"
