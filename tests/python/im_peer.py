"""An IM client driven by the Rust test (issue 4, "Show"): log in with slixmpp, optionally
fetch the roster and send initial presence, then obey JSON commands read one per line on
stdin and report every stanza it receives as JSON events on stdout.

Startup flags: --no-roster (do not fetch the roster), --no-presence (stay unavailable),
--priority N, --carbons (enable XEP-0280 before reporting online), --blocklist (fetch the
XEP-0191 blocklist, which subscribes to blocklist pushes).

Lines printed:
- {"event": "online", "jid": full JID, "roster": [items]} once the session is ready;
- {"event": "presence", "from", "type", "priority", "show"} for every presence received
  ("type" is "available" when the stanza has none);
- {"event": "message", "from", "type", "body", "delay", "carbon"} for every message, where
  "carbon" is null or {"direction": "sent"|"received", "from", "to", "body"};
- {"event": "roster_push", "items": [...]} for every roster push (RFC 6121 §2.1.6);
- {"event": "blocklist_push", "action": "block"|"unblock", "jids": [...]};
- {"event": "error", "kind", "from", "condition", "app"} for error stanzas;
- {"reply": <cmd>, ...} after each command;
- {"event": "closed", "reason"} when the stream ends; finally {"ok": true, "failures": [...]}.

Roster items are {"jid", "subscription", "ask", "approved"} as the server wrote them.

Commands ({"cmd": ...}): "presence" {priority?, show?, type?, to?}, "sub" {to, type}
(subscribe/subscribed/unsubscribe/unsubscribed), "message" {to, body, type?},
"roster" (a fresh roster get), "carbons" {enable}, "block" {jids}, "unblock" {jids},
"blocklist", "disconnect" (clean close), "abort" (drop the TCP connection without closing the
stream), "quit".
"""

import asyncio
import json
import sys
import xml.etree.ElementTree as ET

from slixmpp.exceptions import IqError, IqTimeout

import common

CLIENT = "{jabber:client}"
ROSTER = "{jabber:iq:roster}"
DELAY = "{urn:xmpp:delay}"
CARBONS = "{urn:xmpp:carbons:2}"
FORWARD = "{urn:xmpp:forward:0}"
BLOCKING = "{urn:xmpp:blocking}"
STANZAS = "{urn:ietf:params:xml:ns:xmpp-stanzas}"


def roster_items(query) -> list:
    items = []
    if query is None:
        return items
    for item in query.findall(ROSTER + "item"):
        items.append(
            {
                "jid": item.get("jid"),
                "subscription": item.get("subscription", "none"),
                "ask": item.get("ask"),
                "approved": item.get("approved"),
            }
        )
    return items


def text_of(el, name):
    child = el.find(CLIENT + name)
    return child.text if child is not None else None


def error_info(el) -> dict:
    err = el.find(CLIENT + "error")
    condition, app = None, None
    if err is not None:
        for child in err:
            if child.tag.startswith(STANZAS):
                if not child.tag.endswith("}text"):
                    condition = child.tag[len(STANZAS):]
            else:
                app = child.tag
    return {"condition": condition, "app": app}


def describe_incoming(el) -> dict | None:
    tag = el.tag
    if tag == CLIENT + "presence":
        record = {
            "event": "presence",
            "from": el.get("from"),
            "type": el.get("type", "available"),
            "priority": text_of(el, "priority"),
            "show": text_of(el, "show"),
        }
        if el.get("type") == "error":
            record.update(error_info(el))
        return record
    if tag == CLIENT + "message":
        carbon = None
        for direction in ("sent", "received"):
            wrapper = el.find(CARBONS + direction)
            if wrapper is None:
                continue
            inner = wrapper.find(FORWARD + "forwarded/" + CLIENT + "message")
            if inner is not None:
                carbon = {
                    "direction": direction,
                    "from": inner.get("from"),
                    "to": inner.get("to"),
                    "body": text_of(inner, "body"),
                }
        delay = el.find(DELAY + "delay")
        record = {
            "event": "message",
            "from": el.get("from"),
            "type": el.get("type", "normal"),
            "body": text_of(el, "body"),
            "delay": delay.get("stamp") if delay is not None else None,
            "carbon": carbon,
        }
        if el.get("type") == "error":
            record.update(error_info(el))
        return record
    if tag == CLIENT + "iq" and el.get("type") == "set":
        query = el.find(ROSTER + "query")
        if query is not None:
            return {"event": "roster_push", "from": el.get("from"), "items": roster_items(query)}
        for action in ("block", "unblock"):
            payload = el.find(BLOCKING + action)
            if payload is not None:
                jids = [i.get("jid") for i in payload.findall(BLOCKING + "item")]
                return {"event": "blocklist_push", "action": action, "jids": jids}
    return None


async def stdin_lines():
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            return
        yield line.decode()


async def fetch_roster(xmpp) -> list:
    iq = xmpp.make_iq_get()
    iq.enable("roster")
    result = await iq.send(timeout=15)
    return roster_items(result.xml.find(ROSTER + "query"))


async def run_command(xmpp, cmd: dict) -> dict:
    name = cmd.get("cmd")
    reply = {"reply": name}
    if name == "presence":
        ptype = cmd.get("type")
        xmpp.send_presence(
            pto=cmd.get("to"),
            ppriority=cmd.get("priority"),
            pshow=cmd.get("show"),
            ptype=ptype,
        )
    elif name == "sub":
        xmpp.send_presence_subscription(pto=cmd["to"], ptype=cmd["type"])
    elif name == "message":
        xmpp.send_message(mto=cmd["to"], mbody=cmd["body"], mtype=cmd.get("type", "chat"))
    elif name == "roster":
        reply["items"] = await fetch_roster(xmpp)
    elif name == "carbons":
        if cmd.get("enable", True):
            await xmpp["xep_0280"].enable(timeout=15)
        else:
            await xmpp["xep_0280"].disable(timeout=15)
    elif name == "block":
        await xmpp["xep_0191"].block(cmd["jids"], timeout=15)
    elif name == "unblock":
        await xmpp["xep_0191"].unblock(cmd["jids"], timeout=15)
    elif name == "blocklist":
        reply["jids"] = sorted(str(j) for j in await xmpp["xep_0191"].get_blocked_jids(timeout=15))
    elif name == "disconnect":
        await xmpp.disconnect(wait=5.0)
    elif name == "abort":
        xmpp.abort()
    else:
        reply["error"] = f"unknown command {name!r}"
    return reply


async def main() -> int:
    p = common.parser(__doc__)
    p.add_argument("--no-roster", action="store_true")
    p.add_argument("--no-presence", action="store_true")
    p.add_argument("--priority", type=int, default=None)
    p.add_argument("--carbons", action="store_true")
    p.add_argument("--blocklist", action="store_true")
    args = p.parse_args()
    common.setup_logging()

    xmpp = common.make_client(args, ["xep_0030", "xep_0191", "xep_0280", "xep_0203"])
    # The test decides every subscription answer itself.
    xmpp.auto_authorize = None
    xmpp.auto_subscribe = False
    outcome = common.Outcome(xmpp)
    closed = asyncio.get_running_loop().create_future()

    def incoming(stanza):
        try:
            record = describe_incoming(stanza.xml)
        except Exception as e:  # noqa: BLE001 - report, never break the stream
            record = {"event": "unparsed", "error": str(e)}
        if record is not None:
            common.emit(record)
        return stanza

    def on_disconnected(reason):
        if not closed.done():
            closed.set_result(str(reason))

    xmpp.add_filter("in", incoming)
    xmpp.add_event_handler("disconnected", on_disconnected)
    xmpp.add_event_handler("killed", lambda _: on_disconnected("killed"))

    if not await common.start_session(xmpp, args, outcome):
        common.emit({"ok": False, "failures": outcome.failures})
        return 0
    roster = []
    try:
        if not args.no_roster:
            roster = await fetch_roster(xmpp)
        if args.carbons:
            await xmpp["xep_0280"].enable(timeout=15)
        if args.blocklist:
            await xmpp["xep_0191"].get_blocked(timeout=15)
    except (IqError, IqTimeout) as e:
        outcome.failures.append(f"setup IQ failed: {e!r}")
        common.emit({"ok": False, "failures": outcome.failures})
        return 0
    if not args.no_presence:
        xmpp.send_presence(ppriority=args.priority)
    common.emit({"event": "online", "jid": str(xmpp.boundjid), "roster": roster})

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
            reply = await run_command(xmpp, cmd)
        except (IqError, IqTimeout) as e:
            reply = {"reply": cmd.get("cmd"), "error": repr(e)}
        common.emit(reply)
        if cmd.get("cmd") in ("disconnect", "abort"):
            try:
                reason = await asyncio.wait_for(closed, timeout=10)
            except asyncio.TimeoutError:
                reason = None
            common.emit({"event": "closed", "reason": reason})
            break
    common.emit({"ok": True, "failures": outcome.failures})
    await common.shutdown(xmpp)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
