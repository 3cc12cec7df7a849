"""The node's web face, on one stack (Starlette on uvicorn, ``prometheus_client``): liveness,
readiness and metrics, the operator console, and DICOMweb STOW-RS. See docs/web.md.

Modules: ``settings`` (the node file's ``web:`` section, import-light), ``security`` (authentication,
cross-site and CSRF rules, response headers), ``metrics`` (Prometheus, read from the state),
``console`` and ``templates`` (the server-rendered pages), ``stow`` (STOW-RS into the receiver's
store), ``app`` (the routes), ``server`` (uvicorn in a thread of the node).
"""
