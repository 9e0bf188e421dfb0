"""Settings: the validated form of config.yaml.

The file is read and validated once, at start. Every error names the path of the
bad key (``models[1].api_base: not a URL``) so an operator can fix it without
reading a traceback. Relative paths resolve against the config file's folder, so a
config works the same whatever the current directory is.

    settings = load_config(Path("config.yaml"), os.environ)

- ``fields``: the field types the sections share (URLs, environment names).
- ``models``: one entry of ``models:``, a deployment.
- ``sections``: every other section (``server:``, ``ledger:``, ``limits:``...).
- ``settings``: the whole file, its sections checked against each other.
- ``loading``: YAML, environment overrides, relative paths, error messages.
"""

from daemon.config.loading import ConfigError, builtin_config, load_config, parse_config
from daemon.config.models import DEFAULT_DENIED_FIELDS, MockOptions, ModelConfig, Pricing
from daemon.config.sections import (
    USER_TYPES,
    RequestLimits,
    TracingConfig,
    UpstreamConfig,
)
from daemon.config.settings import Settings

__all__ = [
    "DEFAULT_DENIED_FIELDS",
    "USER_TYPES",
    "ConfigError",
    "MockOptions",
    "ModelConfig",
    "Pricing",
    "RequestLimits",
    "Settings",
    "TracingConfig",
    "UpstreamConfig",
    "builtin_config",
    "load_config",
    "parse_config",
]
