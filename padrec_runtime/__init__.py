"""padrec runtime: loads an engine directory and writes recommendation lists with speculative decoding; no torch."""
from .errors import BackendError, CheckpointError, InputError, IntegrityError, ManifestError, PadrecError

__version__ = "0.1.0"
__all__ = ["PadrecError", "InputError", "ManifestError", "IntegrityError", "BackendError", "CheckpointError"]
