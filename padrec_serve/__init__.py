"""padrec on Triton Inference Server: `padrec serve` binds a Recommender as a KServe v2 model; no torch."""
