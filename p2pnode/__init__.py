"""p2pnode: a peer-to-peer, end-to-end encrypted messaging node with no central server."""

__version__ = "0.1.0"
