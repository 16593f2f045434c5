"""Runtime settings, read by every process (API, workers, CLI): a neutral home that rules/, workers/ and
service/ may all import."""

from config.settings import (
    CONFIG_FILE_ENV,
    ENV_PREFIX,
    SANDBOX_ISSUER,
    SANDBOX_KID,
    Settings,
    SettingsError,
    get_settings,
    load_settings,
)

__all__ = [
    "CONFIG_FILE_ENV",
    "ENV_PREFIX",
    "SANDBOX_ISSUER",
    "SANDBOX_KID",
    "Settings",
    "SettingsError",
    "get_settings",
    "load_settings",
]
