"""A PettingZoo module with only an AEC ``env`` (no ``parallel_env``), as some
environments are: ``--world pettingzoo:tests.aec_only`` goes through PettingZoo's
``aec_to_parallel``."""

from pettingzoo.classic.rps.rps import env  # noqa: F401 - the module's one entry point

__all__ = ["env"]
