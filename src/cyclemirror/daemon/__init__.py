"""One process per host: hosts the store, the NBD server, the target server and the
outgoing mirror drivers, and answers the CLI on the store's control socket.

Modules: ``config`` (settings and their validation), ``control`` (the JSON
control socket's server), ``control_client`` (its client: all the CLI's
thin-client verbs import), ``service`` (the daemon itself), ``render`` (status
as text), ``metrics`` (Prometheus endpoint),
``nbd_client`` (a small NBD client the demo and tests write with).
"""
