"""agentbus's shared layer: the wire protocol, socket factories, configuration, busbench."""

import logging

from agentbus_zmq.bus.protocol import PROTOCOL_VERSION

__version__ = "0.1.0"
__all__ = ["PROTOCOL_VERSION", "__version__"]

logging.getLogger(__name__).addHandler(logging.NullHandler())
