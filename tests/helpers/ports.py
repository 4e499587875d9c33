"""Fixed ports for the tests that need them (the multi-host cluster file names its ports)."""
from psgrid.supervisor.launch import consecutive_free_ports

__all__ = ["consecutive_free_ports"]
