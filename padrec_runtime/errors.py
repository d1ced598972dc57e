"""The one exception family of padrec: every user-facing failure is a PadrecError naming problem and fix."""


class PadrecError(Exception):
    """Base of every error padrec raises on purpose; the CLI prints its message and exits 1."""


class InputError(PadrecError):
    """A request (history, item ids, sizes, options) is invalid."""


class ManifestError(PadrecError):
    """An engine manifest is malformed, of an unsupported version, or disagrees with the files."""


class IntegrityError(ManifestError):
    """A file named in the manifest is missing, truncated or altered."""


class BackendError(PadrecError):
    """A backend package or device is missing, or an engine failed to run."""


class CheckpointError(PadrecError):
    """A checkpoint does not match its config, or a draft does not match its target."""


class DeadlineError(PadrecError):
    """A request ran past its deadline and was cut."""
