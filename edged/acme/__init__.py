"""Embedded ACME client: hardened protocol session, order flow, challenge solvers."""
