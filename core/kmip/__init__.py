"""The KMIP server (`strongroom serve --kmip`): KMIP over TLS, a face over KeyAPI.

`ttlv` is the binary codec, `tags` the protocol's numbers, `store` the KMIP metadata kept
beside each key, `operations` the dispatch of one request message, `server` the listener.
See docs/kmip.md.
"""
