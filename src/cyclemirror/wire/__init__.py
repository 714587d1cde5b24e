"""The mirror protocol: handshake and authentication, framed messages.

``handshake`` runs before any frame (version negotiation, mutual HMAC-SHA256
challenge-response, optional TLS around everything); ``link`` reads and writes
frames over a connected socket with every field checked against caps;
``messages`` defines the control messages and validates each one from a peer.
The byte layout is in ``docs/protocol.md``.
"""
