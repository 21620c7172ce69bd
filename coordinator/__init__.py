"""The coordinator: registry, liveness, tick schedule and the world.

``coordinator.core`` is the sans-IO facade over its parts (docs/coordinator.md);
``coordinator.world`` the interface a world implements (the grid, PettingZoo and pymdp
environments, worlds by name: docs/worlds.md); ``coordinator.driver`` the ZeroMQ loop
around the core; ``python -m agentbus_zmq.coordinator`` (``bus-coordinator``) the command.
"""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
