"""regmirror's operator: RegistryMirrors in, one desired-state ConfigMap and honest statuses out.

``main`` holds the kopf handlers (thin), ``caches`` what was heard from the API (pure), ``planning`` what to
publish and write (pure), ``reconciling`` the loop that ties them together, and ``publishing`` every API call
the operator makes itself. No finalizers, ever: see ``main``.
"""
