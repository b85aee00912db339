"""User-facing errors: the CLI prints these as one red line and exits with code 2."""

from __future__ import annotations


class FvqaError(Exception):
    """An error caused by input or environment the user can fix (bad config, missing file...)."""


class ConfigError(FvqaError):
    """The run config is malformed or names something that does not exist."""


class WorkspaceError(FvqaError):
    """The workspace cannot be opened or is from an incompatible fvqa version."""


class ConfigDeprecation(DeprecationWarning):
    """A config key in an old form that still loads; the CLI shows these (Python hides plain
    DeprecationWarnings by default), so a user learns the new form."""
