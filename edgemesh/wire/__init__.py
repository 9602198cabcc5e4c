"""Sans-IO wire codecs: msgpack envelopes and raw tensor frames. No sockets here."""
