"""What sits between uvicorn and MONAI Label's endpoints, one module per job: ``bind`` (the
loopback bind), ``checks`` (pure request checks), ``multipart`` (reading form fields),
``middleware`` (the ASGI request guard that applies the checks and offloads inference to worker
threads), ``responses`` (error bodies and exception handlers), ``listing`` (the cached datastore
listing route) and ``guards`` (installs all of it).

May import every other subpackage of :mod:`lib`; nothing below imports it.
"""
