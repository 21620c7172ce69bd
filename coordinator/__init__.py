"""The coordinator: registry, liveness, tick schedule and the shared world.

``coordinator.core`` is the sans-IO state machine; ``coordinator.driver`` the ZeroMQ
loop around it; ``python -m coordinator`` (``bus-coordinator``) the command.
"""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
