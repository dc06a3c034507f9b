"""Liveness, readiness and metrics routes."""

from __future__ import annotations

from flask import Response
from flask_restful import Resource
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from protos.textgen.v1 import textgen_pb2 as pb
from services.gateway.http import json_response
from shared.errors import ServiceError


class Health(Resource):
    """GET /health: the gateway process answers (liveness). Replica states are informative."""

    def __init__(self, pool) -> None:
        self.pool = pool

    def get(self):
        replicas = {r.address: ("up" if r.healthy else "down") for r in self.pool.replicas}
        return json_response({"status": "ok", "replicas": replicas})


class Ready(Resource):
    """GET /ready: a model is loaded and a real 1-token generation succeeds now (TGI's model health)."""

    def __init__(self, pool, timeout_s: float) -> None:
        self.pool = pool
        self.timeout_s = timeout_s

    def get(self):
        if not self.pool.healthy():
            return json_response({"status": "not ready", "reason": "no healthy textgen replica"}, 503)
        req = pb.GenerateRequest(
            prompts=[pb.Prompt(text="ready")],
            params=pb.GenerationParams(
                sampling=pb.SamplingParams(greedy=True),
                stopping=pb.StoppingParams(max_new_tokens=1, ignore_eos=True),
            ),
        )
        try:
            info = self.pool.model_info()
            resp = self.pool.unary("Generate", req, timeout_s=self.timeout_s)
        except ServiceError as e:
            return json_response({"status": "not ready", "reason": e.message}, 503)
        ok = len(resp.completions) == 1 and len(resp.completions[0].token_ids) == 1
        body = {
            "status": "ready" if ok else "not ready",
            "model": info.name,
            "replicas_healthy": len(self.pool.healthy()),
            "replicas": len(self.pool.replicas),
        }
        return json_response(body, 200 if ok else 503)


class Metrics(Resource):
    def get(self):
        return Response(generate_latest(), mimetype=CONTENT_TYPE_LATEST)
