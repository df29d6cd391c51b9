"""The relay: an HTTP collector speaking GO Feature Flag's ``/v1/data/collector`` protocol.

Install with ``pip install 'flagsink[relay]'`` and run ``flagsink serve``.
"""

from flagsink.relay.app import create_app

__all__ = ["create_app"]
