"""Isolated execution of model-written Python: a warm zygote forks one sandboxed child per snippet.

``client.Zygote`` (asyncio) starts and talks to the zygote process (``zygote.py``), whose children run
``child.py``. Kept import-light on purpose: the zygote imports this package, so nothing heavy belongs here.
"""
