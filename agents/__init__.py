"""Agents: the runtime (``agents.runtime``), the SDK integrators build on
(``agents.sdk``), the agent kinds (``agents.kinds``) and the ``bus-agent`` command."""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
