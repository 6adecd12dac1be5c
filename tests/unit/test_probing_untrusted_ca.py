"""A mirror whose certificate only the node trusts is alive: the probe asks whether it answers, not whether the
agent's image trusts it (a company CA installed on the nodes is not in the image)."""

from __future__ import annotations

import http.server
import ssl
import threading
from pathlib import Path

from regmirror_agent.probing import probe
from regmirror_api import models
from tests.harness.registry import make_tls_material


def test_a_mirror_with_a_certificate_the_agent_cannot_verify_is_alive(tmp_path: Path) -> None:
    tls = make_tls_material(tmp_path)
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls.server_cert, tls.server_key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        mirror = models.Mirror(url=f"https://127.0.0.1:{server.server_port}")
        alive, detail = probe(mirror, timeout=3)
        assert alive, detail  # BaseHTTPRequestHandler answers 501: any HTTP answer is alive
    finally:
        server.shutdown()
        server.server_close()
