"""Where scans and labels live: the :class:`~lib.datastore.protocol.PanTSStore` protocol, the
SQLite index (all SQL of the PanTS store), the PanTS folder and DICOMweb backends, checks of
uploaded labels, label export and start-up recovery.

May import :mod:`lib.core` and :mod:`lib.imaging`.
"""
