"""The operator's control loop on kopf.

Pure parts: :mod:`.observe` (Job/Pod views and the failure taxonomy), :mod:`.conditions`,
:mod:`.reconcile` (the plan of one reconcile), :mod:`.desired` (spec to children).
Talking to the API server: :mod:`.kube` only. Wiring: :mod:`.handlers` (kopf triggers and
caches), :mod:`.http` (progress endpoint, metrics), :mod:`.runner` (start-up).
"""
