"""vmsilab: a real QEMU guest lab for vmsi-server.

Automates the recipe of the project's guest-lab reference (shared/reference/guest-lab.md);
see guest-tests/README.md for usage.
"""
