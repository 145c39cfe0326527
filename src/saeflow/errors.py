"""One-line errors that name the offending key, file or value."""


class SaeflowError(Exception):
    """Base class: the message is a single line a user can act on."""


class ConfigError(SaeflowError):
    """A config key or value is wrong."""


class DataError(SaeflowError):
    """An input file or its contents are wrong."""
