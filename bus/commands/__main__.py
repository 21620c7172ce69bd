"""``python -m agentbus_zmq.bus.commands``: docs/protocol.md's CONTROL table, from the
commands themselves (paste it there when a command is added; a test keeps them equal)."""

from agentbus_zmq.bus.commands import markdown_table

print(markdown_table())
