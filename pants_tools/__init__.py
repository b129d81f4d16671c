"""Tools outside the server: synthetic PanTS phantoms, simulated active-learning campaigns,
loading a PACS from a PanTS tree, and an authenticated client login for tests.

May import :mod:`lib` (any subpackage); the server never imports this package.
"""
