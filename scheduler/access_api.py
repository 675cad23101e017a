"""The routes of shared registry access answers (scheduler/access.py): internal, signed with
the cluster secret, and refused outright by a scheduler without one (then anyone could publish a
yes, so nothing is shared and peers ask their registries themselves).

    POST /api/v1/access          AccessQuery  -> AccessReply   (long-polls up to wait_ms)
    POST /api/v1/access/answers  AccessAnswer -> {}
"""

from __future__ import annotations

from aiohttp import web

from common.models import AccessAnswer, AccessQuery
from common.web import RequestError, model_response, parse_body
from scheduler.access import AccessService

API = "/api/v1"
INTERNAL = {("POST", f"{API}/access"), ("POST", f"{API}/access/answers")}


class AccessRoutes:
    def __init__(self, service: AccessService, secret: bytes | None) -> None:
        self.service = service
        self.secret = secret

    def mount(self, router: web.UrlDispatcher) -> None:
        router.add_post(f"{API}/access", self.lookup)
        router.add_post(f"{API}/access/answers", self.publish)

    def _shared(self) -> None:
        if self.secret is None:
            raise RequestError(403, "access answers are shared only in a cluster with a "
                                    "secret: ask the registry")

    async def lookup(self, request: web.Request) -> web.Response:
        self._shared()
        return model_response(await self.service.lookup(await parse_body(request, AccessQuery)))

    async def publish(self, request: web.Request) -> web.Response:
        self._shared()
        await self.service.publish(await parse_body(request, AccessAnswer))
        return web.json_response({})
