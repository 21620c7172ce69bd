"""Run inside a network namespace (``ip netns exec NS python ns_observer.py ENDPOINT
[SERVER_KEY CLIENT_SECRET]``): a control client the test drives over stdin and stdout,
one JSON request a line ({"cmd": ..., "args": ...}) and one JSON answer a line
({"ok": ...} or {"error": ...}).  The test's own process stays in the machine's namespace;
this one sees the coordinator over its namespace's loopback, whatever its links do."""

import json
import sys

from agentbus_zmq.bus.client import BusUnavailable, ControlClient
from agentbus_zmq.bus.security import ClientKeys

curve = ClientKeys.load(sys.argv[2], sys.argv[3]) if len(sys.argv) > 3 else None
with ControlClient(sys.argv[1], curve=curve) as client:
    client.wait_ready(30)
    print(json.dumps({"ok": "ready"}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer = {"ok": client.request(request["cmd"], request.get("args") or {}, timeout=10)}
        except BusUnavailable as exc:
            answer = {"error": str(exc)}
        print(json.dumps(answer), flush=True)
