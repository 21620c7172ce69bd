"""agentbus's ground floor: the wire protocol, socket factories, configuration, CURVE
keys and the control client.  Imports nothing from the layers above it."""

import logging
from importlib.metadata import PackageNotFoundError, version

from agentbus_zmq.bus.protocol import PROTOCOL_VERSION

try:
    __version__ = version("agentbus-zmq")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"
__all__ = ["PROTOCOL_VERSION", "__version__"]

logging.getLogger(__name__).addHandler(logging.NullHandler())
