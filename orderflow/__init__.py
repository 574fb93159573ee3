"""The runtime of the order flow: configuration, provisioning, the pull loop, the supervisor.

Handlers (``functions/``) know nothing of NATS; everything here binds them to it.
"""
