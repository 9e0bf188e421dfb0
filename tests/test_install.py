"""`pip install` and go: the package works from a wheel, in an empty folder, with no config.

The wheel is built in the test from a copy of the sources (what packaging includes,
nothing else), installed into a fresh virtual environment that sees this project's
dependencies but not its source tree, and run from an empty folder: ``chatvault
serve`` starts on the built-in default and says where its data and admin key are,
``chatvault health`` finds it, and ``chatvault init`` writes the shipped config.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import REPO, client_for, free_port, wait_for

PACKAGED_CONFIG = REPO / "chatvault_cli" / "default_config.yaml"


def test_the_packaged_config_is_the_one_the_repository_ships() -> None:
    # A symlink, so the two cannot drift; packaging stores the file's content.
    assert PACKAGED_CONFIG.read_text() == (REPO / "config.yaml").read_text(), (
        "chatvault_cli/default_config.yaml must be config.yaml: "
        "ln -sf ../config.yaml chatvault_cli/default_config.yaml"
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The ``bin`` folder of a fresh virtual environment with the wheel installed."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "config.yaml"):
        shutil.copy(REPO / name, source / name)
    for package in ("daemon", "chatvault_cli"):
        shutil.copytree(
            REPO / package,
            source / package,
            symlinks=True,  # as in a checkout: default_config.yaml links to ../config.yaml
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "-w", str(root / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    wheel = next((root / "dist").glob("chatvault-*.whl"))

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # The dependencies come from this project's environment (offline, and fast); its
    # editable install of chatvault does not, because a path added by a .pth file
    # has its own .pth files (the editable finder) left unprocessed.
    Path(site, "project-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run(
        [*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    yield venv / "bin"


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a new user: no ChatVault variables, a home of their own."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CHATVAULT_", "XDG_")) and k != "PYTHONPATH"
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return {**env, "HOME": str(home), "NO_COLOR": "1", **extra}


def run(
    bin_dir: Path, cwd: Path, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bin_dir / "chatvault"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_installed_package_is_the_wheel_not_the_source_tree(
    installed: Path, tmp_path: Path
) -> None:
    found = subprocess.run(
        [
            str(installed / "python"),
            "-c",
            "import chatvault_cli, daemon; print(chatvault_cli.__file__); print(daemon.__file__)",
        ],
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},  # a user's shell
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(path.startswith(str(installed.parent)) for path in found), found


def test_serve_in_an_empty_folder_runs_the_builtin_default(installed: Path, tmp_path: Path) -> None:
    home, folder = tmp_path / "home", tmp_path / "empty"
    home.mkdir()
    folder.mkdir()
    port = free_port()
    # Only the port is set (the default 8000 may be taken on a shared machine).
    env = clean_env(home, CHATVAULT_PORT=str(port))
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [str(installed / "chatvault"), "serve"],
        cwd=folder,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"

    def live() -> bool:
        assert process.poll() is None, (tmp_path / "serve.log").read_text()
        try:
            return httpx.get(url + "/readyz", timeout=0.5).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(live, timeout=30)
        data = home / ".local" / "share" / "chatvault"  # XDG_DATA_HOME unset: the default
        said = (tmp_path / "serve.log").read_text()
        assert "built-in default" in said
        assert f"data:      {data}" in said
        assert f"admin key: {data / 'state.json'}" in said
        state = data / "state.json"
        assert state.stat().st_mode & 0o777 == 0o600
        admin_key = json.loads(state.read_text())["admin_key"]
        assert admin_key not in said  # where it is, never what it is

        reply = client_for(url, admin_key).chat.completions.create(
            model="mock", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content
        assert (data / "chatvault.db").exists()
        assert list(folder.iterdir()) == []  # nothing written to the current folder

        # The operator commands find the daemon and its key without being told.
        health = run(installed, folder, env, "health", "--json")
        assert health.returncode == 0, health.stdout + health.stderr
        assert json.loads(health.stdout)["status"] == "healthy"
        assert "components" in json.loads(health.stdout)  # the admin view: the key was found
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()
    assert process.returncode == 0, (tmp_path / "serve.log").read_text()


def test_xdg_data_home_is_honoured(installed: Path, tmp_path: Path) -> None:
    home, folder, xdg = tmp_path / "home", tmp_path / "empty", tmp_path / "xdg"
    for d in (home, folder):
        d.mkdir()
    env = clean_env(home, XDG_DATA_HOME=str(xdg))
    created = run(installed, folder, env, "keys", "create", "--name", "first", "--json")
    assert created.returncode == 0, created.stdout + created.stderr
    assert (xdg / "chatvault" / "chatvault.db").exists()
    assert not (home / ".local").exists()
    listed = run(installed, folder, env, "keys", "list", "--json")
    assert [k["name"] for k in json.loads(listed.stdout)] == ["first"]


def test_init_writes_the_shipped_config_and_never_overwrites_without_force(
    installed: Path, tmp_path: Path
) -> None:
    home, folder = tmp_path / "home", tmp_path / "project"
    home.mkdir()
    folder.mkdir()
    env = clean_env(home)
    shipped = (REPO / "config.yaml").read_text()

    first = run(installed, folder, env, "init")
    assert first.returncode == 0, first.stdout + first.stderr
    written = folder / "config.yaml"
    assert written.read_text() == shipped
    assert "# " in written.read_text()  # the comments come along

    written.write_text("# my edits\n" + shipped)
    again = run(installed, folder, env, "init")
    assert again.returncode == 1
    assert "already exists" in again.stderr and "--force" in again.stderr
    assert written.read_text().startswith("# my edits")  # untouched

    forced = run(installed, folder, env, "init", "--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert written.read_text() == shipped

    # A path, or a folder to put config.yaml in; the result validates.
    elsewhere = run(installed, folder, env, "init", "etc/chatvault.yaml")
    assert elsewhere.returncode == 0, elsewhere.stderr
    (folder / "conf").mkdir()
    into_folder = run(installed, folder, env, "init", "conf")
    assert into_folder.returncode == 0, into_folder.stderr
    for path in (folder / "etc" / "chatvault.yaml", folder / "conf" / "config.yaml"):
        assert path.read_text() == shipped
        checked = run(installed, folder, env, "config", "check", "--config", str(path))
        assert checked.returncode == 0, checked.stdout + checked.stderr

    # With a config.yaml in the folder, that config is used, not the built-in default.
    listed = run(installed, folder, env, "config", "check", "--json")
    assert json.loads(listed.stdout)["path"] == "config.yaml"
