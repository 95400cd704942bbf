"""The asyncio shell: sockets, the upstream client, timers and the shared store.

It feeds the pure core (`gateway.core`) with what happens on the network and carries out its
decisions. Shortcuts into a dependency's internals live in `gateway.io.seams` only, each with a
public-API fallback.
"""
