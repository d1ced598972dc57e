"""padrec runtime: loads an engine directory and writes recommendation lists with speculative decoding; no torch.

    from padrec_runtime import Recommender, RuntimeOptions, DecodeParams, PadrecError
    rec = Recommender("engines/ml100k", device="cpu")
    rec.recommend([[12, 7, 301]], n_items=10, params=DecodeParams(speculate="tree")).lists[0].titles
"""
from .api.options import DecodeParams, RuntimeOptions
from .api.recommender import Recommendation, RecommendResult, Recommender, Stream
from .errors import (BackendError, CheckpointError, DeadlineError, InputError, IntegrityError, ManifestError,
                     PadrecError)

__version__ = "0.1.0"
__all__ = ["Recommender", "RuntimeOptions", "DecodeParams", "Recommendation", "RecommendResult", "Stream",
           "PadrecError", "InputError", "ManifestError", "IntegrityError", "BackendError", "CheckpointError",
           "DeadlineError"]
