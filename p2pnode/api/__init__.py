"""The local control API: HTTP/JSON over ``<home>/api.sock``, and its client."""
