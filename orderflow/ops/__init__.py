"""Operations: servers (embedded, cluster), accounts and permissions, provisioning, supervision.

What brings a flow up and keeps it running; built on the runtime, never on a tool.
"""
