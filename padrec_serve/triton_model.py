"""padrec as a Triton Python-backend model: runs inside Triton's stub process, one Recommender per instance."""
from __future__ import annotations

import json
import logging

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend

from padrec_runtime import RuntimeOptions

from . import runtime
from .model import ServeModel
from .schema import INPUTS

LOG = logging.getLogger("padrec.serve")
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64]
TAU_BUCKETS = [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8]


class Metrics:
    """padrec's metrics, served by Triton beside its own on the metrics port."""

    def __init__(self, model_name: str, instance: str):
        labels = {"model": model_name, "instance": instance}
        counter, hist = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.HISTOGRAM
        family = pb_utils.MetricFamily
        # the families must outlive their metrics: Triton drops a metric whose family object is collected
        self.families = {
            "requests": family("padrec_requests", "Requests answered, by outcome", counter),
            "rounds": family("padrec_rounds", "Target passes after prefill", counter),
            "batch": family("padrec_batch_size", "Histories decoded together in one runtime call", hist),
            "tau": family("padrec_tau", "Tokens committed per target pass, per decoded batch", hist),
            "seconds": family("padrec_decode_seconds", "Wall time of one decoded batch", hist)}
        f = self.families
        self.requests = {o: f["requests"].Metric(dict(labels, outcome=o))
                         for o in ("ok", "client_error", "deadline", "server_error")}
        self.rounds = f["rounds"].Metric(labels)
        self.batch = f["batch"].Metric(labels, buckets=BATCH_BUCKETS)
        self.tau = f["tau"].Metric(labels, buckets=TAU_BUCKETS)
        self.seconds = f["seconds"].Metric(labels, buckets=[.001, .003, .01, .03, .1, .3, 1, 3, 10])

    def decoded(self, batch: int, tau: float, rounds: int, seconds: float) -> None:
        self.batch.observe(batch)
        self.tau.observe(tau)
        self.rounds.increment(rounds)
        self.seconds.observe(seconds)


def _parameter(config: dict, name: str, default: str = "") -> str:
    return config.get("parameters", {}).get(name, {}).get("string_value", default)


class TritonPythonModel:
    """Triton's entry points: initialize (open and calibrate the engines), execute (a dynamic batch)."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        device = _parameter(config, "device", "cpu")
        deadline = _parameter(config, "deadline_s")
        gpu = int(args["model_instance_device_id"]) if args.get("model_instance_kind") == "GPU" else None
        options = RuntimeOptions(**json.loads(_parameter(config, "runtime_options", "{}")))
        self.rec = runtime.open_recommender(_parameter(config, "engine_dir"), device, gpu, options)
        max_batch = min(int(config["max_batch_size"]), self.rec.limits["max_batch"])
        batches = runtime.calibration_batches(max_batch, device)
        calibrated = _parameter(config, "calibrate", "1") == "1" and "draft" in self.rec.backends
        if calibrated:  # a minute or two on a GPU: say so, or the server looks stuck
            pb_utils.Logger.log_info(f"padrec {args['model_instance_name']}: calibrating auto speculation at batch "
                                     f"sizes {list(batches)}")
            plan = runtime.calibrate(self.rec, batches)
            pb_utils.Logger.log_info(f"padrec {args['model_instance_name']} auto speculation: " + ", ".join(
                f"batch<={c.batch}: {c.speculate}" + (f" K={c.draft_steps}" if c.draft_steps else "") for c in plan))
        self.metrics = Metrics(args["model_name"], args["model_instance_name"])
        # groups are padded only to shapes the calibration has warmed (a GPU instance's)
        self.model = ServeModel(self.rec, float(deadline) if deadline else None, self.metrics.decoded,
                                batches if device == "cuda" and calibrated else ())

    def execute(self, requests: list) -> list:
        replies = self.model([self._arrays(r) for r in requests])
        out = []
        for reply in replies:
            self.metrics.requests[reply.outcome].increment(1)
            if reply.error is None:
                out.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor(name, np.asarray(a, dtype=np.object_ if a.dtype == object else a.dtype))
                    for name, a in reply.outputs.items()]))
                continue
            code = {"client_error": pb_utils.TritonError.INVALID_ARG,
                    "deadline": pb_utils.TritonError.UNAVAILABLE}.get(reply.outcome, pb_utils.TritonError.INTERNAL)
            message = f"{type(reply.error).__name__}: {reply.error}"
            out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)))
        return out

    @staticmethod
    def _arrays(request) -> dict:
        arrays = {}
        for spec in INPUTS:
            t = pb_utils.get_input_tensor_by_name(request, spec.name)
            if t is not None:
                arrays[spec.name] = t.as_numpy()
        return arrays

    def finalize(self) -> None:
        self.rec.close()
