"""Swarm inference (Fortytwo-style): members answer, peers judge answers pairwise,
reputation-weighted Bradley–Terry picks the output.

Pure consensus logic: no sockets here. A round drives abstract peers (``round.SwarmPeer``) so the
same code runs over in-process members (tests, benchmarks) and, later, mesh RPC.
"""
