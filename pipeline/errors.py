"""Errors a user can act on. Each message names the file or field at fault."""


class TagpipeError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class ConfigError(TagpipeError):
    """A config file, profile or option has a bad value."""


class BundleError(TagpipeError):
    """A model bundle is missing files or disagrees with itself."""
