"""Authentication as kube-apiserver does it: static bearer tokens (the `--token-auth-file` kind,
registered by the test) and service-account JWTs the server signs itself (TokenRequest, what the
kubelet asks for to fill a projected token volume), with the claims, audiences and pod/node
binding of a real bound token, and the TokenReview answer a real server gives for each."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
ISSUER = "https://kubernetes.default.svc.cluster.local"


@dataclass
class UserInfo:
    username: str
    uid: str = ""
    groups: list[str] = field(default_factory=list)
    extra: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"username": self.username}
        if self.uid:
            out["uid"] = self.uid
        if self.groups:
            out["groups"] = list(self.groups)
        if self.extra:
            out["extra"] = {k: list(v) for k, v in self.extra.items()}
        return out


class AuthError(Exception):
    pass


# Looks an object up for the binding checks: (resource plural, namespace, name) -> the object, or
# None when it is gone or its deletionTimestamp has passed (a pod keeps its token through graceful
# termination, as on a real server).
Lookup = Callable[[str, str, str], dict[str, Any] | None]


class Authenticator:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        # RS256, the algorithm of kube-apiserver's usual --service-account-signing-key-file.
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._static: dict[str, UserInfo] = {}

    def add_static_token(self, token: str, user: UserInfo) -> None:
        self._static[token] = user

    def issue(
        self,
        *,
        namespace: str,
        service_account: dict[str, Any],
        audiences: list[str],
        expiration_seconds: int,
        pod: dict[str, Any] | None = None,
        node: dict[str, Any] | None = None,
    ) -> tuple[str, int]:
        """A bound service-account token; returns (token, expiry as epoch seconds)."""
        now = int(self._clock())
        exp = now + expiration_seconds
        k8s: dict[str, Any] = {
            "namespace": namespace,
            "serviceaccount": {
                "name": service_account["metadata"]["name"],
                "uid": service_account["metadata"]["uid"],
            },
        }
        if pod is not None:
            k8s["pod"] = {"name": pod["metadata"]["name"], "uid": pod["metadata"]["uid"]}
            node_name = (pod.get("spec") or {}).get("nodeName")
            if node_name:
                k8s["node"] = {"name": node_name}
                if node is not None:
                    k8s["node"]["uid"] = node["metadata"]["uid"]
        claims = {
            "aud": audiences,
            "exp": exp,
            "iat": now,
            "nbf": now,
            "iss": ISSUER,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": k8s,
            "sub": f"system:serviceaccount:{namespace}:{service_account['metadata']['name']}",
        }
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": "ztagent-kubeapi"}), exp

    def authenticate(self, token: str, audiences: list[str], lookup: Lookup) -> tuple[UserInfo, list[str]]:
        """(user, the audiences it is valid for) or AuthError with a real server's message."""
        if token in self._static:
            # Static tokens are audience-agnostic: valid only for the API server's own audience.
            if API_AUDIENCE not in audiences:
                raise AuthError("[invalid bearer token, token lookup failed]")
            return self._static[token], [API_AUDIENCE]
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise AuthError("[invalid bearer token, token lookup failed]") from None
        if unverified.get("iss") != ISSUER:
            raise AuthError("[invalid bearer token, token lookup failed]")
        try:
            claims = jwt.decode(
                token,
                self._key.public_key(),
                algorithms=["RS256"],
                options={"verify_aud": False, "verify_exp": False},
            )
        except jwt.PyJWTError:
            raise AuthError(
                "[invalid bearer token, square/go-jose: error in cryptographic primitive]"
            ) from None
        if int(claims["exp"]) < self._clock():
            raise AuthError("[invalid bearer token, service account token has expired]")
        token_aud = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        valid = [a for a in audiences if a in token_aud]
        if not valid:
            raise AuthError(
                f"[invalid bearer token, token audiences {token_aud!r} is invalid for the target "
                f"audiences {audiences!r}]"
            )
        k8s = claims["kubernetes.io"]
        ns = k8s["namespace"]
        sa_ref = k8s["serviceaccount"]
        sa = lookup("serviceaccounts", ns, sa_ref["name"])
        if sa is None or sa["metadata"]["uid"] != sa_ref["uid"]:
            raise AuthError("[invalid bearer token, service account token has been invalidated]")
        extra: dict[str, list[str]] = {"authentication.kubernetes.io/credential-id": [f"JTI={claims['jti']}"]}
        if "pod" in k8s:
            pod = lookup("pods", ns, k8s["pod"]["name"])
            if pod is None or pod["metadata"]["uid"] != k8s["pod"]["uid"]:
                raise AuthError("[invalid bearer token, service account token has been invalidated]")
            if "node" in k8s:
                extra["authentication.kubernetes.io/node-name"] = [k8s["node"]["name"]]
                if "uid" in k8s["node"]:
                    extra["authentication.kubernetes.io/node-uid"] = [k8s["node"]["uid"]]
            extra["authentication.kubernetes.io/pod-name"] = [k8s["pod"]["name"]]
            extra["authentication.kubernetes.io/pod-uid"] = [k8s["pod"]["uid"]]
        user = UserInfo(
            username=f"system:serviceaccount:{ns}:{sa_ref['name']}",
            uid=sa_ref["uid"],
            groups=["system:serviceaccounts", f"system:serviceaccounts:{ns}", "system:authenticated"],
            extra=extra,
        )
        return user, valid
