"""``bus-conformance``: check an agent, in any language, against docs/protocol.md.

    bus-conformance -- node examples/node-agent/agent.js
    bus-conformance --format json -- ./my-agent --flag

It runs a real coordinator (the same core and :class:`~agentbus_zmq.coordinator.driver.Driver`
loop bus-coordinator runs), starts the command with ``BUS_ENDPOINT`` set to it, and
watches every frame both ways while it plays a scenario: WELCOME held back a while,
observations, a quiet spell, an answer refused as stale, a coordinator restart (a new
core, a new session) and SIGTERM.  Each rule of the spec is one check, PASS or FAIL with
what was seen; the exit status is 1 if any failed.

An agent host (one that says HOST_HELLO) gets the same scenario in its messages, one
HOST_ACTION a frame with an action for each member listed, and two more phases: a member
moved to a connection of its own (the frames that follow list the others only), and a
coordinator gone quiet past liveness (the host reconnects on a fresh socket and presents
its HOST_WELCOME's token); a HOST_BYE it sends is checked where it comes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time

import click
import zmq

from agentbus_zmq.bus import protocol as P
from agentbus_zmq.bus.config import version_option
from agentbus_zmq.coordinator.core import CoordinatorCore, Settings
from agentbus_zmq.coordinator.driver import Driver
from agentbus_zmq.coordinator.worlds import WorldSpec, WorldUnavailable, parse_world_args

__all__ = ["CHECKS", "HOST_CHECKS", "Kit", "main"]

#: The rules checked, in order, with what each means.
CHECKS = {
    "single_frame": "every message is one frame holding one msgpack array of a known type",
    "hello_repeated": "HELLO is repeated, 100 ms to 1 s apart, until WELCOME arrives",
    "ready_heartbeat": "after WELCOME, the first message is the HEARTBEAT that says it is ready",
    "one_action_per_observation": "exactly one ACTION per OBSERVATION, with its tick",
    "heartbeat_when_idle": "with nothing to answer, a HEARTBEAT at least every heartbeat_ms (x1.5)",
    "stale_tick_tolerated": "after a STALE_TICK refusal it keeps answering, without a new HELLO",
    "rehello_after_restart": "told NOT_REGISTERED by a restarted coordinator, it says HELLO again and steps",
    "bye_on_sigterm": "SIGTERM makes it send BYE and exit",
}
#: The rules an agent host is checked against besides (HELLO there meaning HOST_HELLO, and
#: so on for WELCOME, OBSERVATION and ACTION).
HOST_CHECKS = {
    "host_member_moved": "a member moved elsewhere: the frames after list the others, and it answers for them only",
    "host_reconnects_with_token": "the coordinator silent past liveness: a fresh socket, HOST_HELLO with its token",
    "host_bye_names_its_members": "a HOST_BYE names members the host has, and the answer after it leaves them out",
}
HEARTBEAT_S = 0.5
#: How long WELCOME is held back (less than an agent's default liveness, 1.5 s).
HOLD_WELCOME_S = 1.2
#: A registration the kit makes itself and never answers for: it holds each tick open
#: for the deadline, so the agent under test sits idle.
STRAGGLER = b"\x00conformance-straggler"
#: The connection a host's member is moved to (the kit's own, never answered).
MOVER = b"\x00conformance-mover"


@dataclasses.dataclass
class Result:
    name: str
    passed: bool
    detail: str


class _Watched(Driver):
    """The coordinator's own loop, with every frame recorded both ways; WELCOME held
    back until ``hold_welcome_until``, and nothing sent to the kit's own straggler."""

    def __init__(self, core: CoordinatorCore, endpoint: str):
        super().__init__(core, endpoint)
        #: (time, direction, message or None for a frame that did not decode, frames)
        self.trace: list[tuple[float, str, object, int]] = []
        self.peer: bytes | None = None
        self.hold_welcome_until = 0.0

    def receive(self, peer: bytes, frames: list[bytes], now: float, key: bytes | None, address: str = "") -> None:
        try:
            msg = P.decode(frames[0]) if len(frames) == 1 else None
        except P.ProtocolError:
            msg = None
        self.trace.append((now, "in", msg, len(frames)))
        self.peer = peer  # its latest connection
        super().receive(peer, frames, now, key, address)

    def deliver(self, peer: bytes, frame: bytes, now: float) -> bool:
        if peer in (STRAGGLER, MOVER):
            return False
        msg = P.decode(frame)
        if type(msg) in (P.Welcome, P.HostWelcome) and now < self.hold_welcome_until:
            return False  # held back: the agent must repeat HELLO
        self.trace.append((now, "out", msg, 1))
        return True


class Kit:
    def __init__(self, command: list[str], timeout: float = 30.0, world: WorldSpec = WorldSpec("grid", {"seed": 0})):
        self.command = command
        self.timeout = timeout
        self.world = world
        self.tmp = tempfile.mkdtemp(prefix="bus-conformance-")
        self.endpoint = f"ipc://{self.tmp}/bus.ipc"
        self.bus = _Watched(self._core("conformance-1"), self.endpoint)
        self.trace = self.bus.trace
        self.results: list[Result] = []
        self.proc: subprocess.Popen | None = None
        #: what the command turned out to be (its first HELLO says): an agent or a host
        self.host = False
        self.HELLO, self.WELCOME, self.OBSERVATION, self.ACTION = P.Hello, P.Welcome, P.Observation, P.Action

    @property
    def core(self) -> CoordinatorCore:
        return self.bus.core

    @property
    def peer(self) -> bytes | None:
        return self.bus.peer

    def _core(self, session: str) -> CoordinatorCore:
        return CoordinatorCore(Settings(deadline=2.0, heartbeat=HEARTBEAT_S), self.world.build(), session)

    def pump(self, seconds: float) -> None:
        """Run the coordinator for ``seconds``: frames in, checks, frames out."""
        self.bus.pump(seconds)

    def _since(self, t0: float, direction: str = "in") -> list:
        return [(t, m) for t, d, m, _ in self.trace if t >= t0 and d == direction]

    def check(self, name: str, passed: bool, detail: str) -> None:
        self.results.append(Result(name, bool(passed), detail))

    # --- the scenario ------------------------------------------------------------------

    def run(self) -> list[Result]:
        env = {**os.environ, "BUS_ENDPOINT": self.endpoint}
        try:
            self.bus.hold_welcome_until = time.monotonic() + HOLD_WELCOME_S
            try:
                self.proc = subprocess.Popen(self.command, env=env, stdin=subprocess.DEVNULL,
                                             start_new_session=True)
            except OSError as exc:
                raise click.ClickException(f"cannot run {shlex.join(self.command)}: {exc}") from None
            phases = [(self._registration, ("hello_repeated", "ready_heartbeat")),
                      (self._stepping, ("one_action_per_observation",)), (self._idle, ("heartbeat_when_idle",)),
                      (self._stale, ("stale_tick_tolerated",)), (self._restart, ("rehello_after_restart",)),
                      (self._sigterm, ("bye_on_sigterm",))]
            for phase, names in self._phases(phases):
                code = self.proc.poll()
                if code is not None:
                    for name in names:
                        self.check(name, False, f"the agent had exited (status {code}) before this check")
                    continue
                phase()
        finally:
            if self.proc is not None and self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            self.bus.close()
        if self.host:
            self._host_byes()
        bad = [m for _, d, m, n in self.trace if d == "in" and (m is None or n != 1)]
        total = sum(1 for _, d, _, _ in self.trace if d == "in")
        self.results.insert(0, Result("single_frame", total > 0 and not bad,
                                      f"{len(bad)} bad messages of {total}" if total else "no message at all"))
        return self.results

    def _phases(self, phases: list):
        """The phases in order; once registration has shown a host, its own join in."""
        yield phases[0]
        if self.host:
            phases[2:2] = [(self._member_moves, ("host_member_moved",))]
            phases[-2:-2] = [(self._reconnect, ("host_reconnects_with_token",))]
        yield from phases[1:]

    def _be_host(self) -> None:
        self.host = True
        self.HELLO, self.WELCOME, self.OBSERVATION, self.ACTION = (P.HostHello, P.HostWelcome, P.HostObservation,
                                                                   P.HostAction)

    def _wait_for(self, t0: float, predicate, seconds: float) -> bool:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.pump(0.05)
            if predicate(self._since(t0)):
                return True
            if self.proc.poll() is not None:
                return False
        return False

    def _registration(self) -> None:
        t0 = time.monotonic()
        got = self._wait_for(t0, lambda ms: any(type(m) in (P.Hello, P.HostHello) for _, m in ms), self.timeout)
        if any(type(m) is P.HostHello for _, m in self._since(t0)):
            self._be_host()
        hold_end = self.bus.hold_welcome_until
        self.pump(max(0.0, hold_end - time.monotonic()))
        hellos = [t for t, m in self._since(t0) if type(m) is self.HELLO and t <= hold_end]
        gaps = [b - a for a, b in zip(hellos, hellos[1:])]
        self.check("hello_repeated", got and len(hellos) >= 2 and all(0.1 <= g <= 1.0 for g in gaps),
                   f"{len(hellos)} HELLOs while WELCOME was held back {HOLD_WELCOME_S} s, "
                   f"{'gaps ' + ', '.join(f'{g:.2f}' for g in gaps) + ' s' if gaps else 'no repeat'}")
        t1 = time.monotonic()
        ready = self._wait_for(t1, lambda ms: any(type(m) is not self.HELLO for _, m in ms), self.timeout)
        first = next((m for _, m in self._since(t1) if type(m) is not self.HELLO), None)
        self.check("ready_heartbeat", ready and type(first) is P.Heartbeat,
                   f"first message after WELCOME: {type(first).__name__ if first else 'none'}")

    def _stepping(self, seconds: float = 2.0) -> None:
        t0 = time.monotonic()
        self.pump(seconds)
        sent = [m.tick for _, m in self._since(t0, "out") if type(m) is self.OBSERVATION]
        listed = {m.tick: len(m.members) for _, m in self._since(0.0, "out") if type(m) is P.HostObservation}
        ever_sent = {m.tick for _, m in self._since(0.0, "out") if type(m) is self.OBSERVATION}
        answers = [m for _, m in self._since(t0) if type(m) is self.ACTION]
        got = [m.tick for m in answers]
        extra = sorted(set(got) - ever_sent)
        dupes = len(got) - len(set(got))
        # a host answers each member listed, no more, no fewer
        misfits = [m.tick for m in answers if self.host and m.tick in listed and len(m.actions) != listed[m.tick]]
        # the last observation may still be unanswered when the window ends
        missing = [t for t in sent[:-1] if t not in got]
        self.check("one_action_per_observation", sent and not extra and not dupes and not missing and not misfits,
                   f"{len(sent)} observations, {len(got)} actions, {len(missing)} unanswered, {dupes} twice, "
                   f"{len(extra)} for ticks never sent" + (f", {len(misfits)} not one action a member listed"
                                                           if self.host else ""))

    def _idle(self, seconds: float = 3.0) -> None:
        now = time.monotonic()
        self.core.on_message(STRAGGLER, P.Hello("conformance-straggler", "kit", 0), now)
        self.core.on_message(STRAGGLER, P.Heartbeat(), now)
        self.pump(0.3)  # the agent answers its last observation; the next tick waits for the straggler
        t0 = time.monotonic()
        end = t0 + seconds
        while time.monotonic() < end:
            self.core.on_message(STRAGGLER, P.Heartbeat(), time.monotonic())  # alive, never answering
            self.pump(0.1)
        sent = self._since(t0)
        acted = [t for t, m in sent if type(m) is P.Action]
        beats = [t for t, m in sent if type(m) is P.Heartbeat]
        points = [t0, *(t for t, _ in sent), end]
        longest = max(b - a for a, b in zip(points, points[1:]))
        around = [t0, *acted, end]
        idle = max(b - a for a, b in zip(around, around[1:]))
        self.check("heartbeat_when_idle", idle >= 1.0 and longest <= HEARTBEAT_S * 1.5 + 0.1,
                   f"{len(beats)} HEARTBEATs in {seconds:.0f} s with a tick held open (up to {idle:.1f} s with "
                   f"nothing to answer); longest silence {longest:.2f} s")
        self.core.on_message(STRAGGLER, P.Bye("done"), time.monotonic())

    def _stale(self) -> None:
        if self.peer is None:
            self.check("stale_tick_tolerated", False, "no agent registered")
            return
        try:
            self.bus.sock.send_multipart([self.peer, P.encode(P.Error(P.ErrorCode.STALE_TICK,
                                                                      "conformance: refused"))])
        except zmq.ZMQError:
            self.check("stale_tick_tolerated", False, "its connection is gone")
            return
        t0 = time.monotonic()
        self.pump(1.5)
        ms = self._since(t0)
        self.check("stale_tick_tolerated", any(type(m) is self.ACTION for _, m in ms)
                   and not any(type(m) is self.HELLO for _, m in ms) and self.proc.poll() is None,
                   f"after STALE_TICK: {sum(type(m) is self.ACTION for _, m in ms)} actions, "
                   f"{sum(type(m) is self.HELLO for _, m in ms)} HELLOs")

    def _restart(self) -> None:
        self.bus.core = self._core("conformance-2")  # what a restarted coordinator knows: nothing
        t0 = time.monotonic()
        ok = self._wait_for(t0, lambda ms: any(type(m) is self.ACTION for _, m in ms)
                            and any(type(m) is self.HELLO for _, m in ms), 10)
        ms = self._since(t0)
        hello_at = next((t for t, m in ms if type(m) is self.HELLO), None)
        stepped = any(type(m) is self.ACTION and (hello_at is not None and t > hello_at) for t, m in ms)
        self.check("rehello_after_restart", ok and stepped,
                   f"HELLO {'after %.2f s' % (hello_at - t0) if hello_at else 'never'}; "
                   f"{'stepping again' if stepped else 'not stepping'} in the new session")

    def _token(self) -> str | None:
        """The token of the last HOST_WELCOME the kit delivered."""
        welcomes = [m for _, m in self._since(0.0, "out") if type(m) is P.HostWelcome]
        return welcomes[-1].params.get("token") if welcomes else None

    def _member_moves(self) -> None:
        """Member 1 (or 0, for a host of one) moves to a connection of its own, as a HELLO
        with the host's token does it: the host keeps the others."""
        host = next(iter(self.core.hosts.values()), None)
        if host is None or self._token() is None:
            self.check("host_member_moved", False, "no host registered")
            return
        index = 1 if len(host.ids) > 1 else 0
        self.core.on_message(MOVER, P.Hello(host.ids[index], "kit", 0, self._token()), time.monotonic())
        t0 = time.monotonic()
        self.pump(1.5)
        frames = {m.tick: m.members.tolist() for _, m in self._since(t0, "out") if type(m) is P.HostObservation}
        answers = [m for _, m in self._since(t0) if type(m) is P.HostAction and m.tick in frames]
        wrong = [m.tick for m in answers if len(m.actions) != len(frames[m.tick])]
        listed = all(index not in members for members in frames.values())
        self.check("host_member_moved", (bool(answers) or len(host.ids) == 1) and listed and not wrong,
                   f"member {index} moved: {len(frames)} frames {'without' if listed else 'still with'} it, "
                   f"{len(answers)} answered, {len(wrong)} with an action count other than the members listed")
        self.core.on_message(MOVER, P.Bye("done"), time.monotonic())

    def _reconnect(self) -> None:
        """The coordinator says nothing past the host's liveness (1.5 s): a fresh socket
        and a HOST_HELLO that presents the last HOST_WELCOME's token."""
        token, old = self._token(), self.peer
        time.sleep(HEARTBEAT_S * 3 + 0.5)  # the kit's loop stops: nothing in or out
        t0 = time.monotonic()
        ok = self._wait_for(t0, lambda ms: any(type(m) is P.HostHello for _, m in ms), 10)
        hello = next((m for _, m in self._since(t0) if type(m) is P.HostHello), None)
        stepped = self._wait_for(t0, lambda ms: any(type(m) is P.HostAction for _, m in ms), 10)
        fresh = self.peer != old
        self.check("host_reconnects_with_token", ok and hello.token == token and fresh and stepped,
                   f"HOST_HELLO {'with its token' if hello and hello.token == token else 'without its token' if hello else 'never'}"
                   f"{', from a fresh socket' if fresh else ', on the old socket'}; "
                   f"{'stepping again' if stepped else 'not stepping'}")

    def _host_byes(self) -> None:
        """Each HOST_BYE the host sent names members it has, and the HOST_ACTION after it
        answers its frame without them (or, the page allows it, as the frame listed them)."""
        ins, outs = self._since(0.0), self._since(0.0, "out")
        counts = [m.count for _, m in ins if type(m) is P.HostHello]
        byes = [(t, m) for t, m in ins if type(m) is P.HostBye]
        bad = [m.members for _, m in byes if not counts or not m.members or any(i >= counts[-1] for i in m.members)]
        wrong = 0
        for t, bye in byes:
            answer = next((m for u, m in ins if u > t and type(m) is P.HostAction), None)
            frame = next((m for _, m in reversed(outs) if type(m) is P.HostObservation and answer is not None
                          and m.tick == answer.tick), None)
            if frame is not None:
                listed = frame.members.tolist()
                wrong += len(answer.actions) not in (len(listed), len([i for i in listed if i not in bye.members]))
        self.check("host_bye_names_its_members", not bad and not wrong,
                   f"{len(byes)} HOST_BYEs, {len(bad)} naming members the host does not have, {wrong} followed by "
                   "an answer with another count" if byes else "no HOST_BYE sent (none needed: no member failed)")

    def _sigterm(self) -> None:
        t0 = time.monotonic()
        try:
            os.kill(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        self._wait_for(t0, lambda ms: any(type(m) is P.Bye for _, m in ms), 5)
        self.pump(0.2)
        try:
            code = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        bye = any(type(m) is P.Bye for _, m in self._since(t0))
        self.check("bye_on_sigterm", bye and code is not None,
                   f"BYE {'sent' if bye else 'not sent'}; {'exited %s' % code if code is not None else 'still running'}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@version_option()
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--timeout", type=click.FloatRange(min=1), default=30.0, show_default=True,
              help="Seconds the agent may take to say HELLO, and to get ready after WELCOME.")
@click.option("--world", default="grid", show_default=True, help="The world the coordinator runs, as "
              "bus-coordinator --world takes it (docs/worlds.md).")
@click.option("--world-arg", "world_arg", multiple=True, metavar="KEY=VALUE", help="An argument for the world.")
@click.argument("command", nargs=-1, required=True)
def cli(fmt, timeout, world, world_arg, command):
    """Run COMMAND (an agent, in any language) against a coordinator and check it follows
    docs/protocol.md: one PASS/FAIL line per rule, exit 1 if any failed."""
    try:
        spec = WorldSpec(world, parse_world_args(world_arg)).with_defaults(seed=0)
        spec.build()
    except WorldUnavailable as exc:
        raise click.UsageError(str(exc)) from None
    results = Kit(list(command), timeout, spec).run()
    if fmt == "json":
        click.echo(json.dumps({"command": shlex.join(command), "passed": all(r.passed for r in results),
                               "checks": [dataclasses.asdict(r) | {"rule": {**CHECKS, **HOST_CHECKS}[r.name]}
                                          for r in results]},
                              indent=2))
    else:
        for r in results:
            click.echo(f"{'PASS' if r.passed else 'FAIL'}  {r.name:28} {r.detail}")
        click.echo(f"{sum(r.passed for r in results)}/{len(results)} checks passed")
    sys.exit(0 if all(r.passed for r in results) else 1)


def main() -> None:
    cli.main(prog_name="bus-conformance")


if __name__ == "__main__":
    main()
