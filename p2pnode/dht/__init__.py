"""Peer discovery: a trio-native DHT speaking the kademlia package's wire protocol."""
