"""Log in with slixmpp (optionally registering the account first, XEP-0077), then ping the
server (XEP-0199), ask its disco#info (XEP-0030) and software version (XEP-0092).

Prints one JSON result line: ok, registered, register_feature_offered, mechanism, tls,
bound_jid, ping, disco {identities, features}, version {name, version, os}, failures.
"""

import asyncio
import sys

from slixmpp.exceptions import IqError, IqTimeout

import common


async def main() -> int:
    p = common.parser(__doc__)
    p.add_argument("--register", action="store_true", help="create the account in band first")
    args = p.parse_args()
    common.setup_logging()

    plugins = ["xep_0030", "xep_0092", "xep_0199"]
    if args.register:
        plugins.append("xep_0077")
    xmpp = common.make_client(args, plugins)
    outcome = common.Outcome(xmpp)
    result = {"ok": False, "registered": False, "register_feature_offered": False}

    if args.register:
        xmpp["xep_0077"].force_registration = False

        async def on_register(form):
            # XEP-0077 §3.1: the form must ask for username and password.
            result["register_feature_offered"] = True
            query = form["register"]
            result["form_fields"] = sorted(query.get_fields()) if hasattr(query, "get_fields") else None
            submit = xmpp.Iq()
            submit["type"] = "set"
            submit["register"]["username"] = xmpp.boundjid.user
            submit["register"]["password"] = args.password
            try:
                await submit.send(timeout=10)
                result["registered"] = True
            except IqError as e:
                outcome.failures.append(f"registration refused: {e.iq['error']['condition']}")
                xmpp.disconnect()
            except IqTimeout:
                outcome.failures.append("registration timed out")
                xmpp.disconnect()

        xmpp.add_event_handler("register", on_register)

    session = await common.start_session(xmpp, args, outcome)
    result["mechanism"] = common.mechanism_used(xmpp)
    result["tls"] = common.tls_info(xmpp)
    if session:
        result["bound_jid"] = str(xmpp.boundjid)
        domain = xmpp.boundjid.domain
        try:
            rtt = await xmpp["xep_0199"].ping(jid=domain, timeout=10)
            result["ping"] = {"ok": True, "rtt": rtt}
        except (IqError, IqTimeout) as e:
            result["ping"] = {"ok": False, "error": repr(e)}
        try:
            info = await xmpp["xep_0030"].get_info(jid=domain, timeout=10)
            disco = info["disco_info"]
            result["disco"] = {
                "identities": [list(i[:2]) for i in disco["identities"]],
                "features": sorted(disco["features"]),
            }
        except (IqError, IqTimeout) as e:
            result["disco"] = {"error": repr(e)}
        try:
            version = await xmpp["xep_0092"].get_version(domain, timeout=10)
            v = version["software_version"]
            result["version"] = {"name": v["name"], "version": v["version"], "os": v["os"]}
        except (IqError, IqTimeout) as e:
            result["version"] = {"error": repr(e)}
        result["ok"] = (
            result["ping"].get("ok", False)
            and "error" not in result["disco"]
            and "error" not in result["version"]
        )
    result["failures"] = outcome.failures
    result["stream_features"] = outcome.stream_features
    common.emit(result)
    await common.shutdown(xmpp)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
