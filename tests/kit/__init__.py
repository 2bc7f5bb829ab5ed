"""The test-bed kit: real parts started by the tests themselves (DESIGN.md §5).

Plain Python (no pytest), shared by ``tests/conftest.py`` and the demo script:

* ``ca``: throw-away CA, server certs, wrong-name and unknown-CA certs.
* ``prosody``: Debian's Prosody without systemd, in a temp dir; accounts; auth-failure count.
* ``netns``: namespaces, veth links, nftables NAT routers, ``a — nat_a — pub`` topologies.
* ``ports``: free loopback ports that no two fixtures of a run share.
* ``xmpp``: stream-feature, STARTTLS and login probes.
* ``env``: can this machine run the bed, and must it (CI)?
"""
