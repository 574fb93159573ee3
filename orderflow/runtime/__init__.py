"""What a function process runs: pull, decode, handle, emit, ack, and the state it reads.

Everything the delivery guarantees rest on is here (the per-message pipeline,
guarded emits, history and KV reads, dead letters, retries). It imports the
shared names (``orderflow.subjects``), the topology (``orderflow.config``)
and the handlers (``functions``), never an operation or a tool
(``tests/test_layers.py`` checks it).
"""
