"""Agents: the sans-IO session (``agents.session``), the runtime loop around it
(``agents.runtime``), the SDK integrators build on (``agents.sdk``), the agent kinds
(``agents.kinds``), the launcher and its restart policy (``agents.launcher``,
``agents.restarts``) and the ``bus-agent`` command."""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
