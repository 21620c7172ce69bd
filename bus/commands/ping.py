"""``ping``: is the coordinator there, and which session is it?"""

from __future__ import annotations

import time

from agentbus_zmq.bus.commands import Call, Command, Server, command


@command
class PingCommand(Command):
    """Ask the coordinator for its session: is it up, and how long does an answer take?"""

    name = "ping"
    result_doc = "`{session}`"
    cli = "ping"

    def execute(self, server: Server, call: Call, parsed: None) -> dict:
        return {"session": server.session}

    def console(self, ctl, **options) -> None:
        t0 = time.perf_counter()
        result = ctl.request(self.name)
        ms = (time.perf_counter() - t0) * 1000
        ctl.echo(f"agentbus at {ctl.endpoint}: session {ctl.text(result.get('session', '?'))}, "
                 f"answered in {ms:.1f} ms")
