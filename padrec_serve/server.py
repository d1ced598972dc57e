"""`padrec serve`: Triton Inference Server (through PyTriton) with padrec bound as a dynamically batched model."""
from __future__ import annotations

import logging
import signal
from dataclasses import dataclass

import numpy as np

from padrec_runtime.errors import BackendError

from . import runtime
from .metrics import ServeMetrics
from .model import ServeModel
from .schema import INPUTS, MODEL_NAME, OUTPUTS

LOG = logging.getLogger("padrec.serve")


@dataclass(frozen=True)
class ServeConfig:
    """What `padrec serve` starts."""

    engine_dir: str
    device: str = "cpu"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002  # Triton's metrics
    padrec_metrics_port: int = 8003  # padrec's metrics (prometheus_client)
    max_batch: int = 32  # Triton's max_batch_size: histories per dynamic batch
    max_queue_delay_us: int = 2000  # how long the batcher waits to fill a batch
    instances: int = 1  # model instances, each with its own Recommender
    deadline_s: float | None = None  # a request decoding longer is cut with DeadlineError
    calibrate: bool = True  # time AR vs speculation per batch size at start (for speculate=auto)
    exit_timeout_s: int = 5  # in-flight requests get this long on shutdown


def import_pytriton():
    try:
        from pytriton import model_config, triton
    except ImportError as exc:
        raise BackendError(f"padrec serve: {exc} | needs PyTriton | pip install 'padrec[serve]' (a venv made with "
                           "a Python that has its shared libpython, e.g. Debian's /usr/bin/python3.11)") from None
    return model_config, triton


def calibration_batches(max_batch: int) -> tuple:
    return tuple(sorted({b for b in (1, 4, 16, max_batch) if b <= max_batch}))


def build_models(config: ServeConfig, metrics: ServeMetrics) -> list:
    """One ServeModel (and Recommender) per instance, calibrated for `auto` when the engines have a draft."""
    models = []
    for k in range(config.instances):
        rec = runtime.open_recommender(config.engine_dir, config.device)
        max_batch = min(config.max_batch, rec.limits["max_batch"])
        if config.calibrate and "draft" in rec.backends:
            plan = runtime.calibrate(rec, calibration_batches(max_batch))
            LOG.info("instance %d: auto speculation %s", k,
                     ", ".join(f"batch<={c.batch}: {c.speculate}" + (f" K={c.draft_steps}" if c.draft_steps else "")
                               for c in plan))
        models.append(ServeModel(rec, metrics, config.deadline_s))
    return models


def triton_tensors(specs, Tensor) -> list:
    return [Tensor(name=s.name, dtype=np.bytes_ if s.dtype is np.bytes_ else s.dtype, shape=s.shape,
                   optional=s.optional) for s in specs]


def serve(config: ServeConfig) -> None:
    """Start Triton, bind padrec, block until SIGINT or SIGTERM, then stop Triton and its processes."""
    mc, tr = import_pytriton()
    metrics = ServeMetrics()
    models = build_models(config, metrics)
    max_batch = min(config.max_batch, models[0].max_batch)
    triton_config = tr.TritonConfig(http_port=config.http_port, grpc_port=config.grpc_port,
                                    metrics_port=config.metrics_port, exit_timeout_secs=config.exit_timeout_s,
                                    log_verbose=0)
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))  # Kubernetes stops with SIGTERM
    # PyTriton guards these endpoints with a token of its own; statistics (read-only) stay open for operators
    security = tr.TritonSecurityConfig(restricted_endpoints=[e for e in tr.DEFAULT_PROTECTED_ENDPOINTS
                                                             if e != "statistics"])
    with tr.Triton(config=triton_config, security_config=security) as triton:
        triton.bind(model_name=MODEL_NAME, infer_func=models, inputs=triton_tensors(INPUTS, mc.Tensor),
                    outputs=triton_tensors(OUTPUTS, mc.Tensor), strict=True,
                    config=mc.ModelConfig(max_batch_size=max_batch, batcher=mc.DynamicBatcher(
                        max_queue_delay_microseconds=config.max_queue_delay_us)))
        metrics.serve(config.padrec_metrics_port)
        LOG.info("padrec serving %s: HTTP :%d, gRPC :%d, metrics :%d (Triton) and :%d (padrec)", config.engine_dir,
                 config.http_port, config.grpc_port, config.metrics_port, config.padrec_metrics_port)
        triton.serve()
