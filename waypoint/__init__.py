"""waypoint: the L7 role (HBONE in, HTTP parse, RequestAuthentication + L7 authz + ext_authz, HBONE out).

Built so far: :mod:`waypoint.extauthz`, the CUSTOM-action client speaking Envoy's ext_authz HTTP
contract. The pure cores it calls live in policy/ (``policy.l7``, ``policy.jwt``, ``policy.paths``).
"""
