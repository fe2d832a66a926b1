"""User-facing errors: the CLI prints them as one line and exits non-zero, never a traceback."""


class DarkhorseError(Exception):
    """A problem with the user's input, config or files that they can fix."""


class ConfigError(DarkhorseError):
    """A config key, value or combination that cannot work."""


class RankFailure(DarkhorseError):
    """Another rank of a torchrun launch died or hung: every surviving rank reports it, not only rank 0."""
