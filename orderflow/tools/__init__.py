"""Tools that read or drive a running flow: trace, stuck, status, dead letters, record and
replay, the demo. They read the log through the runtime's own modules."""
