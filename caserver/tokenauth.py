"""Token bootstrap: which node a caller is, from its projected service-account token.

The node agent sends its pod's token (audience ``ztagent-ca``, bound to the agent's pod) in the
``authorization`` metadata of ``CreateCertificate`` as ``Bearer <token>``, as istio-agent does.
The CA asks the API server (a TokenReview, which checks signature, expiry, audience and that
the bound pod still exists) and then decides, in :func:`node_of_review` (pure):

* the review must be authenticated, for our audience;
* the caller must be one of the agent service accounts (``ztagent-system/ztagent`` by default):
  any pod may request a token for any audience, so without this check every pod on a node
  could obtain the identities of its neighbours;
* the node is the review's ``authentication.kubernetes.io/node-name`` extra (what a real
  API server puts in for a pod-bound token, from the pod's ``spec.nodeName``), else the bound
  pod's ``spec.nodeName`` from the CA's own watch (``authentication.kubernetes.io/pod-name``).

What the caller may then obtain is the existing placement rule (caserver.authz): identities of
enrolled workloads scheduled on that node, from the CA's own watch of Pods.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import jwt
from lightkube import AsyncClient
from lightkube.models.authentication_v1 import TokenReviewSpec
from lightkube.resources.authentication_v1 import TokenReview

NODE_NAME_EXTRA: Final = "authentication.kubernetes.io/node-name"
POD_NAME_EXTRA: Final = "authentication.kubernetes.io/pod-name"
DEFAULT_AUDIENCE: Final = "ztagent-ca"
DEFAULT_AGENT_SERVICE_ACCOUNTS: Final = ("ztagent-system/ztagent",)
BEARER: Final = "Bearer "
# A node calls once per workload per renewal; a short cache spares the API server a TokenReview
# per call without outliving a deleted pod by much (the review is what notices it).
REVIEW_CACHE_SECONDS: Final = 10.0
REVIEW_CACHE_SIZE: Final = 4096

PodNode = Callable[[str, str], str | None]  # (namespace, pod) -> spec.nodeName from our watch


@dataclass(frozen=True)
class TokenCaller:
    node: str | None  # None: refused, ``reason`` says why
    reason: str
    username: str = ""


def bearer_token(metadata: Iterable[tuple[str, Any]]) -> tuple[str | None, str]:
    """(token, "") from gRPC metadata, or (None, why)."""
    values = [v for k, v in metadata if k.lower() == "authorization"]
    if not values:
        return None, "no token: send the service-account token as `authorization: Bearer <token>`"
    if len(values) > 1:
        return None, "more than one authorization metadata entry"
    value = values[0].decode("ascii", "replace") if isinstance(values[0], bytes) else str(values[0])
    if not value.startswith(BEARER) or not value[len(BEARER) :].strip():
        return None, "authorization metadata is not `Bearer <token>`"
    return value[len(BEARER) :].strip(), ""


def _service_account(username: str) -> tuple[str, str] | None:
    parts = username.split(":")
    if len(parts) == 4 and parts[:2] == ["system", "serviceaccount"]:
        return parts[2], parts[3]
    return None


def node_of_review(
    status: Mapping[str, Any],
    *,
    audience: str,
    agent_service_accounts: Iterable[str],
    pod_node: PodNode,
) -> TokenCaller:
    """Decide from a TokenReview's ``status`` (pure; see the module docstring)."""
    if not status.get("authenticated"):
        err = status.get("error") or "not authenticated"
        return TokenCaller(None, f"token refused by the API server's TokenReview: {err}")
    audiences = status.get("audiences")
    if audiences is not None and audience not in audiences:
        return TokenCaller(None, f"token is not for audience {audience!r} (valid for {list(audiences)})")
    user = status.get("user") or {}
    username = str(user.get("username") or "")
    sa = _service_account(username)
    allowed = set(agent_service_accounts)
    if sa is None or f"{sa[0]}/{sa[1]}" not in allowed:
        return TokenCaller(
            None,
            f"{username or 'the caller'} is not a node agent's service account "
            f"({', '.join(sorted(allowed))})",
            username,
        )
    extra = user.get("extra") or {}
    nodes = list(extra.get(NODE_NAME_EXTRA) or ())
    if len(nodes) == 1 and nodes[0]:
        return TokenCaller(str(nodes[0]), "", username)
    pods = list(extra.get(POD_NAME_EXTRA) or ())
    if len(pods) == 1 and pods[0]:
        node = pod_node(sa[0], str(pods[0]))
        if node:
            return TokenCaller(node, "", username)
        return TokenCaller(
            None, f"the token's pod {sa[0]}/{pods[0]} is not scheduled on a node (or not known yet)", username
        )
    why = "the token is not bound to a pod: use a projected service-account token"
    return TokenCaller(None, why, username)


class KubernetesTokenReviewer:
    """TokenReview through lightkube, decided by :func:`node_of_review`, cached briefly."""

    def __init__(
        self,
        client: Callable[[], AsyncClient],
        *,
        audience: str = DEFAULT_AUDIENCE,
        agent_service_accounts: Iterable[str] = DEFAULT_AGENT_SERVICE_ACCOUNTS,
        pod_node: PodNode = lambda ns, name: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._factory = client
        self._client: AsyncClient | None = None
        self.audience = audience
        self.agent_service_accounts = tuple(agent_service_accounts)
        self._pod_node = pod_node
        self._clock = clock
        self._cache: dict[bytes, tuple[float, TokenCaller]] = {}

    async def review(self, token: str) -> TokenCaller:
        digest = hashlib.sha256(token.encode()).digest()
        now = self._clock()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        if self._client is None:
            self._client = self._factory()
        try:
            answer = await self._client.create(
                TokenReview(spec=TokenReviewSpec(token=token, audiences=[self.audience]))
            )
        except Exception as exc:  # the API server is down or refuses us: refuse, say why
            return TokenCaller(None, f"TokenReview failed: {type(exc).__name__}: {exc}")
        status = answer.status.to_dict() if answer.status is not None else {}
        caller = node_of_review(
            status,
            audience=self.audience,
            agent_service_accounts=self.agent_service_accounts,
            pod_node=self._pod_node,
        )
        if caller.node is not None:  # refusals are not cached: a fixed token works at once
            if len(self._cache) >= REVIEW_CACHE_SIZE:
                self._cache.clear()
            # Never past the token's own exp (read unverified: the review just verified it).
            until = now + REVIEW_CACHE_SECONDS
            try:
                until = min(until, float(jwt.decode(token, options={"verify_signature": False})["exp"]))
            except (jwt.PyJWTError, KeyError, TypeError, ValueError):
                until = now  # no readable exp: do not cache
            self._cache[digest] = (until, caller)
        return caller

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
