"""Self-test of the Rust-side runner (tests/src/lib.rs): prints a non-JSON line, then a JSON
progress line, then the result (or nothing at all with --silent). Imports slixmpp so a broken
environment shows up here too."""

import sys

import slixmpp  # noqa: F401

import common

p = common.parser(__doc__)
p.add_argument("--silent", action="store_true")
args = p.parse_args()
if not args.silent:
    print("not json", flush=True)
    common.emit({"event": "progress"})
    common.emit({"ok": True, "jid": args.jid, "port": args.port, "mode": args.mode})
print("bye", file=sys.stderr, flush=True)
sys.exit(0)
