"""Transport-independent RPC semantics: what a call is, how a server answers it, how a reply
settles a caller's future. zmq links (``mesh.rpc``) and ICE channels (``nat.channel_rpc``) both
serve through ``dispatch.Dispatcher``, so a peer is answered identically on every path."""
