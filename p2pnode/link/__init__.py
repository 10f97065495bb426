"""Direct links between nodes: an authenticated, forward-secret handshake, then encrypted frames."""
