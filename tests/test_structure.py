"""The coordinator in parts (issue #16): state tables walked, no state changed outside
them, CONTROL commands as objects that the coordinator, busctl and the protocol page
all take from one registry, and parts small enough to read."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from agentbus_zmq.agents.session import SESSION, AgentSession, SessionState
from agentbus_zmq.bus import protocol as P
from agentbus_zmq.bus.clock import FakeClock
from agentbus_zmq.bus.commands import COMMANDS, Call, Command, command, markdown_table
from agentbus_zmq.bus.fsm import IllegalTransition, Machine
from agentbus_zmq.bus.report import AgentsPage, Stats, wire_keys
from agentbus_zmq.coordinator.core import CoordinatorCore, Settings
from agentbus_zmq.coordinator.units import UNITS, AgentState, Unit

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bus", "agents", "coordinator", "busbench")


class _Obj:
    def __init__(self, state):
        self.state = state


@pytest.mark.parametrize("machine, states", [(UNITS, AgentState), (SESSION, SessionState)],
                         ids=["coordinator units", "agent session"])
def test_every_state_and_event_is_in_the_table_or_refused(machine: Machine, states):
    """Walk the whole table: each (state, event) pair either moves as the table says or
    raises IllegalTransition, and leaves the state as it was."""
    assert machine.states() == set(states)
    for state in states:
        for event in sorted(machine.events):
            obj = _Obj(state)
            if (state, event) in machine.table:
                machine.move(obj, event)
                assert obj.state is machine.table[(state, event)]
            else:
                with pytest.raises(IllegalTransition, match=repr(event)):
                    machine.move(obj, event)
                assert obj.state is state


def test_the_tables_say_what_the_parts_rely_on():
    assert UNITS.reachable(AgentState.JOINING) == set(AgentState)
    assert not UNITS.reachable(AgentState.GONE) - {AgentState.GONE}          # nothing comes back from GONE
    assert all(UNITS.allows(s, "leave") for s in AgentState if s is not AgentState.GONE)
    assert all(SESSION.allows(s, "stop") for s in SessionState)            # stop() goes through the table too
    session = AgentSession("a1", "k")
    session.stop(0.0)
    assert session.state is SessionState.STOPPED and not session.take_outbox()   # nothing said: never registered


def test_no_state_is_assigned_outside_the_state_machine_mechanism():
    """A grep, as the issue asks: ``<something>.state = ...`` appears only in bus/fsm.py."""
    offenders = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if path.name == "fsm.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                targets = node.targets if isinstance(node, ast.Assign) else \
                    [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
                for t in targets:
                    if isinstance(t, ast.Attribute) and t.attr == "state":
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_no_coordinator_module_is_a_god_class_again():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "coordinator").glob("*.py")}
    assert max(sizes.values()) <= 460, sizes


def test_the_protocol_pages_control_table_is_the_command_registry():
    page = (ROOT / "docs" / "protocol.md").read_text()
    assert markdown_table() in page
    assert set(COMMANDS) >= {"ping", "stats", "agents", "measure"}


def test_the_protocol_page_lists_every_stats_and_agents_key():
    page = (ROOT / "docs" / "protocol.md").read_text()
    row = {name: next(line for line in page.splitlines() if line.startswith(f"| `{name}` |"))
           for name in ("stats", "agents")}
    for key in wire_keys(Stats):
        assert f"{key}" in row["stats"], key
    for key in ("id", "pid", "host", "kind", "state", "steps", "p50_us", "p99_us", "missed", "late", "slow",
                "last_seen_s"):
        assert key in row["agents"], key


def test_the_stats_view_survives_the_wire_both_ways():
    core = CoordinatorCore(Settings(), session="s", clock=FakeClock())
    core.on_message(b"p", P.Hello("a1", "k", 7), 0.0)
    core.on_message(b"p", P.Heartbeat(), 0.0)
    wire = core.stats(1.0).to_wire()
    assert P.decode(P.encode(P.Reply(1, True, wire))).result == wire      # it travels as it is
    back = Stats.from_wire(wire)
    assert back == core.stats(1.0) and back.roster.agent_pids == {"a1": 7} and back.ledger.sent == 1
    assert Stats.from_wire({"session": "old", "unknown_key": 1}).session == "old"   # tolerant of either side
    page = core.agents_page(0, 1.0)
    assert AgentsPage.from_wire(page.to_wire()) == page and page.agents[0].state == "stepping"


def test_a_new_control_command_is_one_object_served_by_the_coordinator_and_offered_by_busctl():
    from agentbus_zmq.bus import ctl

    @command
    class Echo(Command):
        """Say back what was sent."""

        name = "echo-test"
        args_doc = "`text`"
        result_doc = "`{text}`"
        cli = "echo-test"
        cli_options = (click.option("--text", default="hi"),)

        def parse(self, args):
            return str(args.get("text", ""))[:20]

        def execute(self, server, call: Call, text):
            return {"text": text, "session": server.session}

        def console(self, ctl_, text="hi"):
            ctl_.echo(ctl_.request(self.name, {"text": text})["text"])

    try:
        core = CoordinatorCore(Settings(), session="s", clock=FakeClock())
        core.on_message(b"c", P.Control(3, "echo-test", {"text": "hello"}), 0.0)
        ((_, frame),) = core.take_outbox()
        assert P.decode(frame) == P.Reply(3, True, {"text": "hello", "session": "s"})
        assert "`echo-test`" in markdown_table()
        sub = ctl._subcommand(COMMANDS["echo-test"])

        class FakeCtl:
            def request(self, name, args=None):
                core.on_message(b"c", P.Control(4, name, args or {}), 0.0)
                return P.decode(core.take_outbox()[0][1]).result

            def echo(self, text):
                click.echo(text)

            def connect_with(self, *options):  # busctl's connection options, taken after the subcommand too
                self.options = options

        fake = FakeCtl()
        result = CliRunner().invoke(sub, ["--text", "over the bus", "--timeout", "2"], obj=fake)
        assert fake.options == (None, None, None, 2.0)
        assert result.exit_code == 0 and result.output == "over the bus\n"
    finally:
        COMMANDS.pop("echo-test", None)


def test_a_command_offered_to_busctl_must_say_how_it_shows_and_every_command_must_execute():
    with pytest.raises(ValueError, match="no console"):
        @command
        class Mute(Command):
            name = "mute-test"
            cli = "mute-test"

            def execute(self, server, call, parsed):
                return {}

    class Idle(Command):
        name = "idle-test"

    with pytest.raises(TypeError, match="execute"):
        Idle()
    assert "mute-test" not in COMMANDS and "idle-test" not in COMMANDS


def test_busctl_offers_a_subcommand_for_every_command_that_asks_for_one():
    from agentbus_zmq.bus.ctl import cli

    wanted = {c.cli for c in COMMANDS.values() if c.cli}
    assert wanted >= {"ping", "status", "agents"} and wanted <= set(cli.commands)


def test_every_unit_field_has_one_writer():
    """A unit's fields are written by the part that owns them, and by no other: a grep
    over assignments to unit attributes in the coordinator."""
    owners = {"pending": "schedule.py", "sent_at": "schedule.py", "pending_idx": "schedule.py",
              "first_step_at": "schedule.py", "tick": "schedule.py", "steps": "schedule.py", "missed": "schedule.py",
              "late": "schedule.py", "slow": "schedule.py", "times_n": "schedule.py", "strikes": "liveness.py",
              "last_seen": "core.py", "last_sent": "outbox.py"}
    found: dict[str, set[str]] = {}
    for path in (ROOT / "coordinator").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                    if isinstance(t, ast.Attribute) and t.attr in owners and not (
                            isinstance(t.value, ast.Name) and t.value.id == "self"):
                        found.setdefault(t.attr, set()).add(path.name)
    assert found == {attr: {owner} for attr, owner in owners.items()}
    assert {f.name for f in __import__("dataclasses").fields(Unit)} >= set(owners) - {"pending_idx"}


def test_sdk_has_no_import_cycle_through_the_runtime():
    tree = ast.parse((ROOT / "agents" / "sdk.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(m and m.endswith(("runtime", "host")) for m in imported)
    assert not re.search(r"^def run\(", (ROOT / "agents" / "sdk.py").read_text(), re.M)
