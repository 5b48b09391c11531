"""Shared helpers for the slixmpp interop scripts run by the Rust tests in tests/tests/.

Contract with the Rust side (tests/src/lib.rs): every script takes --host/--port (the
listener to connect to, never DNS), --jid/--password, --ca (the test CA file to trust) and
--mode (starttls | direct), writes JSON objects one per line on stdout (the last one is the
result, with "ok": true/false), logs to stderr, and exits 0 even when the check fails so the
test can show the JSON verdict. SASL is forced to SCRAM-SHA-256 with slixmpp's ``sasl_mech``.
"""

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

import slixmpp

MECHANISM = "SCRAM-SHA-256"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--host", required=True, help="address to connect to (e.g. 127.0.0.1)")
    p.add_argument("--port", required=True, type=int)
    p.add_argument("--jid", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--ca", required=True, help="PEM file of the CA to trust")
    p.add_argument("--mode", choices=["starttls", "direct"], default="starttls")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds for the whole script")
    return p


def emit(obj: dict) -> None:
    print(json.dumps(obj, sort_keys=True), flush=True)


def setup_logging() -> None:
    # Every stanza sent and received ends up on stderr, which the Rust test prints on failure.
    logging.basicConfig(
        level=logging.DEBUG,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def make_client(args, plugins=(), cls=slixmpp.ClientXMPP) -> slixmpp.ClientXMPP:
    """A client forced to SCRAM-SHA-256 that trusts only ``args.ca`` and connects to
    ``args.host:args.port`` with the transport ``args.mode`` asks for."""
    xmpp = cls(args.jid, args.password, sasl_mech=MECHANISM)
    xmpp.ca_certs = Path(args.ca)
    # With an explicit host and port, slixmpp tries direct TLS then STARTTLS on that port:
    # enable exactly one, so the test knows which one it exercised.
    xmpp.enable_direct_tls = args.mode == "direct"
    xmpp.enable_starttls = args.mode == "starttls"
    xmpp.enable_plaintext = False
    for plugin in plugins:
        xmpp.register_plugin(plugin)
    return xmpp


def tls_info(xmpp) -> dict:
    ssl_object = None
    if xmpp.transport is not None:
        ssl_object = xmpp.transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return {"encrypted": False}
    return {
        "encrypted": True,
        "version": ssl_object.version(),
        "alpn": ssl_object.selected_alpn_protocol(),
        "cipher": ssl_object.cipher()[0] if ssl_object.cipher() else None,
    }


class Outcome:
    """Futures for the connection outcomes a script waits on."""

    def __init__(self, xmpp):
        loop = asyncio.get_running_loop()
        self.session = loop.create_future()
        self.failures = []
        self.stream_features = []
        xmpp.add_event_handler("session_start", self._session_start)
        xmpp.add_event_handler("failed_auth", lambda s: self._fail(f"SASL failure: {s}"))
        xmpp.add_event_handler("no_auth", lambda _: self._fail("no acceptable SASL mechanism"))
        xmpp.add_event_handler(
            "connection_failed", lambda e: self._fail(f"connection failed: {e}")
        )
        xmpp.add_event_handler("stream_error", lambda e: self._fail(f"stream error: {e}"))
        xmpp.add_event_handler("disconnected", lambda r: self._fail(f"disconnected: {r}"))
        xmpp.add_filter("in", self._features)

    def _features(self, stanza):
        if stanza.name == "features":
            self.stream_features.append(str(stanza))
        return stanza

    def _session_start(self, _event):
        if not self.session.done():
            self.session.set_result(True)

    def _fail(self, reason: str):
        self.failures.append(reason)
        if not self.session.done():
            self.session.set_result(False)


async def start_session(xmpp, args, outcome: Outcome) -> bool:
    xmpp.connect(args.host, args.port)
    try:
        return await asyncio.wait_for(outcome.session, timeout=args.timeout)
    except asyncio.TimeoutError:
        outcome.failures.append(f"no session within {args.timeout}s")
        return False


def mechanism_used(xmpp):
    mech = getattr(xmpp["feature_mechanisms"], "mech", None)
    return getattr(mech, "name", None)


async def shutdown(xmpp) -> None:
    xmpp.cancel_connection_attempt()
    try:
        await asyncio.wait_for(xmpp.disconnect(wait=2.0), timeout=5)
    except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - best effort at the end
        pass
