"""What sits between uvicorn and MONAI Label's endpoints: the loopback bind, pure request checks,
the ASGI middleware that applies them, inference offloading and exception handlers.

May import every other subpackage of :mod:`lib`; nothing below imports it.
"""
