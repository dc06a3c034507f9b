"""PUT /api takes its prompt limit from the served replica (GetModelInfo), so the gateway and textgen cannot
drift."""

import json
from types import SimpleNamespace

import pytest
from flask import Flask

from services.gateway.http import HTTPError
from services.gateway.megatron_api import MegatronGenerate

pytestmark = pytest.mark.unit


class Pool:
    def __init__(self, limit: int) -> None:
        self.limit, self.calls = limit, 0

    def model_info(self):
        return SimpleNamespace(max_prompts_per_request=self.limit)

    def unary(self, method, request):
        self.calls += 1
        raise AssertionError("not reached")


@pytest.mark.parametrize(
    "limit, n, refused", [(4, 5, True), (4, 4, False), (200, 129, False), (0, 129, True)]
)
def test_the_replicas_limit_is_the_gateways(limit, n, refused):
    pool = Pool(limit)
    with Flask(__name__).test_request_context(
        method="PUT", data=json.dumps({"prompts": ["a"] * n, "tokens_to_generate": 1})
    ):
        if refused:
            with pytest.raises(HTTPError, match=f"Maximum number of prompts is {limit or 128}"):
                MegatronGenerate(pool).put()
        else:
            with pytest.raises(AssertionError, match="not reached"):  # got past validation to the engine call
                MegatronGenerate(pool).put()
