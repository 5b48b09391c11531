"""An IM client driven by the Rust test (issue 4, "Show"): log in with slixmpp, optionally
fetch the roster and send initial presence, then obey JSON commands read one per line on
stdin and report every stanza it receives as JSON events on stdout.

Startup flags: --no-roster (do not fetch the roster), --no-presence (stay unavailable),
--priority N, --carbons (enable XEP-0280 before reporting online), --blocklist (fetch the
XEP-0191 blocklist, which subscribes to blocklist pushes), --caps (load slixmpp's XEP-0115
plugin, which validates the server's <c/> stream feature by itself: it asks disco#info for
node#ver and recomputes the hash).

Lines printed:
- {"event": "online", "jid": full JID, "roster": [items]} once the session is ready;
- {"event": "presence", "from", "type", "priority", "show", "status", "delay"} for every
  presence received ("type" is "available" when the stanza has none; "delay" is the
  XEP-0203 stamp, if any);
- {"event": "message", "from", "type", "body", "delay", "carbon"} for every message, where
  "carbon" is null or {"direction": "sent"|"received", "from", "to", "body"};
- {"event": "roster_push", "items": [...]} for every roster push (RFC 6121 §2.1.6);
- {"event": "blocklist_push", "action": "block"|"unblock", "jids": [...]};
- {"event": "error", "kind", "from", "condition", "app"} for error stanzas;
- {"reply": <cmd>, ...} after each command;
- {"event": "closed", "reason"} when the stream ends; finally {"ok": true, "failures": [...]}.

Roster items are {"jid", "subscription", "ask", "approved"} as the server wrote them.

Commands ({"cmd": ...}): "presence" {priority?, show?, status?, type?, to?}, "sub" {to, type}
(subscribe/subscribed/unsubscribe/unsubscribed), "message" {to, body, type?},
"roster" (a fresh roster get), "carbons" {enable}, "block" {jids}, "unblock" {jids},
"blocklist", "csi" {state: "active"|"inactive"} (XEP-0352 through slixmpp's plugin, which
sends only when the server advertised <csi/>; replies with an error otherwise),
"server_caps" (with --caps: waits until slixmpp has validated the server's verification
string, and replies {"validated", "advertised": {node, hash, ver} from the stream features,
"computed": slixmpp's hash of a fresh disco#info of the domain}), "disconnect" (clean close),
"abort" (drop the TCP connection without closing the stream), "quit".
"""

import asyncio
import json
import sys
import xml.etree.ElementTree as ET

from slixmpp.exceptions import IqError, IqTimeout

import common

CLIENT = "{jabber:client}"
CAPS = "{http://jabber.org/protocol/caps}"
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


def delay_of(el):
    delay = el.find(DELAY + "delay")
    return delay.get("stamp") if delay is not None else None


def caps_of(features) -> dict | None:
    for el in features.iter(CAPS + "c"):
        return {"node": el.get("node"), "hash": el.get("hash"), "ver": el.get("ver")}
    return None


def describe_incoming(el) -> dict | None:
    tag = el.tag
    if tag == CLIENT + "presence":
        record = {
            "event": "presence",
            "from": el.get("from"),
            "type": el.get("type", "available"),
            "priority": text_of(el, "priority"),
            "show": text_of(el, "show"),
            "status": text_of(el, "status"),
            "delay": delay_of(el),
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
        record = {
            "event": "message",
            "from": el.get("from"),
            "type": el.get("type", "normal"),
            "body": text_of(el, "body"),
            "delay": delay_of(el),
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


async def server_caps(xmpp, advertised) -> dict:
    domain = xmpp.boundjid.domain
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    validated = None
    while loop.time() < deadline:
        validated = await xmpp["xep_0115"].get_verstring(domain)
        if validated:
            break
        await asyncio.sleep(0.05)
    info = await xmpp["xep_0030"].get_info(jid=domain, cached=False, timeout=15)
    computed = xmpp["xep_0115"].generate_verstring(info["disco_info"], "sha-1")
    return {
        "validated": str(validated) if validated else None,
        "advertised": advertised.get("caps"),
        "computed": computed,
    }


async def run_command(xmpp, cmd: dict, advertised: dict) -> dict:
    name = cmd.get("cmd")
    reply = {"reply": name}
    if name == "presence":
        ptype = cmd.get("type")
        xmpp.send_presence(
            pto=cmd.get("to"),
            ppriority=cmd.get("priority"),
            pshow=cmd.get("show"),
            pstatus=cmd.get("status"),
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
    elif name == "csi":
        csi = xmpp["xep_0352"]
        if not csi.enabled:
            reply["error"] = "the server did not advertise <csi/>"
        elif cmd.get("state") == "inactive":
            csi.send_inactive()
        else:
            csi.send_active()
    elif name == "server_caps":
        reply.update(await server_caps(xmpp, advertised))
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
    p.add_argument("--caps", action="store_true")
    args = p.parse_args()
    common.setup_logging()

    plugins = ["xep_0030", "xep_0191", "xep_0280", "xep_0203", "xep_0352"]
    if args.caps:
        plugins.append("xep_0115")
    xmpp = common.make_client(args, plugins)
    # The test decides every subscription answer itself.
    xmpp.auto_authorize = None
    xmpp.auto_subscribe = False
    outcome = common.Outcome(xmpp)
    closed = asyncio.get_running_loop().create_future()
    # The server's <c/> (XEP-0115 §6.3), from the last stream features that carried one.
    advertised = {}

    def incoming(stanza):
        if stanza.name == "features":
            caps = caps_of(stanza.xml)
            if caps is not None:
                advertised["caps"] = caps
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
            reply = await run_command(xmpp, cmd, advertised)
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
