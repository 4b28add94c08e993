"""Configuration shared by the service, the workers and the command line (one settings class)."""

from qscore_config.settings import Settings, get_settings

__all__ = ["Settings", "get_settings"]
