"""NAT traversal: per-pair path choice (direct -> ICE hole punch -> TURN relay).

Sans-IO pieces (framing, binding, servers, turn credentials, mailbox) are plain functions and
classes; ``ice`` wraps aiortc's ICE/DTLS/SCTP transports; ``traversal`` drives them per peer.
"""
