"""One side of a two-client chat: log in with slixmpp, send available presence, tell the test
our full JID ({"event": "online", "jid": ...}), send --send-body to --peer, and wait for a
chat message from --peer's bare JID whose body is --expect-body.

Prints the online line, then one JSON result line: ok, received {from, body, type}, sent,
mechanism, tls, failures.
"""

import asyncio
import sys

from slixmpp import JID

import common


async def main() -> int:
    p = common.parser(__doc__)
    p.add_argument("--peer", required=True, help="full JID to send to")
    p.add_argument("--send-body", required=True)
    p.add_argument("--expect-body", required=True)
    args = p.parse_args()
    common.setup_logging()

    xmpp = common.make_client(args)
    outcome = common.Outcome(xmpp)
    peer = JID(args.peer)
    loop = asyncio.get_running_loop()
    received = loop.create_future()
    others = []

    def on_message(msg):
        record = {"from": str(msg["from"]), "body": msg["body"], "type": msg["type"]}
        if msg["from"].bare == peer.bare and msg["body"] == args.expect_body:
            if not received.done():
                received.set_result(record)
        else:
            others.append(record)

    xmpp.add_event_handler("message", on_message)
    result = {"ok": False, "sent": False}
    if await common.start_session(xmpp, args, outcome):
        xmpp.send_presence()
        common.emit({"event": "online", "jid": str(xmpp.boundjid)})
        xmpp.send_message(mto=peer, mbody=args.send_body, mtype="chat")
        result["sent"] = True
        try:
            result["received"] = await asyncio.wait_for(received, timeout=args.timeout)
            result["ok"] = True
        except asyncio.TimeoutError:
            outcome.failures.append(f"no message {args.expect_body!r} from {peer.bare}")
    result["other_messages"] = others
    result["mechanism"] = common.mechanism_used(xmpp)
    result["tls"] = common.tls_info(xmpp)
    result["failures"] = outcome.failures
    common.emit(result)
    await common.shutdown(xmpp)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
