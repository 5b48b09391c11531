"""A slixmpp client with XEP-0198 stream management and resumption, driven by the Rust test
(issue 5, "Show"): log in, enable stream management with resumption (slixmpp's xep_0198
plugin), then obey JSON commands read one per line on stdin and report every message it
receives as a JSON event on stdout. No initial presence is sent, so the only stanzas the
server sends it are the messages the test sends and the answers to what it asks.

When the connection is lost after a "cut", the script reconnects at once (as an application
does on slixmpp's "disconnected" event) and slixmpp resumes the session on its own: it sends
<resume previd h/> and, on <resumed/>, retransmits what the server did not count.

Lines printed:
- {"event": "online", "jid", "sm_id", "resume"} once stream management is enabled;
- {"event": "message", "from", "body", "id"} for every message received;
- {"event": "disconnected", "reason"} when a connection ends;
- {"event": "resumed", "h", "previd", "resent": [bodies]} on slixmpp's session_resumed
  ("resent" are the stanzas slixmpp sent again because the server's h did not count them);
- {"event": "sm_failed", "xml"} if the server refused the resumption;
- {"reply": <cmd>, ...} after each command; finally {"ok": true, "failures": [...]}.

Commands ({"cmd": ...}):
- "send" {to, prefix, first, count}: chat messages with bodies prefix+first ... (ids = bodies);
- "pause": stop reading the socket (what the server writes now stays unread in the kernel);
- "cut" {to, prefix, first, count}: queue those messages, then reset the TCP connection at
  the socket level (SO_LINGER 0 + abort: an RST, no </stream:stream>, unread data discarded),
  and reconnect. Replies {"unacked": bodies slixmpp had not seen acked, "handled": its h};
- "sync": send an unrequested <a h/> then <r/>, wait for the server's <a/>; replies
  {"server_h", "seq", "handled", "unacked"};
- "quit".
"""

import asyncio
import json
import socket
import struct
import sys

from slixmpp.plugins.xep_0198 import stanza as sm_stanza
from slixmpp.xmlstream.handler import Waiter
from slixmpp.xmlstream.matcher import MatchXPath

import common

CLIENT = "{jabber:client}"


def body_of(stanza) -> str | None:
    el = stanza.xml.find(CLIENT + "body")
    return el.text if el is not None else None


async def stdin_lines():
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            return
        yield line.decode()


def send_batch(xmpp, cmd: dict) -> list:
    first = int(cmd.get("first", 1))
    bodies = [f"{cmd['prefix']}{n}" for n in range(first, first + int(cmd.get("count", 0)))]
    for body in bodies:
        msg = xmpp.make_message(mto=cmd["to"], mbody=body, mtype="chat")
        msg["id"] = body
        msg.send()
    return bodies


def reset_connection(xmpp) -> None:
    """Drops the TCP connection the way a network failure does: an RST, nothing flushed."""
    transport = xmpp.transport
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def run_command(xmpp, state: dict, cmd: dict) -> dict:
    name = cmd.get("cmd")
    reply = {"reply": name}
    sm = xmpp["xep_0198"]
    if name == "send":
        reply["sent"] = send_batch(xmpp, cmd)
    elif name == "pause":
        xmpp.transport.pause_reading()
    elif name == "cut":
        reply["unacked"] = [body_of(s) for _, s in sm.unacked_queue]
        reply["handled"] = sm.handled
        reply["sent"] = send_batch(xmpp, cmd)
        state["reconnect"] = True
        reset_connection(xmpp)
    elif name == "sync":
        sm.send_ack()
        waiter = Waiter("sync ack", MatchXPath(sm_stanza.Ack.tag_name()))
        xmpp.register_handler(waiter)
        sm.request_ack()
        ack = await waiter.wait(timeout=15)
        reply["server_h"] = None if ack is None else int(ack["h"])
        reply["seq"] = sm.seq
        reply["handled"] = sm.handled
        reply["unacked"] = [body_of(s) for _, s in sm.unacked_queue]
    else:
        reply["error"] = f"unknown command {name!r}"
    return reply


async def main() -> int:
    p = common.parser(__doc__)
    args = p.parse_args()
    common.setup_logging()

    xmpp = common.make_client(args, ["xep_0198"])
    outcome = common.Outcome(xmpp)
    loop = asyncio.get_running_loop()
    enabled = loop.create_future()
    state = {"reconnect": False}

    def on_message(msg):
        common.emit(
            {
                "event": "message",
                "from": str(msg["from"]),
                "body": msg["body"],
                "id": msg["id"],
            }
        )

    def on_enabled(stanza):
        if not enabled.done():
            enabled.set_result(stanza)

    async def on_disconnected(reason):
        common.emit({"event": "disconnected", "reason": str(reason)})
        if state["reconnect"]:
            state["reconnect"] = False
            # Let the other "disconnected" handlers (slixmpp's own) run first.
            await asyncio.sleep(0)
            xmpp.connect(args.host, args.port)

    def on_resumed(stanza):
        sm = xmpp["xep_0198"]
        common.emit(
            {
                "event": "resumed",
                "h": int(stanza["h"]),
                "previd": stanza["previd"],
                "resent": [body_of(s) for _, s in sm.unacked_queue],
            }
        )

    xmpp.add_event_handler("message", on_message)
    xmpp.add_event_handler("sm_enabled", on_enabled)
    xmpp.add_event_handler("session_resumed", on_resumed)
    xmpp.add_event_handler("sm_failed", lambda s: common.emit({"event": "sm_failed", "xml": str(s)}))
    xmpp.add_event_handler("disconnected", on_disconnected)

    if not await common.start_session(xmpp, args, outcome):
        common.emit({"ok": False, "failures": outcome.failures})
        return 0
    try:
        stanza = await asyncio.wait_for(enabled, timeout=args.timeout)
    except asyncio.TimeoutError:
        common.emit({"ok": False, "failures": outcome.failures + ["no <enabled/>"]})
        return 0
    common.emit(
        {
            "event": "online",
            "jid": str(xmpp.boundjid),
            "sm_id": xmpp["xep_0198"].sm_id,
            "resume": stanza["resume"],
            "max": stanza["max"],
        }
    )

    async for line in stdin_lines():
        line = line.strip()
        if not line:
            continue
        try:
            cmd = json.loads(line)
        except ValueError as e:
            common.emit({"reply": None, "error": f"bad command: {e}"})
            continue
        if cmd.get("cmd") == "quit":
            break
        try:
            reply = await run_command(xmpp, state, cmd)
        except Exception as e:  # noqa: BLE001 - report to the test, keep serving
            reply = {"reply": cmd.get("cmd"), "error": repr(e)}
        common.emit(reply)
    common.emit({"ok": True, "failures": outcome.failures})
    await common.shutdown(xmpp)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
