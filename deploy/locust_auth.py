"""Locust's web UI behind the gateway's token: HTTP basic auth, any user
name, the password SPECDRIFT_GATEWAY_TOKEN. Loaded by the compose stack's
Locust master next to loadgen/locustfile.py; it defines no users."""

import os
import secrets

from flask import Response, request
from locust import events


@events.init.add_listener
def require_token(environment, **_kwargs) -> None:
    if environment.web_ui is None:
        return
    token = os.environ.get("SPECDRIFT_GATEWAY_TOKEN", "")
    if not token:
        raise SystemExit("locust_auth: SPECDRIFT_GATEWAY_TOKEN is unset or empty")

    @environment.web_ui.app.before_request
    def check_token():
        sent = request.authorization
        if sent is None or not secrets.compare_digest((sent.password or "").encode(), token.encode()):
            return Response("the gateway's token is the password\n", 401,
                            {"WWW-Authenticate": 'Basic realm="specdrift locust"'})
        return None
