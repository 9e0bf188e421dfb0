"""Configuration: validated once, errors name the key's path, paths resolve beside the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from daemon.config import ConfigError, load_config
from tests.helpers import REPO, cli


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_the_shipped_config_is_valid_and_complete() -> None:
    settings = load_config(REPO / "config.yaml", environ={})
    by_name = {m.name: m for m in settings.models}
    assert by_name["mock"].provider == "mock"
    assert by_name["mock"].pricing is not None
    assert (
        by_name["mock"].pricing.input_per_million,
        by_name["mock"].pricing.output_per_million,
    ) == (0.15, 0.60)
    ollama = [m for m in settings.models if m.provider == "ollama"]
    assert ollama and ollama[0].api_base == "http://localhost:11434"
    assert settings.ledger.url == f"sqlite:///{REPO / 'data' / 'chatvault.db'}"
    assert settings.data_dir == REPO / "data"


@pytest.mark.parametrize(
    ("models", "message"),
    [
        (
            "[{name: a, provider: mock}, {name: b, provider: openai, model: m, api_base: 'ftp:/x'}]",
            "models[1].api_base: not a URL",
        ),
        (
            "[{name: a, provider: openai, api_base: 'http://x'}]",
            "models[0].model: required for provider 'openai'",
        ),
        (
            "[{name: a, provider: ollama, model: m}]",
            "models[0].api_base: required for provider 'ollama'",
        ),
        ("[{name: a, provider: mock, api_bse: 'http://x'}]", "models[0].api_bse: unknown key"),
        ("[{provider: mock}]", "models[0].name: required"),
        (
            "[{name: a, provider: mock, pricing: {input_per_million: -1, output_per_million: 1}}]",
            "models[0].pricing.input_per_million",
        ),
        (
            "[{name: a, provider: openai, model: m, api_base: 'http://x', api_key_env: 'not valid'}]",
            "models[0].api_key_env: not an environment variable name",
        ),
        ("[]", "models: List should have at least 1 item"),
    ],
)
def test_errors_name_the_path_of_the_bad_key(tmp_path: Path, models: str, message: str) -> None:
    path = write(tmp_path, f"models: {models}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, environ={})
    assert message in str(error.value)
    assert str(path) in str(error.value)


def test_other_sections_report_their_paths_too(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "server: {port: 99999}\nledger: {url: 'mysql://x'}\nmodels: [{name: a, provider: mock}]\n",
    )
    with pytest.raises(ConfigError) as error:
        load_config(path, environ={})
    text = str(error.value)
    assert "server.port:" in text and "ledger.url:" in text


def test_yaml_syntax_errors_give_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  - name: a\n   provider: [\n")
    with pytest.raises(ConfigError, match=r"line \d+"):
        load_config(path, environ={})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml", environ={})


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "data_dir: state\nledger: {url: 'sqlite:///db/x.db'}\nmodels: [{name: a, provider: mock}]\n",
    )
    settings = load_config(path, environ={})
    assert settings.data_dir == tmp_path / "state"
    assert settings.ledger.url == f"sqlite:///{tmp_path / 'db' / 'x.db'}"
    absolute = write(
        tmp_path,
        "ledger: {url: 'sqlite:////var/tmp/abs.db'}\nmodels: [{name: a, provider: mock}]\n",
    )
    assert load_config(absolute, environ={}).ledger.url == "sqlite:////var/tmp/abs.db"


def test_the_default_ledger_lives_beside_the_config(tmp_path: Path) -> None:
    path = write(tmp_path, "models: [{name: a, provider: mock}]\n")
    assert (
        load_config(path, environ={}).ledger.url
        == f"sqlite:///{tmp_path / 'data' / 'chatvault.db'}"
    )


def test_environment_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "models: [{name: a, provider: mock}]\n")
    settings = load_config(
        path, environ={"CHATVAULT_PORT": "9123", "CHATVAULT_LEDGER_URL": "postgresql://u@h/db"}
    )
    assert settings.server.port == 9123
    assert settings.ledger.url == "postgresql://u@h/db"


def test_config_check_command(tmp_path: Path) -> None:
    good = write(tmp_path, yaml.safe_dump({"models": [{"name": "a", "provider": "mock"}]}))
    result = cli("config", "check", "--config", str(good))
    # Rich wraps at 80 columns without a terminal: a long tmp path splits the line.
    assert result.returncode == 0 and "is valid" in " ".join(result.stdout.split())
    as_json = cli("config", "check", "--json", "--config", str(good))
    assert '"valid": true' in as_json.stdout
    bad = write(tmp_path, "models: [{name: a, provider: openai, model: m, api_base: nope}]\n")
    result = cli("config", "check", "--config", str(bad))
    assert result.returncode == 1
    assert "models[0].api_base: not a URL" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr + result.stdout
